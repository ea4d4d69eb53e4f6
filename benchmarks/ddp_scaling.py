"""Data-parallel scaling: steps/s of one process against N processes (torchrun, gloo on the CPU, NCCL on GPUs) on the
same global batch of the tiny SD1 model.

Runs alternate (1, N, 1, N, ...) so a shared machine's noise hits both; each run's speed is its steps after the first
five divided by their time (metrics.csv), and the script prints the medians and their ratio.

    .venv/bin/python benchmarks/ddp_scaling.py [--processes 2] [--batch 4] [--steps 60] [--resolution 64] [--runs 3]

--batch is the global batch: one process trains batch B, N processes B/N each. On a CPU every process computes
with one thread (OMP_NUM_THREADS=1), so the figure is the scaling from more cores, not from more GPUs.
"""

from __future__ import annotations

import argparse
import csv
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lora_trainer.backbones.tiny import save_tiny_sd1_single_file  # noqa: E402
from lora_trainer.demo import make_demo_dataset  # noqa: E402


def run(config: Path, out: Path, processes: int, batch: int) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = [sys.executable, "-m", "lora_trainer"] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}", f"--master_port={port}",
        "-m", "lora_trainer"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run(launcher + ["train", "--config", str(config), "--batch_size", str(batch // processes),
                               "--output_dir", str(out)], env=env, check=True, capture_output=True)
    with open(out / "bench" / "metrics.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    first, last = rows[4], rows[-1]
    return (int(last["step"]) - int(first["step"])) / (float(last["seconds"]) - float(first["seconds"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    options = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ddp_bench_"))
    save_tiny_sd1_single_file(0, work / "tiny.safetensors")
    data = make_demo_dataset(work / "data", count=16)
    config = work / "bench.yaml"
    config.write_text(f"base_model: {work / 'tiny.safetensors'}\nmodel_config: {work / 'tiny_config'}\n"
                      f"train_data_dir: {data}\noutput_name: bench\nresolution: {options.resolution}\n"
                      "enable_bucket: false\nlora_rank: 8\nmax_train_steps: "
                      f"{options.steps}\nsample_at_end: false\nfinal_check: 'off'\nseed: 0\n", encoding="utf-8")
    speeds: dict = {1: [], options.processes: []}
    for i in range(options.runs):
        for n in (1, options.processes):
            speeds[n].append(run(config, work / f"run{i}-{n}", n, options.batch))
            print(f"run {i + 1}, {n} process(es): {speeds[n][-1]:.2f} steps/s", flush=True)
    one, many = statistics.median(speeds[1]), statistics.median(speeds[options.processes])
    print(f"global batch {options.batch}, {options.resolution} px, {options.steps} steps: 1 process "
          f"{one:.2f} steps/s, {options.processes} processes {many:.2f} steps/s: {many / one:.2f}x")


if __name__ == "__main__":
    main()
