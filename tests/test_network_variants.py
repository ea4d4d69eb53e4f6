"""LoCon, LoHa, LoKr and DoRA: the saved file, merged into the base weights with the formulas A1111 uses, gives the
trained model's outputs; keys and metadata as kohya / LyCORIS write them; files load back (init_lora)."""

from __future__ import annotations

import json

import pytest
import torch
from a1111_lora_math import a1111_deltas, merge_like_a1111
from lora_helpers import load_trained_state
from torch import nn

from lora_trainer.backbones.single_file import load_backbone_from_path
from lora_trainer.config import TrainConfig
from lora_trainer.demo import make_demo_dataset
from lora_trainer.errors import ModelError
from lora_trainer.lora_file import read_lora_file
from lora_trainer.network import LoraNetwork
from lora_trainer.runner import run_training
from lora_trainer.trainer import build_network


# ---- training -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("data") / "shapes", count=3)


def make_config(model_dir, dataset, out, **changes) -> TrainConfig:
    values = {
        "base_model": str(model_dir), "train_data_dir": str(dataset), "output_dir": str(out), "output_name": "v",
        "resolution": 64, "min_bucket_reso": 32, "max_bucket_reso": 128, "bucket_reso_steps": 32, "lora_rank": 2,
        "conv_rank": 2, "learning_rate": 2e-2, "batch_size": 1, "max_train_steps": 2, "sample_steps": 1, "seed": 5,
        "device": "cpu", "save_precision": "fp32",
    }
    values.update(changes)
    return TrainConfig.from_dict(values)


def trained_network(config, backbone, run_dir):
    """The network exactly as trained: fp32 parameters from the final checkpoint's state."""
    return load_trained_state(build_network(config, backbone), run_dir)


FILE_KEYS = {
    "locon": {"lora_down.weight", "lora_up.weight", "alpha"},
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
    "dora": {"lora_down.weight", "lora_up.weight", "dora_scale", "alpha"},
}
NETWORK_META = {
    "locon": ("networks.lora", {"algo": "locon", "conv_dim": "2", "conv_alpha": "2"}),
    "loha": ("lycoris.kohya", {"algo": "loha", "conv_dim": "2", "conv_alpha": "2"}),
    "lokr": ("lycoris.kohya", {"algo": "lokr", "conv_dim": "2", "conv_alpha": "2", "factor": "-1"}),
    "dora": ("lycoris.kohya", {"algo": "lora", "dora_wd": "True", "wd_on_output": "False"}),
}


@pytest.mark.slow
@pytest.mark.parametrize("network_type", ["locon", "loha", "lokr", "dora"])
def test_saved_file_merged_like_a1111_is_the_trained_model(network_type, tiny_sd1_files, dataset, tmp_path):
    folder = tiny_sd1_files["folder"]
    config = make_config(folder, dataset, tmp_path, network=network_type, train_text_encoder=True)
    result = run_training(config, lambda c: load_backbone_from_path(c.base_model))
    tensors, meta = read_lora_file(result.lora_path)

    module_keys = {}
    for key in tensors:
        name, suffix = key.split(".", 1)
        module_keys.setdefault(name, set()).add(suffix)
    for name, keys in module_keys.items():
        if network_type == "lokr":
            assert "alpha" in keys and ("lokr_w1" in keys or {"lokr_w1_a", "lokr_w1_b"} <= keys), name
            assert "lokr_w2" in keys or {"lokr_w2_a", "lokr_w2_b"} <= keys, name
        else:
            assert keys == FILE_KEYS[network_type], (name, keys)
    has_conv = any(name.endswith("resnets_0_conv1") for name in module_keys)
    assert has_conv == (network_type != "dora")
    assert any(name.startswith("lora_te_text_model_encoder_layers_") for name in module_keys)
    assert (meta["ss_network_module"], json.loads(meta["ss_network_args"])) == NETWORK_META[network_type]
    assert meta["ss_text_encoder_lr"] == "0.02" and meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    if network_type == "lokr":
        assert any("lokr_w2_a" in k for k in tensors)  # rank 2 on the tiny widths: decomposed, not full
    if network_type == "dora":
        shapes = {tuple(v.shape) for k, v in tensors.items() if k.endswith("dora_scale")}
        assert all(s[0] == 1 for s in shapes)  # one magnitude per INPUT channel, as A1111 merges it

    trained = load_backbone_from_path(str(folder))
    network = trained_network(config, trained, result.run_dir)
    merged = load_backbone_from_path(str(folder))
    targets = merged.lora_targets(conv=network_type != "dora", text_encoder=True)

    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([50, 700])
    cond = torch.randn(2, 77, 32, generator=gen)
    ids = trained.tokenize(["ltdemo, a red circle", "a green square, black background"])
    deltas = a1111_deltas(tensors, targets)
    assert len(deltas) == len(module_keys)
    originals = {name: targets[name].weight.detach().clone() for name in deltas}
    with torch.no_grad():
        base_out = merged.predict(x, t, cond)
        base_text = merged.text_encoder(ids).last_hidden_state
        for weight in (0.5, 1.0):
            merge_like_a1111(deltas, originals, targets, weight)
            with network.attached_to_model(), network.multiplier(weight):
                ours, ours_text = trained.predict(x, t, cond), trained.text_encoder(ids).last_hidden_state
            theirs, theirs_text = merged.predict(x, t, cond), merged.text_encoder(ids).last_hidden_state
            assert (ours - theirs).abs().max() <= 1e-5, weight
            assert (ours_text - theirs_text).abs().max() <= 1e-5, weight
        assert (theirs - base_out).abs().max() > 1e-4 and (theirs_text - base_text).abs().max() > 1e-4


# ---- loading files back -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", ["lora", "loha", "lokr", "dora"])
def test_files_load_back_into_the_same_network(algorithm, tiny_sd1):
    targets = tiny_sd1.lora_targets(conv=algorithm != "dora", text_encoder=True)
    first = LoraNetwork(targets, 2, 1.0, seed=1, algorithm=algorithm)
    with torch.no_grad():
        for p in first.parameters():
            p.normal_()
    tensors = first.kohya_state_dict()
    second = LoraNetwork(targets, 2, 1.0, seed=2, algorithm=algorithm)
    second.load_kohya_state_dict(tensors, "file.safetensors")
    a, b = dict(first.named_parameters()), dict(second.named_parameters())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if algorithm != "lora":
        plain = LoraNetwork(targets, 2, 1.0, algorithm="lora")
        with pytest.raises(ModelError, match=f"this run trains LoRA/LoCon; set network: {algorithm}"):
            plain.load_kohya_state_dict(tensors, "file.safetensors")
    groups = first.parameter_groups(1e-4, 5e-5)
    assert [g["lr"] for g in groups] == [1e-4, 5e-5]
    assert sum(len(g["params"]) for g in groups) == len(list(first.parameters()))


def test_dora_multiplier_zero_is_the_base_model(tiny_sd1):
    targets = tiny_sd1.lora_targets()
    network = LoraNetwork(targets, 2, seed=1, algorithm="dora")
    with torch.no_grad():
        for p in network.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x, t, cond = torch.randn(1, 4, 8, 8), torch.tensor([300]), torch.randn(1, 77, 32)
    with torch.no_grad():
        base = tiny_sd1.predict(x, t, cond)
        with network.attached_to_model():
            with network.multiplier(0.0):
                assert torch.equal(tiny_sd1.predict(x, t, cond), base)
            assert (tiny_sd1.predict(x, t, cond) - base).abs().max() > 1e-4
    assert isinstance(next(iter(network.modules_by_name.values())).dora_scale, nn.Parameter)
