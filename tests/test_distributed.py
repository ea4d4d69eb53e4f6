"""Data-parallel training through torchrun on the CPU (gloo): the same LoRA as one process, one writer, a kill and
a resume. Each run starts real processes (torch.distributed.run), as a user's launcher does."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lora_trainer.demo import make_demo_dataset
from lora_trainer.distributed import Processes

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def launch(args: list, processes: int) -> subprocess.Popen:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    prefix = [sys.executable, "-m", "lora_trainer"] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}", f"--master_port={port}",
        "--master_addr=127.0.0.1", "-m", "lora_trainer"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(prefix + args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def finish(process: subprocess.Popen) -> str:
    out, _ = process.communicate(timeout=600)
    assert process.returncode == 0, out[-3000:]
    return out


@pytest.fixture
def setup(tiny_sd1_files, tmp_path):
    data = make_demo_dataset(tmp_path / "data", count=6)
    config = tmp_path / "dp.yaml"
    config.write_text(f"base_model: {tiny_sd1_files['folder']}\ntrain_data_dir: {data}\noutput_name: dp\n"
                      "resolution: 64\nmin_bucket_reso: 32\nmax_bucket_reso: 128\nbucket_reso_steps: 32\n"
                      "lora_rank: 4\nlearning_rate: 2.0e-3\nmax_train_steps: 6\nsample_at_end: false\n"
                      "final_check: 'off'\ndevice: cpu\nseed: 3\n", encoding="utf-8")
    return config, tmp_path


def test_the_share_of_a_batch_covers_it_once():
    for count in range(0, 9):
        for world in (1, 2, 3):
            shares = [Processes(rank=r, world=world).share(count) for r in range(world)]
            items = [i for s in shares for i in range(count)[s]]
            assert items == list(range(count))


def test_two_processes_of_batch_2_train_the_lora_of_one_process_of_batch_4(setup):
    config, tmp_path = setup
    one = launch(["train", "--config", str(config), "--batch_size", "4", "--output_dir", str(tmp_path / "one")], 1)
    finish(one)
    two = launch(["train", "--config", str(config), "--batch_size", "2", "--output_dir", str(tmp_path / "two")], 2)
    out = finish(two)
    assert "global batch: 2 per process x 2 processes x 1 accumulation steps = 4 images a step" in out
    a, b = (load_file(str(tmp_path / d / "dp" / "dp.safetensors")) for d in ("one", "two"))
    assert a.keys() == b.keys()
    for key in a:  # the same steps, up to the order of float sums (Adam magnifies it where gradients are tiny)
        torch.testing.assert_close(b[key], a[key], atol=2e-4, rtol=1e-3)
    assert torch.cat([(a[k] - b[k]).abs().flatten() for k in a]).median() < 1e-6
    assert [line.split(",")[2] for line in (tmp_path / "one/dp/metrics.csv").read_text().splitlines()[1:]] == \
        pytest.approx([line.split(",")[2] for line in (tmp_path / "two/dp/metrics.csv").read_text().splitlines()[1:]])
    with safe_open(str(tmp_path / "two" / "dp" / "dp.safetensors"), "pt") as fh:
        meta = fh.metadata()
    assert (meta["ss_total_batch_size"], meta["ss_batch_size_per_device"]) == ("4", "2")
    # Only the main process writes: one run folder; the latent cache was split between the processes.
    assert [p.name for p in (tmp_path / "two").iterdir()] == ["dp"]
    log = (tmp_path / "two" / "dp" / "train.log").read_text()
    assert "encoded in this process, the rest by the other 1" in log


def test_a_killed_process_ends_the_run_in_one_line_and_it_resumes_bit_identically(setup):
    config, tmp_path = setup
    common = ["--config", str(config), "--batch_size", "2", "--resolution", "128", "--max_bucket_reso", "256",
              "--max_train_steps", "40", "--save_steps", "4"]
    straight = launch(["train", *common, "--output_dir", str(tmp_path / "straight")], 2)
    finish(straight)
    expected = load_file(str(tmp_path / "straight" / "dp" / "dp.safetensors"))

    run_dir = tmp_path / "killed" / "dp"
    victim = launch(["train", *common, "--output_dir", str(tmp_path / "killed")], 2)
    deadline = time.time() + 600
    while not (run_dir / "checkpoints" / "checkpoint-000008").is_dir() and time.time() < deadline:
        time.sleep(0.05)
    rank1 = []
    while not rank1 and time.time() < deadline:
        rank1 = [pid for pid in _children(victim.pid) if "\nRANK=1\n" in f"\n{_environ(pid)}\n"]
    assert rank1, "rank 1 not found"
    os.kill(rank1[0], signal.SIGKILL)
    out, _ = victim.communicate(timeout=120)
    assert victim.returncode != 0 and not (run_dir / "dp.safetensors").exists()
    message = [line for line in (run_dir / "train.log").read_text().splitlines() if "ERROR" in line]
    assert message and "another training process stopped" in message[-1] and f"--resume {run_dir}" in message[-1]

    resumed = launch(["train", "--resume", str(run_dir)], 2)
    assert "resuming dp from step" in finish(resumed)
    got = load_file(str(run_dir / "dp.safetensors"))
    different = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not different, f"{len(different)} tensors differ after the resume, e.g. {different[0]}"

    # On another number of processes it resumes too, and says the result will differ.
    (run_dir / "dp.safetensors").unlink()
    alone = launch(["train", "--resume", str(run_dir), "--max_train_steps", "44"], 1)
    assert "written by 2 process(es) and resumes on 1" in finish(alone)


def _children(pid: int) -> list:
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:  # a process can end while it is listed
            children = [int(c) for task in Path(f"/proc/{parent}/task").iterdir()
                        for c in (task / "children").read_text().split()]
        except OSError:
            continue
        found += children
        todo += children
    return found


def _environ(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/environ").read_text(errors="replace").replace("\0", "\n")
    except OSError:
        return ""
