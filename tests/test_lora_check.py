"""The does-it-work check: strength sweep image, warnings for a LoRA that does nothing or holds bad weights."""

from __future__ import annotations

import json
import time

import pytest
import torch
from PIL import Image

from lora_trainer.config import TrainConfig
from lora_trainer.demo import make_demo_dataset
from lora_trainer.lora_check import SWEEP_FILE, check_lora, check_trained_lora, weight_problems
from lora_trainer.network import LoraNetwork
from lora_trainer.runner import run_training

SIZE = (64, 64)


def network_with_ups(backbone, scale: float, seed: int = 0) -> LoraNetwork:
    network = LoraNetwork(backbone.lora_targets(), rank=4, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in network.modules_by_name.values():
            module.lora_up.weight.copy_(torch.randn(module.lora_up.weight.shape, generator=generator) * scale)
    return network


def test_weight_problems():
    ok = {"a.lora_down.weight": torch.ones(2, 3), "a.lora_up.weight": torch.ones(3, 2), "a.alpha": torch.tensor(2.0),
          "b.lora_down.weight": torch.ones(2, 3), "b.lora_up.weight": torch.ones(3, 2)}
    assert weight_problems(ok) == []
    nan = dict(ok, **{"b.lora_down.weight": torch.tensor([[float("nan"), 0, 0], [0, 0, float("inf")]])})
    assert "1 of 2 LoRA layers hold NaN or infinite weights (first: b)" in weight_problems(nan)[0]
    some_zero = dict(ok, **{"a.lora_up.weight": torch.zeros(3, 2)})
    assert weight_problems(some_zero) == ["1 of 2 LoRA layers are all zero (first: a); they change nothing"]
    all_zero = dict(some_zero, **{"b.lora_up.weight": torch.zeros(3, 2)})
    assert "every LoRA weight is zero" in weight_problems(all_zero)[0]
    # LoHa / LoKr: one all-zero factor of the product zeroes the layer (a fresh LoHa has hada_w2_a = 0)
    loha = {f"c.{k}": torch.ones(2, 2) for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
    lokr = {"d.lokr_w1": torch.ones(2, 2), "d.lokr_w2_a": torch.ones(2, 1), "d.lokr_w2_b": torch.zeros(1, 2)}
    assert weight_problems(dict(ok, **loha)) == []
    unused = {"lora_te1_x_layers_11.lora_down.weight": torch.ones(2, 3), "lora_te1_x_layers_11.lora_up.weight":
              torch.zeros(3, 2)}  # a text encoder's layer after the one the model reads: zero, and expected
    assert weight_problems({**ok, **unused}) == []
    assert weight_problems({**ok, **loha, "c.hada_w2_a": torch.zeros(2, 2), **lokr}) == [
        "2 of 4 LoRA layers are all zero (first: c); they change nothing"]


def test_a_working_lora_passes_and_the_sweep_is_saved(tiny_sd1, tmp_path):
    network = network_with_ups(tiny_sd1, 0.3)
    with network.attached_to_model():
        result = check_lora(tiny_sd1, network, "a red square", "", seed=5, guidance_scale=7.0, size=SIZE,
                            preferred_weight=0.7, out_dir=tmp_path, steps=4)
    assert result.warnings == []
    assert result.mean_change > 1 / 255 and result.changes["0"] == 0.0
    assert set(result.changes) == {"0", "0.25", "0.5", "0.7", "0.75", "1"}
    with Image.open(tmp_path / SWEEP_FILE) as grid:
        assert grid.size[0] == 5 * SIZE[0] and grid.size[1] > SIZE[1]
    saved = json.loads((tmp_path / "lora_check.json").read_text())
    assert saved["warnings"] == [] and saved["sweep_path"].endswith(SWEEP_FILE)


def test_a_lora_that_barely_changes_the_image_is_flagged(tiny_sd1):
    network = network_with_ups(tiny_sd1, 1e-7)
    with network.attached_to_model():
        result = check_lora(tiny_sd1, network, "a red square", "", seed=5, guidance_scale=7.0, size=SIZE,
                            preferred_weight=0.7, steps=2)
    assert len(result.warnings) == 1 and "barely changes the image at weight 0.7" in result.warnings[0]
    assert result.sweep_path is None


def test_a_failing_check_is_a_warning_not_a_failed_run(tiny_sd1, tmp_path, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore details")

    monkeypatch.setattr(tiny_sd1, "generate", out_of_memory)
    network = network_with_ups(tiny_sd1, 0.3)
    config = TrainConfig.from_dict({"train_data_dir": str(tmp_path), "base_model": "x", "resolution": 64,
                                    "min_bucket_reso": 32})
    with network.attached_to_model():
        result = check_trained_lora(network, tiny_sd1, config, tmp_path, caption="a cat")
    assert result.warnings == ["the strength sweep could not run (RuntimeError: CUDA out of memory. Tried to "
                               "allocate 2.00 GiB)"]
    assert not (tmp_path / SWEEP_FILE).exists()


@pytest.mark.slow
def test_every_finished_run_is_checked_cheaply(tiny_sd1_files, tmp_path):
    from lora_trainer.backbones.single_file import load_backbone_from_path

    data = make_demo_dataset(tmp_path / "shapes", count=2)
    config = TrainConfig.from_dict({
        "base_model": str(tiny_sd1_files["folder"]), "train_data_dir": str(data), "output_dir": str(tmp_path / "out"),
        "output_name": "t", "resolution": 64, "min_bucket_reso": 32, "max_bucket_reso": 128, "bucket_reso_steps": 32,
        "lora_rank": 4, "batch_size": 2, "max_train_steps": 1, "sample_steps": 20, "seed": 3, "device": "cpu",
        "final_check": "full"})
    backbone = load_backbone_from_path(config.base_model)
    calls = []
    render = backbone.generate

    def counting(prompts, negative, seed, steps, guidance, size):
        started = time.perf_counter()
        images = render(prompts, negative, seed, steps, guidance, size)
        calls.append((len(prompts), seed, steps, size, time.perf_counter() - started))
        return images

    backbone.generate = counting
    result = run_training(config, lambda c: backbone)
    check = json.loads((result.run_dir / "lora_check.json").read_text())
    assert (result.run_dir / SWEEP_FILE).is_file()
    assert check["preferred_weight"] == 0.7 and set(check["changes"]) >= {"0", "0.7", "1"}
    # one step of training moves the LoRA away from zero only a little: the check says so
    assert any("barely changes" in w for w in check["warnings"])
    # the preview (20 steps), then the sweep: 6 single images at the sample seed, in 8 steps each
    preview, sweep = calls[0], calls[1:]
    assert preview[2] == 20 and [c[:4] for c in sweep] == [(1, 1234, 8, (64, 64))] * 6
    # wall time on a shared CPU varies a lot; the check costs about as much as 2.5 previews (< 2 s on the tiny model)
    assert sum(c[4] for c in sweep) < 20 * preview[4] + 1.0


@pytest.mark.slow
def test_the_end_of_a_run_is_bounded_visible_and_can_be_turned_off(tiny_sd1_files, tmp_path):
    """quick (the default): sized to the run (here 40 images trained: 1 sample); the loss without the LoRA is measured
    before the first step, so after the last one a single UNet call is left, reported as a phase; off with no
    samples: none."""
    from lora_trainer.backbones.single_file import load_backbone_from_path
    from lora_trainer.events import EventBus, Phase, Progress

    data = make_demo_dataset(tmp_path / "shapes", count=4)
    values = {"base_model": str(tiny_sd1_files["folder"]), "train_data_dir": str(data), "resolution": 64,
              "min_bucket_reso": 32, "max_bucket_reso": 128, "bucket_reso_steps": 32, "lora_rank": 4,
              "batch_size": 2, "max_train_steps": 20, "sample_steps": 2, "seed": 3, "device": "cpu"}
    for name, changes, passes_after in (("quick", {}, (1, 1)), ("off", {"final_check": "off",
                                                                            "sample_at_end": False}, (0, 0))):
        config = TrainConfig.from_dict({**values, **changes, "output_dir": str(tmp_path / name)})
        backbone = load_backbone_from_path(config.base_model)
        predict, seen = backbone.predict, {"passes_after": 0, "last_step": False, "phases": []}

        def counting(*args, predict=predict, seen=seen):
            seen["passes_after"] += seen["last_step"]
            return predict(*args)

        def on_event(event, seen=seen):
            if isinstance(event, Progress) and event.step == event.total_steps:
                seen["last_step"] = True
            if isinstance(event, Phase):
                seen["phases"].append((event.name, event.done, event.total))

        backbone.predict = counting
        events = EventBus()
        events.subscribe(on_event)
        result = run_training(config, lambda c, backbone=backbone: backbone, events)
        # quick: the check's calls (this backbone renders its sample through its own diffusers pipeline)
        assert passes_after[0] <= seen["passes_after"] <= passes_after[1], (name, seen["passes_after"])
        assert not (result.run_dir / SWEEP_FILE).exists()
        if name == "quick":
            assert ("checking the LoRA", 1, 1) in seen["phases"] and ("saving", 0, 1) in seen["phases"]
            check = json.loads((result.run_dir / "lora_check.json").read_text())
            assert set(check["fixed_batch_loss"]) == {"without_lora", "with_lora"}
            assert result.loss_before == check["fixed_batch_loss"]["without_lora"]
        else:
            assert result.loss_before is None and not (result.run_dir / "lora_check.json").exists()
            assert not (result.run_dir / f"{result.lora_path.stem}.preview.png").exists()
        assert result.lora_path.is_file()
