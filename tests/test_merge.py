"""``merge``: the exact merge reproduces the blend, the SVD merge reports the error it makes, bad merges refuse."""

from __future__ import annotations

import json
import math

import pytest
import torch
from lora_helpers import sd1_metadata, tag_frequency, write_random_lora
from safetensors.torch import load_file

from lora_trainer import cli
from lora_trainer.lora_file import read_metadata
from lora_trainer.lora_formats import lora_delta, lora_pairs
from lora_trainer.lora_stack import LoraFile, attached_stack, load_stack
from lora_trainer.merge import merge_loras, parse_weighted_path


@pytest.fixture(scope="module")
def pair(tiny_sd1, tmp_path_factory):
    """Two LoCon files with text-encoder layers; b lacks a few layers a has (a layer may be in one file only)."""
    root = tmp_path_factory.mktemp("merge")
    targets = tiny_sd1.lora_targets(conv=True, text_encoder=True)
    a = write_random_lora(root / "a.safetensors", targets, seed=11, rank=4, alpha=2, conv_rank=2,
                          metadata=sd1_metadata("a", ss_tag_frequency=tag_frequency(cat=3, red=1),
                                                **{"modelspec.trigger_phrase": "acat"}))
    fewer = dict(list(targets.items())[5:])
    b = write_random_lora(root / "b.safetensors", fewer, seed=12, rank=3, alpha=3,
                          metadata=sd1_metadata("b", ss_tag_frequency=tag_frequency(cat=2, blue=5)))
    return root, targets, a, b


def unet_outputs(backbone, entries):
    gen = torch.Generator().manual_seed(0)
    x, t, cond = torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([10, 700]), torch.randn(2, 77, 32, generator=gen)
    with torch.no_grad(), attached_stack(entries):
        return backbone.predict(x, t, cond)


def test_rank_concatenation_reproduces_the_blend(tiny_sd1, pair, tmp_path):
    _, targets, a, b = pair
    report = merge_loras([(a, 0.6), (b, 0.4)], tmp_path / "blend.safetensors")
    assert report.method == "concat" and report.relative_error <= 1e-6
    blend = unet_outputs(tiny_sd1, load_stack(targets, [(LoraFile.read(a), 0.6, 0.6), (LoraFile.read(b), 0.4, 0.4)]))
    merged = unet_outputs(tiny_sd1, load_stack(targets, [(LoraFile.read(report.path), 1.0, 1.0)]))
    base = unet_outputs(tiny_sd1, [])
    assert (blend - base).abs().max() > 1e-3
    assert (blend - merged).abs().max() <= 1e-5

    tensors = load_file(str(report.path))
    conv = next(n for n in list(targets)[5:] if isinstance(targets[n], torch.nn.Conv2d)
                and targets[n].kernel_size == (3, 3))  # a 3x3 conv both files have
    assert tensors[f"{conv}.lora_down.weight"].shape == (2 + 3, 32, 3, 3)  # ranks add up; conv stays 4-D
    assert tensors[f"{conv}.lora_up.weight"].shape == (32, 5, 1, 1)
    assert float(tensors[f"{conv}.alpha"]) == 5.0  # alpha = rank: scale 1
    only_a = next(iter(targets))
    assert tensors[f"{only_a}.lora_down.weight"].shape[0] == 2
    meta = read_metadata(report.path)
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_output_name"] == "blend"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("7", "7")
    assert json.loads(meta["ss_tag_frequency"]) == {"10_shapes": {"cat": 5, "red": 1, "blue": 5}}
    assert [(m["file"], m["weight"]) for m in json.loads(meta["ss_merged_from"])] == [("a.safetensors", 0.6),
                                                                                     ("b.safetensors", 0.4)]
    assert meta["modelspec.trigger_phrase"] == "acat"


def test_svd_merge_reports_the_error_it_makes(pair, tmp_path):
    _, _, a, b = pair
    report = merge_loras([(a, 0.6), (b, -0.4)], tmp_path / "svd.safetensors", rank=2, conv_rank=1)
    assert report.method == "svd" and report.ranks == [1, 2]
    inputs = [(lora_pairs(load_file(str(a)), "a"), 0.6), (lora_pairs(load_file(str(b)), "b"), -0.4)]
    merged = lora_pairs(load_file(str(report.path)), "m")
    err2 = norm2 = 0.0
    layer_errors = {}
    for name, (down, up, alpha) in merged.items():
        exact = sum(w * lora_delta(*layers[name][:2], layers[name][2] / layers[name][0].shape[0])
                    for layers, w in inputs if name in layers)
        diff = float((exact - lora_delta(down, up, alpha / down.shape[0])).norm()) ** 2
        layer_errors[name] = math.sqrt(diff) / float(exact.norm())
        err2, norm2 = err2 + diff, norm2 + float(exact.norm()) ** 2
    measured = math.sqrt(err2 / norm2)
    assert 0.05 < measured < 1
    assert report.relative_error == pytest.approx(measured, rel=1e-6)
    worst = max(layer_errors, key=layer_errors.get)
    assert report.worst_layer == worst and report.worst_error == pytest.approx(layer_errors[worst], rel=1e-6)

    exact = merge_loras([(a, 0.6), (b, -0.4)], tmp_path / "full.safetensors", rank=7)  # rank >= a + b: no loss
    assert exact.relative_error < 1e-6


def test_merge_via_cli_prints_the_summary(pair, tmp_path, capsys):
    _, _, a, b = pair
    out = tmp_path / "cli.safetensors"
    assert cli.main(["merge", f"{a}:0.6", f"{b}:0.4", "-o", str(out), "--rank", "3"]) == 0
    assert "rank 2/3 (svd)" in capsys.readouterr().out and out.is_file()


def test_weighted_paths():
    assert parse_weighted_path("x/a.safetensors:0.6") == (parse_weighted_path("x/a.safetensors")[0], 0.6)
    assert parse_weighted_path("a.safetensors")[1] == 1.0
    assert parse_weighted_path("a.safetensors:-1e-1")[1] == -0.1


@pytest.fixture(scope="module")
def strangers(tmp_path_factory, pair):
    """An SDXL-tagged file, and one whose layer shapes belong to another model."""
    root = tmp_path_factory.mktemp("strangers")
    _, targets, _, _ = pair
    write_random_lora(root / "xl.safetensors", targets, seed=5, metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    wide = {name: torch.nn.Linear(64, 64) for name in list(targets)[:3]}
    write_random_lora(root / "wide.safetensors", wide, seed=6, metadata={})
    return root


@pytest.mark.parametrize("case, expected", [
    ("family", "cannot merge a.safetensors (SD1) with xl.safetensors (SDXL)"),
    ("shapes", "were made for different models"),
    ("same", "is also an input; write the merge to a new file name"),
    ("weight", "the weight after ':' is not a number"),
])
def test_bad_merges_are_one_line_errors(case, expected, pair, strangers, tmp_path, capsys):
    _, _, a, b = pair
    args = {"family": [f"{a}:0.5", f"{strangers / 'xl.safetensors'}:0.5", "-o", str(tmp_path / "o.safetensors")],
            "shapes": [str(a), str(strangers / "wide.safetensors"), "-o", str(tmp_path / "o.safetensors")],
            "same": [f"{a}:0.5", f"{b}:0.5", "-o", str(b)],
            "weight": [f"{a}:much", "-o", str(tmp_path / "o.safetensors")]}[case]
    before = b.read_bytes()
    rc = cli.main(["merge", *args])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and "Traceback" not in err and len(lines) == 1
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]
    assert b.read_bytes() == before and not (tmp_path / "o.safetensors").exists()
