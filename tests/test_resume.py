"""A run killed with SIGKILL at a random step and resumed ends bit-identical to an uninterrupted run."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lora_trainer.demo import make_demo_dataset

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
STEPS = 24


def write_config(tmp_path, model_dir, dataset, out):
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump({
        "base_model": str(model_dir), "train_data_dir": str(dataset), "output_dir": str(out), "output_name": "r",
        "resolution": 64, "min_bucket_reso": 32, "max_bucket_reso": 128, "bucket_reso_steps": 32,
        "lora_rank": 4, "learning_rate": 1e-3, "batch_size": 2, "gradient_accumulation_steps": 2,
        "max_train_steps": STEPS, "save_steps": 4, "keep_checkpoints": 2, "lr_scheduler": "cosine",
        "lr_warmup_steps": 3, "shuffle_caption": True, "caption_dropout_rate": 0.2, "flip_aug": True,
        "noise_offset": 0.05, "min_snr_gamma": 5, "ip_noise_gamma": 0.1, "multires_noise_iterations": 3,
        "network_dropout": 0.1, "rank_dropout": 0.1, "module_dropout": 0.1, "scale_weight_norms": 0.02,
        "trigger_word": "ltdemo", "sample_steps": 2, "seed": 11,
        "device": "cpu",
    }))
    return path


def cli(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    return subprocess.Popen([sys.executable, "-m", "lora_trainer", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def steps_logged(run_dir: Path) -> int:
    metrics = run_dir / "metrics.csv"
    if not metrics.is_file():
        return 0
    lines = metrics.read_text().strip().splitlines()
    return max(0, len(lines) - 1)


def kill_at_step(config: Path, run_dir: Path, step: int) -> None:
    """Start training ``config`` and SIGKILL it once metrics.csv holds ``step`` steps."""
    victim = cli("train", "--config", str(config))
    deadline = time.time() + 600
    while steps_logged(run_dir) < step and victim.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=60)
    assert victim.returncode == -signal.SIGKILL, f"the run ended before it could be killed at step {step}"


def test_sigkill_then_resume_is_bit_identical(tiny_sd1_files, tmp_path):
    dataset = make_demo_dataset(tmp_path / "data", count=6)
    model = tiny_sd1_files["folder"]

    reference = cli("train", "--config", str(write_config(tmp_path, model, dataset, tmp_path / "straight")))
    out, _ = reference.communicate(timeout=600)
    assert reference.returncode == 0, out
    expected = load_file(str(tmp_path / "straight" / "r" / "r.safetensors"))

    kill_at = random.Random().randint(5, STEPS - 2)  # after the first checkpoint, before the end
    run_dir = tmp_path / "killed" / "r"
    kill_at_step(write_config(tmp_path, model, dataset, tmp_path / "killed"), run_dir, kill_at)
    assert not (run_dir / "r.safetensors").exists()

    resumed = cli("train", "--resume", str(run_dir))
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    assert "resuming r from step" in out
    got = load_file(str(run_dir / "r.safetensors"))
    assert got.keys() == expected.keys()
    different = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not different, f"killed at step {kill_at}: {len(different)} tensors differ, e.g. {different[0]}"
    steps = [int(line.split(",")[0]) for line in (run_dir / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == list(range(1, STEPS + 1)), "metrics.csv must hold each step once"
