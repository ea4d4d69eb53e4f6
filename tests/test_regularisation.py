"""network_dropout, rank_dropout and module_dropout (kohya's names): active only inside a training step, the same
units dropped for the same (seed, step), never in samples or the saved file. scale_weight_norms: max-norm
regularisation of each layer's change. (Resume stays bit-identical with all of them on: test_resume.py.)"""

from __future__ import annotations

import pytest
import torch

from lora_trainer.config import TrainConfig
from lora_trainer.errors import ConfigError
from lora_trainer.metadata import network_description
from lora_trainer.network import LoraNetwork


def randomised(network: LoraNetwork) -> LoraNetwork:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in network.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return network


@pytest.mark.parametrize("dropouts", [(0.5, 0, 0), (0, 0.5, 0), (0, 0, 0.5)])
def test_dropout_acts_in_training_mode_only(tiny_sd1, dropouts):
    targets = tiny_sd1.lora_targets()
    plain = randomised(LoraNetwork(targets, 4, seed=1))
    dropping = randomised(LoraNetwork(targets, 4, seed=1, dropouts=dropouts))
    x, t, cond = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 32)
    with torch.no_grad():
        with plain.attached_to_model():
            reference = tiny_sd1.predict(x, t, cond)
        with dropping.attached_to_model():
            dropping.eval()
            assert torch.equal(tiny_sd1.predict(x, t, cond), reference)  # eval: every unit, no scaling
            dropping.train()
            outputs = []
            for seed in (7, 7, 8):
                torch.manual_seed(seed)
                outputs.append(tiny_sd1.predict(x, t, cond))
    assert torch.equal(outputs[0], outputs[1])  # the same random stream drops the same units
    assert not torch.equal(outputs[0], reference) and not torch.equal(outputs[0], outputs[2])


def test_dropout_is_for_lora_and_locon_and_goes_into_the_metadata():
    base = {"base_model": "m", "train_data_dir": "d"}
    with pytest.raises(ConfigError, match="'network_dropout' works with network lora or locon, not loha"):
        TrainConfig.from_dict({**base, "network": "loha", "network_dropout": 0.1})
    with pytest.raises(ConfigError, match="'scale_weight_norms' works with network lora or locon, not dora"):
        TrainConfig.from_dict({**base, "network": "dora", "scale_weight_norms": 1.0})
    config = TrainConfig.from_dict({**base, "network_dropout": 0.1, "rank_dropout": 0.2, "module_dropout": 0.05})
    assert network_description(config, 16) == ("networks.lora", {"rank_dropout": "0.2", "module_dropout": "0.05"})


def test_max_norm_scales_only_the_layers_above_it(tiny_sd1):
    network = randomised(LoraNetwork(tiny_sd1.lora_targets(conv=True), 4, seed=1, conv_rank=2))

    @torch.no_grad()
    def norms():
        return {name: float((m.lora_up.weight.reshape(m.lora_up.weight.shape[0], -1)
                             @ m.lora_down.weight.reshape(m.lora_down.weight.shape[0], -1)).norm() * m.scale)
                for name, m in network.modules_by_name.items()}

    before, state = norms(), {k: v.clone() for k, v in network.state_dict().items()}
    limit = sorted(before.values())[len(before) // 2]  # half the layers are above it
    scaled, mean = network.apply_max_norm(limit)
    after = norms()
    above = {name for name, norm in before.items() if norm > limit}
    assert scaled == len(above) > 0
    assert all(abs(after[name] - limit) < 1e-5 * limit for name in above)
    for name in set(before) - above:  # untouched, bit for bit
        for key in ("lora_up.weight", "lora_down.weight"):
            assert torch.equal(network.state_dict()[f"modules_by_name.{name}.{key}"],
                               state[f"modules_by_name.{name}.{key}"])
    assert abs(mean - sum(after.values()) / len(after)) < 1e-6
