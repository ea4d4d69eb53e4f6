"""Peak memory of a run against dataset size, with the caches in memory and on disk (cache_latents_to_disk and
cache_text_encoder_outputs_to_disk).

    python benchmarks/cache_memory.py --images 100 2000 --resolution 256

Each run is its own process (the tiny SD1 model, generated images, every caption different so the text cache grows
too); the child reports its own peak RSS. In memory, the caches grow with the images; on disk, a run holds only
its batch. The disk runs go first to a fresh cache (encoding) and then again (reading it back); the second is the
one that shows whether memory stays flat.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(config: str) -> None:
    sys.path.insert(0, str(ROOT))
    from lora_trainer import cli

    started = time.perf_counter()
    rc = cli.main(["train", "--config", config])
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"rc": rc, "peak_mib": peak_kib / 1024, "seconds": time.perf_counter() - started}))


def unique_captions(path: Path) -> None:
    """Every caption different, so the text cache grows with the dataset too."""
    import csv

    with open(path, newline="", encoding="utf-8") as fh:
        header, *rows = list(csv.reader(fh))
    with open(path, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([header] + [[name, f"{prompt}, item {i}"] for i, (name, prompt) in enumerate(rows)])


def run(config: dict, folder: Path) -> dict:
    import yaml

    path = folder / f"{config['output_name']}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, __file__, "--child", str(path)], env=env, capture_output=True, text=True,
                         check=False)
    line = [x for x in out.stdout.splitlines() if x.startswith("{")]
    if out.returncode or not line:
        raise SystemExit(f"run failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return json.loads(line[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=[100, 2000])
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    sys.path.insert(0, str(ROOT))
    from lora_trainer.backbones.tiny import build_tiny_sd1, save_tiny_sd1
    from lora_trainer.demo import make_demo_dataset

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_tiny_sd1(build_tiny_sd1(0), tmp / "model")
        rows = []
        for count in args.images:
            data = make_demo_dataset(tmp / f"data{count}", count=count)
            unique_captions(data / "metadata.csv")
            base = {"base_model": str(tmp / "model"), "train_data_dir": str(data), "output_dir": str(tmp / "out"),
                    "resolution": args.resolution, "min_bucket_reso": 64, "max_bucket_reso": 2 * args.resolution,
                    "bucket_reso_steps": 64, "lora_rank": 4, "batch_size": 4, "max_train_steps": args.steps,
                    "final_check": "off", "sample_at_end": False, "device": "cpu", "cache_dir": str(tmp / "cache")}
            memory = run({**base, "output_name": f"mem{count}"}, tmp)
            disk = {**base, "cache_latents_to_disk": True, "cache_text_encoder_outputs_to_disk": True}
            first = run({**disk, "output_name": f"disk{count}"}, tmp)
            again = run({**disk, "output_name": f"again{count}"}, tmp)
            rows.append((count, memory, first, again))
            print(count, memory, first, again, flush=True)
    print(f"\n| images | in memory: peak RSS | on disk, first run | on disk, reused | (resolution {args.resolution}, "
          f"{args.steps} steps) |\n|---|---|---|---|---|")
    for count, memory, first, again in rows:
        print(f"| {count} | {memory['peak_mib']:.0f} MiB ({memory['seconds']:.0f} s) | {first['peak_mib']:.0f} MiB "
              f"({first['seconds']:.0f} s) | {again['peak_mib']:.0f} MiB ({again['seconds']:.0f} s) | |")


if __name__ == "__main__":
    main()
