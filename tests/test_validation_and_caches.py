"""Validation loss, TensorBoard logging in a run, disk caches, and a run with every kohya dataset feature on that is
killed with SIGKILL and resumed bit-identically."""

import csv
import logging
import random

import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from test_resume import cli, kill_at_step

from lora_trainer.backbones.single_file import load_backbone_from_path
from lora_trainer.config import TrainConfig
from lora_trainer.demo import make_demo_dataset
from lora_trainer.events import EventBus, Progress
from lora_trainer.runner import run_training
from lora_trainer.training_data import EpochOrder, prepare_data

pytestmark = pytest.mark.slow
TINY = {"resolution": 64, "min_bucket_reso": 32, "max_bucket_reso": 128, "bucket_reso_steps": 32, "lora_rank": 4,
        "learning_rate": 2e-3, "batch_size": 2, "sample_steps": 2, "seed": 3, "device": "cpu", "output_name": "v"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("data") / "shapes", count=8)


def config_of(model, data, out, **values):
    return TrainConfig.from_dict({"base_model": str(model), "train_data_dir": str(data), "output_dir": str(out),
                                  **TINY, **values})


def metrics(run_dir):
    with open(run_dir / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_validation_split_is_held_out_seeded_and_never_trained_on(dataset, tmp_path):
    config = config_of("m", dataset, tmp_path, validation_split=0.25, max_train_steps=0, epochs=3)
    data = prepare_data(config)
    held = [data.scan.records[i].path.name for i in data.indices("val")]
    assert len(held) == 2 and data.scan.num_images() == 6
    assert held == [data.scan.records[i].path.name for i in prepare_data(config).indices("val")], "seeded"
    other = prepare_data(config.replace(validation_seed=99))
    assert held != [other.scan.records[i].path.name for i in other.indices("val")]
    order = EpochOrder(data, 2, config.seed)
    trained = {i for m in range(data.plan.total_steps) for i in order.micro_batch(m)}
    assert not trained & set(data.indices("val"))
    assert data.plan.batches_per_epoch == 3


def test_validation_loss_is_logged_comparable_and_charted(tiny_sd1_files, dataset, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = []
    for name in ("a", "b"):
        seen = []
        events = EventBus()
        events.subscribe(lambda e, seen=seen: seen.append(e) if isinstance(e, Progress) else None)
        config = config_of(tiny_sd1_files["folder"], dataset, tmp_path / name, validation_split=0.25,
                           validate_every_n_steps=2, max_train_steps=5, log_with="tensorboard")
        result = run_training(config, lambda c: load_backbone_from_path(c.base_model), events)
        rows = metrics(result.run_dir)
        runs.append(rows)
        validated = [int(r["step"]) for r in rows if r["val_loss"]]
        assert validated == [2, 4, 5]  # every 2 steps, and at the end
        assert [e.step for e in seen if e.val_loss is not None] == validated
        accumulator = EventAccumulator(str(result.run_dir / "tensorboard")).Reload()
        scalars = accumulator.Scalars("loss/validation")
        assert [s.step for s in scalars] == validated
        assert [round(s.value, 5) for s in scalars] == [round(float(r["val_loss"]), 5) for r in rows if r["val_loss"]]
        assert len(accumulator.Scalars("loss/train")) == 5 and len(accumulator.Scalars("lr")) == 5
        assert (result.run_dir / "loss.png").is_file() or any(result.run_dir.glob("*.png"))
        with safe_open(str(result.lora_path), "pt") as fh:
            meta = fh.metadata()
        assert meta["ss_num_validation_images"] == "2" and meta["ss_validation_split"] == "0.25"
    assert [r["val_loss"] for r in runs[0]] == [r["val_loss"] for r in runs[1]], "same seed, same validation curve"


def test_validation_loss_measures_the_same_thing_every_time(tiny_sd1_files, dataset, tmp_path):
    """Fixed noise and timesteps: with the LoRA unchanged (learning rate 0) every validation gives the same number,
    so the curve moves only when the LoRA does; at epoch ends by default."""
    config = config_of(tiny_sd1_files["folder"], dataset, tmp_path, validation_split=0.25, learning_rate=0.0,
                       weight_decay=0.0, max_train_steps=6)
    result = run_training(config, lambda c: load_backbone_from_path(c.base_model))
    rows = metrics(result.run_dir)
    values = {r["val_loss"] for r in rows if r["val_loss"]}
    assert [int(r["step"]) for r in rows if r["val_loss"]] == [3, 6]  # 3 batches per epoch
    assert len(values) == 1


def test_a_validation_folder(tiny_sd1_files, dataset, tmp_path):
    held = make_demo_dataset(tmp_path / "held", count=2, seed=9)
    config = config_of(tiny_sd1_files["folder"], dataset, tmp_path / "out", validation_data_dir=str(held),
                       max_train_steps=2, validate_every_n_steps=1)
    result = run_training(config, lambda c: load_backbone_from_path(c.base_model))
    assert all(r["val_loss"] for r in metrics(result.run_dir))


def log_of(result):
    return (result.run_dir / "train.log").read_text()


def test_latents_and_text_cached_on_disk_are_reused_and_change_nothing(tiny_sd1_files, dataset, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="lora_trainer")  # train.log takes what the logger passes
    common = dict(max_train_steps=3, flip_aug=True, cache_dir=str(tmp_path / "cache"))
    plain = run_training(config_of(tiny_sd1_files["folder"], dataset, tmp_path / "mem", **common),
                         lambda c: load_backbone_from_path(c.base_model))
    on_disk = dict(common, cache_latents_to_disk=True, cache_text_encoder_outputs_to_disk=True)
    first = run_training(config_of(tiny_sd1_files["folder"], dataset, tmp_path / "d1", **on_disk),
                         lambda c: load_backbone_from_path(c.base_model))
    files = sorted((tmp_path / "cache").rglob("*.safetensors"))
    assert len([f for f in files if "latents" in f.parts]) == 16  # 8 images, each upright and mirrored
    assert [f for f in files if "text" in f.parts]
    second = run_training(config_of(tiny_sd1_files["folder"], dataset, tmp_path / "d2", **on_disk),
                          lambda c: load_backbone_from_path(c.base_model))
    assert "16 reused, 0 encoded" in log_of(second)
    expected = load_file(str(plain.lora_path))
    for result in (first, second):
        got = load_file(str(result.lora_path))
        assert all(torch.equal(expected[k], got[k]) for k in expected), "a disk cache must not change the LoRA"
    # An edited image is encoded again (and only it); another resolution makes new entries.
    image = sorted(dataset.glob("*.png"))[0]
    edited = tmp_path / "edited"
    import shutil

    shutil.copytree(dataset, edited)
    Image.new("RGB", (64, 64), (255, 0, 0)).save(edited / image.name)
    third = run_training(config_of(tiny_sd1_files["folder"], edited, tmp_path / "d3", **on_disk),
                         lambda c: load_backbone_from_path(c.base_model))
    assert "0 reused, 16 encoded" in log_of(third), "a copied folder is another path: all new"
    Image.new("RGB", (64, 64), (0, 0, 255)).save(edited / image.name)
    fourth = run_training(config_of(tiny_sd1_files["folder"], edited, tmp_path / "d4", **on_disk),
                          lambda c: load_backbone_from_path(c.base_model))
    assert "14 reused, 2 encoded" in log_of(fourth)


def test_every_kohya_feature_survives_sigkill_and_resume_bit_identically(tiny_sd1_files, tmp_path):
    data = make_demo_dataset(tmp_path / "data" / "2_shapes", count=6)
    reg = make_demo_dataset(tmp_path / "reg" / "1_shape", count=4, seed=5)
    rgba = tmp_path / "rgba"
    rgba.mkdir()
    for i in range(2):
        image = Image.new("RGBA", (64, 64), (200, 30 * i, 40, 0))
        image.paste((20, 200, 40 * i, 255), (0, 0, 64, 40))
        image.save(rgba / f"a{i}.png")
        (rgba / f"a{i}.txt").write_text(f"masked pattern {i}")
    steps = 16

    def write_config(out):
        path = tmp_path / f"{out}.yaml"
        path.write_text(yaml.safe_dump({
            "base_model": str(tiny_sd1_files["folder"]), "output_dir": str(tmp_path / out), **TINY,
            "output_name": "r", "max_train_steps": steps, "save_steps": 3, "keep_checkpoints": 2,
            "subsets": [{"image_dir": str(data.parent), "flip_aug": True, "shuffle_caption": True},
                        {"image_dir": str(reg.parent), "is_reg": True},
                        {"image_dir": str(rgba), "alpha_mask": True, "num_repeats": 2}],
            "prior_loss_weight": 0.5, "validation_split": 0.2, "validate_every_n_steps": 4, "loss_type": "huber",
            "min_timestep": 50, "max_timestep": 950, "debiased_estimation_loss": True,
            "cache_latents_to_disk": True, "cache_dir": str(tmp_path / "cache"), "log_with": "tensorboard"}))
        return path

    reference = cli("train", "--config", str(write_config("straight")))
    out, _ = reference.communicate(timeout=600)
    assert reference.returncode == 0, out
    expected = load_file(str(tmp_path / "straight" / "r" / "r.safetensors"))

    kill_at = random.Random().randint(4, steps - 2)
    run_dir = tmp_path / "killed" / "r"
    kill_at_step(write_config("killed"), run_dir, kill_at)
    resumed = cli("train", "--resume", str(run_dir))
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    got = load_file(str(run_dir / "r.safetensors"))
    different = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not different, f"killed at step {kill_at}: {len(different)} tensors differ"
    assert metrics(run_dir) == [dict(r, seconds=m["seconds"], it_per_s=m["it_per_s"])
                                for r, m in zip(metrics(tmp_path / "straight" / "r"), metrics(run_dir))]
