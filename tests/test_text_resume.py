"""A text-generation run killed with SIGKILL, then resumed with ``--resume``, ends bit-identical to an unbroken run."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[1]
STEPS = 80


def mixed_dataset(folder: Path) -> Path:
    """All three record kinds, with dropout in the model: everything a resume has to reproduce."""
    folder.mkdir(parents=True)
    rows = [{"prompt": f"Q: what is {a} plus {b}?\nA:", "completion": f" {a + b}."} for a in range(4) for b in range(3)]
    rows += [{"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w.upper()}]}
             for w in ("hello", "goodbye", "thanks")]
    (folder / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    (folder / "notes.txt").write_text("A short note about numbers.\n\nAnother note, a little longer than that.\n",
                                      encoding="utf-8")
    return folder


def read_adapter(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / run.name / "adapter_model.safetensors"))


def read_losses(run: Path) -> list:
    with open(run / "metrics.csv", newline="") as fh:
        return [(row["step"], row["loss"]) for row in csv.DictReader(fh)]


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the killed subprocess runs with OMP_NUM_THREADS=1 too: same kernels, same bits
    yield
    torch.set_num_threads(threads)


def test_resume_after_sigkill_is_bit_identical(tmp_path, one_thread):
    from lora_trainer.cli import main
    from lora_trainer.text.tiny import save_tiny_causal_lm

    data = mixed_dataset(tmp_path / "data")
    model = save_tiny_causal_lm(tmp_path / "tiny-gpt2", ["Q: what is 1 plus 2?\nA: 3.", "Say HELLO."], "gpt2")
    config = tmp_path / "llm.yaml"
    config.write_text(
        f"task_type: text-generation\nbase_model: {model}\ntrain_data_dir: {data}\noutput_dir: {tmp_path / 'runs'}\n"
        f"max_seq_length: 32\nlora_rank: 4\nlearning_rate: 5e-3\nlr_scheduler: cosine\nlr_warmup_steps: 5\n"
        f"batch_size: 2\ngradient_accumulation_steps: 2\nmax_train_steps: {STEPS}\nsave_steps: 5\n"
        "keep_checkpoints: 2\nseed: 7\ndevice: cpu\n", encoding="utf-8")

    killed = tmp_path / "runs" / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    console = tmp_path / "console.txt"  # a file, not a pipe: a full pipe would block the child
    with open(console, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "lora_trainer", "train", "--config", str(config),
                                    "--output_name", "killed"], cwd=ROOT, env=env, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 180
        while not list((killed / "checkpoints").glob("checkpoint-*")):
            assert process.poll() is None, console.read_text(errors="replace")[-2000:]
            assert time.monotonic() < deadline, "no checkpoint within 180 s"
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    assert not (killed / "killed").exists(), "the run finished before it could be killed"

    assert main(["train", "--resume", str(killed)]) == 0
    assert main(["train", "--config", str(config), "--output_name", "straight"]) == 0

    resumed, straight = read_adapter(killed), read_adapter(tmp_path / "runs" / "straight")
    # c_attn, attn.c_proj and mlp.c_proj of 2 layers, lora_A and lora_B each
    assert resumed.keys() == straight.keys() and len(resumed) == 12
    for key in straight:
        assert torch.equal(resumed[key], straight[key]), key
    assert read_losses(killed) == read_losses(tmp_path / "runs" / "straight")  # every step, not just the end
    assert len(read_losses(killed)) == STEPS
