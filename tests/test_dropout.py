"""network_dropout, rank_dropout and module_dropout (kohya's names): active only inside a training step, the same
units dropped for the same (seed, step), never in samples or the saved file."""

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
    config = TrainConfig.from_dict({**base, "network_dropout": 0.1, "rank_dropout": 0.2, "module_dropout": 0.05})
    assert network_description(config, 16) == ("networks.lora", {"rank_dropout": "0.2", "module_dropout": "0.05"})
