"""Side by side with kohya-ss/sd-scripts: the same SD1.5-size LoRA run in both tools, each in its own process.

    .venv/bin/python benchmarks/vs_kohya.py --kohya /work/kohya/sd-scripts --kohya-python /work/kohya/venv/bin/python \\
        --work /work/kohya/bench [--resolution 64] [--batch-size 1] [--images 8] [--steps 10] [--pairs 1] \\
        [--gradient-checkpointing] [--threads 2] [--wait-idle 600]

kohya's code is never part of this repository. Its checkout and venv, outside it (the project's way of keeping pip
on the CPU torch pair; bitsandbytes dropped; `-e .` because kohya's scripts import its `library`):

    mkdir -p /work/kohya/sd-scripts && cd /work/kohya
    # the mirror lacks three blobs nothing here needs: Windows DLLs and Qwen3's tokenizer.json
    git --git-dir=<sd-scripts mirror> archive HEAD -- . ':!bitsandbytes_windows' \\
        ':!configs/qwen3_06b/tokenizer.json' | tar -x -C sd-scripts
    printf 'torch==2.14.1\\ntorchvision==0.29.1\\n' > constraints.txt
    grep -v -E '^(bitsandbytes|-e \\.)' sd-scripts/requirements.txt > requirements-cpu.txt
    python3.11 -m venv venv && venv/bin/pip install -c constraints.txt torch==2.14.1 torchvision==0.29.1
    venv/bin/pip install -c constraints.txt -r requirements-cpu.txt
    cd sd-scripts && ../venv/bin/pip install --no-deps -e . && ../venv/bin/python train_network.py --help

Everything generated goes to --work and is reused by later calls:
  - a random-weight checkpoint of SD1.5's real size and original (LDM) layout, fp32 safetensors, with the full key
    set kohya's single-file loader needs (UNet, VAE of SD's real size, CLIP ViT-L text model). It is written by
    webui_memory.py's builder with the VAE swapped for the bundled SD1 VAE config (the builder's tiny VAE would not
    load into kohya's fixed SD1 VAE), in a subprocess so this process stays small;
  - kohya's tokenizer: kohya loads openai/clip-vit-large-patch14 from the hub unless --tokenizer_cache_dir holds a
    folder named openai_clip-vit-large-patch14; we write it from the project's offline CLIP tokenizer
    (lora_trainer/backbones/tokenizer_files.py, the same BPE table). Both tools run with HF_HUB_OFFLINE=1;
  - a dataset of --images square PNGs at --resolution with .txt captions, in a 1_bench/ sub-folder (1 repeat),
    which both tools read as it is.

Matched settings: rank 16 / alpha 16, UNet only (kohya: networks.lora, --network_train_unet_only), AdamW lr 1e-4,
weight decay 0.01 and gradient clipping 1.0 (both tools' defaults), constant lr, fp32 (mixed precision off, saved as
fp32), latents cached in memory, seed 42, no buckets, batch --batch-size, --steps steps, no sampling, nothing saved
before the end. kohya gets --sdpa (its default attention is the slow naive one; the project's diffusers UNet uses
SDPA). Everything else is each tool's default, in particular:
  - the project keeps its end-of-run check (final_check: quick, 8+8 UNet passes) and, as always, writes a
    resumable checkpoint (LoRA + optimizer state) at the end; sample_at_end is off because kohya renders no
    sample without --sample_prompts (with it on, the project would render one image after the last step);
  - the project caches the text encoder's outputs; kohya (SD1) runs the frozen text encoder every step;
  - kohya's DataLoader: --max_data_loader_n_workers default 8, capped at the CPU count, workers not persistent.
OMP_NUM_THREADS and MKL_NUM_THREADS = --threads (default 2 = this machine's cores) for both.

Measurement: runs alternate project, kohya, project, kohya, ... (--pairs pairs) so a shared machine's noise hits
both. Before each run the checkpoint file is read once (page cache warm for both). Each run is one process:
  - wall clock from launch to exit; user+sys CPU seconds and ru_maxrss (the largest single process of the tree)
    from os.wait4; peak RSS and peak PSS summed over the process tree (DataLoader workers included), polled
    from /proc every 0.25 s and 1 s;
  - step times from the tools' own progress bars (tqdm, "training:" / "steps:"): a reader thread splits the
    merged stdout/stderr on \\r and \\n and stamps each piece with the time.monotonic() at which its last byte
    arrived (tqdm flushes every update); step k ends when "k/N" first appears. "launch -> step 1 done" includes
    start-up and the first step; "median step" is the median of steps 2..N; "after the last step" is exit minus
    the time "N/N" appeared.
    The project's own metrics.csv (seconds since training began, per step) is printed as a cross-check.
  - the CPU other processes used during the run (machine's busy time from /proc/stat minus the run's own), in cores:
    on a shared machine, read each run's numbers with it; --wait-idle waits for a quiet moment before each run.
Finally the saved LoRA files' key sets (and shapes) are compared.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

KOHYA_TOKENIZER = "openai_clip-vit-large-patch14"  # strategy_sd.TOKENIZER_ID with "/" -> "_", as kohya looks it up
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 70), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "grey": (128, 128, 128)}
PROGRESS = {"project": re.compile(r"^training:.*?\|\s*(\d+)/(\d+) \["),  # tqdm bars: "<desc>: 40%|...| 4/10 ["
            "kohya": re.compile(r"^steps:.*?\|\s*(\d+)/(\d+) \[")}


# ---- inputs ---------------------------------------------------------------------------------------------------
def build_checkpoint_here(folder: Path) -> None:
    """webui_memory's SD1.5-size builder, with SD1's real VAE (kohya's loader has the SD1 VAE sizes built in)."""
    from unittest import mock

    from diffusers import AutoencoderKL
    from webui_memory import build_checkpoint

    import lora_trainer.backbones.tiny as tiny
    from lora_trainer.backbones.family_configs import BUNDLED

    sd_vae = {k: v for k, v in AutoencoderKL.load_config(str(BUNDLED / "sd1" / "vae")).items() if not k.startswith("_")}
    with mock.patch.object(tiny, "TINY_VAE", sd_vae):
        build_checkpoint("sd15", folder)


def prepare(work: Path, resolution: int, images: int) -> Dict[str, Path]:
    model_dir = work / "model"
    checkpoint, done = model_dir / "sd15.safetensors", model_dir / ".complete"
    if not done.is_file():
        print(f"building a random-weight SD1.5-size checkpoint in {model_dir} (once; ~12 GB RAM, a few minutes)",
              flush=True)
        shutil.rmtree(model_dir, ignore_errors=True)
        model_dir.mkdir(parents=True)
        subprocess.run([sys.executable, __file__, "--build-checkpoint", str(model_dir)], check=True)
        done.write_text("ok\n")

    tokenizers = work / "tokenizers"
    if not (tokenizers / KOHYA_TOKENIZER).is_dir():
        from lora_trainer.backbones.tokenizer_files import clip_tokenizer_dir

        tmp = tokenizers / (KOHYA_TOKENIZER + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(clip_tokenizer_dir(), tmp)
        os.rename(tmp, tokenizers / KOHYA_TOKENIZER)

    data = work / f"data_{resolution}px_{images}"
    if not (data / ".complete").is_file():
        from PIL import Image, ImageDraw

        shutil.rmtree(data, ignore_errors=True)
        sub = data / "1_bench"  # kohya's <repeats>_<name> folder; the project reads the same convention
        sub.mkdir(parents=True)
        rng = random.Random(0)
        for i in range(images):
            colour, background, shape = rng.choice(list(COLOURS)), rng.choice(list(BACKGROUNDS)), rng.choice(
                ["circle", "square"])
            img = Image.new("RGB", (resolution, resolution), BACKGROUNDS[background])
            r = rng.randint(resolution // 8, resolution // 4)
            cx, cy = rng.randint(r, resolution - r), rng.randint(r, resolution - r)
            (ImageDraw.Draw(img).ellipse if shape == "circle" else ImageDraw.Draw(img).rectangle)(
                [cx - r, cy - r, cx + r, cy + r], fill=COLOURS[colour])
            img.save(sub / f"img_{i:03d}.png")
            (sub / f"img_{i:03d}.txt").write_text(f"bnch, a {colour} {shape}, {background} background\n")
        (data / ".complete").write_text("ok\n")
    return {"checkpoint": checkpoint, "tokenizers": tokenizers, "data": data}


# ---- one run --------------------------------------------------------------------------------------------------
def _tree(root: int) -> List[int]:
    children: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


def _pss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return 0


class TreeMemory(threading.Thread):
    """Peak RSS (every 0.25 s) and PSS (every 1 s: smaps_rollup walks the page tables) summed over the tree.

    The process list is refreshed every second; the polling costs about 1% of one core.
    """

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak_rss, self.peak_pss, self.max_procs = pid, 0, 0, 0
        self.stop = threading.Event()

    def run(self):
        tick, pids = 0, [self.pid]
        while not self.stop.is_set():
            if tick % 4 == 0:
                pids = _tree(self.pid)
                self.max_procs = max(self.max_procs, len(pids))
                self.peak_pss = max(self.peak_pss, sum(_pss(p) for p in pids))
            self.peak_rss = max(self.peak_rss, sum(_rss(p) for p in pids))
            tick += 1
            self.stop.wait(0.25)


def _read_stamped(fd: int, lines: list) -> None:
    """(arrival time of its last byte, text) per piece between \\r / \\n.

    tqdm writes "\\r" + bar, so a bar update ends with no separator: a piece is stamped when its last byte arrived,
    not when the separator that follows it (the next update or log line) arrives.
    """
    buf, buf_t = b"", 0.0
    while True:
        chunk = os.read(fd, 65536)
        now = time.monotonic()
        if not chunk:
            break
        parts = re.split(rb"[\r\n]", buf + chunk)
        first_t = buf_t if buf and chunk[:1] in (b"\r", b"\n") else now
        buf = parts.pop()
        buf_t = now
        lines.extend((first_t if i == 0 else now, p.decode("utf-8", "replace")) for i, p in enumerate(parts)
                     if p.strip())
    if buf.strip():
        lines.append((buf_t, buf.decode("utf-8", "replace")))


def cpu_busy_seconds() -> tuple:
    """(busy, total) CPU seconds of the whole machine so far, all cores, from /proc/stat."""
    with open("/proc/stat") as fh:
        values = [int(v) for v in fh.readline().split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    total = sum(values[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)
    return (total - values[3] - values[4]) / tick, total / tick


def wait_until_idle(limit_s: float, busy_cores: float = 0.3, window_s: float = 5.0) -> float:
    """Wait up to limit_s for a window_s in which the machine used under busy_cores; returns the last reading."""
    deadline, said = time.monotonic() + limit_s, False
    while True:
        b0, _ = cpu_busy_seconds()
        time.sleep(window_s)
        cores = (cpu_busy_seconds()[0] - b0) / window_s
        if cores < busy_cores or time.monotonic() >= deadline:
            return cores
        if not said:
            print(f"  waiting for the machine to go idle ({cores:.1f} cores busy) ...", flush=True)
            said = True


def warm_page_cache(path: Path) -> None:
    with open(path, "rb") as fh:
        while fh.read(1 << 24):
            pass


def run_one(tool: str, cmd: List[str], cwd: Path, env: dict, log_path: Path) -> dict:
    busy0, _ = cpu_busy_seconds()
    launch = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=str(cwd), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines: list = []
    reader = threading.Thread(target=_read_stamped, args=(proc.stdout.fileno(), lines), daemon=True)
    memory = TreeMemory(proc.pid)
    reader.start()
    memory.start()
    _, status, usage = os.wait4(proc.pid, 0)
    exit_t = time.monotonic()
    busy1, _ = cpu_busy_seconds()
    proc.returncode = os.waitstatus_to_exitcode(status)
    memory.stop.set()
    reader.join()
    memory.join()
    proc.stdout.close()
    with open(log_path, "w", encoding="utf-8") as fh:
        for t, text in lines:
            fh.write(f"{t - launch:9.3f}  {text}\n")
    if proc.returncode != 0:
        tail = "\n".join(text for _, text in lines[-30:])
        raise RuntimeError(f"{tool} exited with {proc.returncode}; log {log_path}:\n{tail}")
    step_at: Dict[int, float] = {}
    total = None
    for t, text in lines:
        m = PROGRESS[tool].search(text.strip())
        if m:
            step_at.setdefault(int(m.group(1)), t)
            total = int(m.group(2))
    if not total or total not in step_at or 1 not in step_at:
        raise RuntimeError(f"{tool}: no progress bar steps found in {log_path}")
    done = sorted(k for k in step_at if k >= 1)
    steps = [(step_at[b] - step_at[a]) / (b - a) for a, b in zip(done, done[1:])]
    after = [(round(t - step_at[total], 3), text.strip()[:110]) for t, text in lines
             if t > step_at[total] and not PROGRESS[tool].search(text.strip())]
    return {
        "tool": tool, "wall_s": exit_t - launch, "cpu_s": usage.ru_utime + usage.ru_stime,
        "other_cores": max(0.0, (busy1 - busy0) - (usage.ru_utime + usage.ru_stime)) / (exit_t - launch),
        "to_bar_s": step_at[0] - launch if 0 in step_at else None,
        "to_first_step_s": step_at[1] - launch, "first_step_s": step_at[1] - step_at[0] if 0 in step_at else None,
        "median_step_s": statistics.median(steps) if steps else None,
        "after_last_step_s": exit_t - step_at[total], "maxrss_bytes": usage.ru_maxrss * 1024,
        "tree_peak_rss_bytes": memory.peak_rss, "tree_peak_pss_bytes": memory.peak_pss,
        "max_processes": memory.max_procs, "steps_seen": len(done), "after_last_step_lines": after,
    }


# ---- the two tools --------------------------------------------------------------------------------------------
def project_run(ns, inputs: dict, out: Path, env: dict) -> tuple:
    import yaml

    config = {
        "base_model": str(inputs["checkpoint"]), "train_data_dir": str(inputs["data"]), "caption_extension": ".txt",
        "resolution": ns.resolution, "enable_bucket": False, "network": "lora", "lora_rank": 16, "lora_alpha": 16,
        "train_text_encoder": False, "optimizer": "adamw", "learning_rate": 1e-4, "weight_decay": 0.01,
        "max_grad_norm": 1.0, "lr_scheduler": "constant", "lr_warmup_steps": 0, "max_train_steps": ns.steps,
        "batch_size": ns.batch_size, "seed": 42, "mixed_precision": "no", "save_precision": "fp32",
        "cache_latents": True, "gradient_checkpointing": ns.gradient_checkpointing, "save_steps": 0,
        "sample_at_end": False,  # kohya renders no sample without --sample_prompts; final_check stays at its default
        "output_dir": str(out), "output_name": "bench", "device": "cpu",
    }
    (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    env = dict(env, PYTHONPATH=str(ROOT))
    cmd = [ns.python, "-m", "lora_trainer", "train", "--config", str(out / "config.yaml")]
    return cmd + shlex.split(ns.project_extra), out, env


def kohya_run(ns, inputs: dict, out: Path, env: dict) -> tuple:
    r = ns.resolution
    cmd = [ns.kohya_python, "train_network.py", "--console_log_simple",
           "--pretrained_model_name_or_path", str(inputs["checkpoint"]),
           "--tokenizer_cache_dir", str(inputs["tokenizers"]),
           "--train_data_dir", str(inputs["data"]), "--caption_extension", ".txt", "--resolution", f"{r},{r}",
           "--output_dir", str(out), "--output_name", "bench", "--save_model_as", "safetensors",
           "--save_precision", "float", "--network_module", "networks.lora", "--network_dim", "16",
           "--network_alpha", "16", "--network_train_unet_only", "--optimizer_type", "AdamW",
           "--learning_rate", "1e-4", "--lr_scheduler", "constant", "--max_train_steps", str(ns.steps),
           "--train_batch_size", str(ns.batch_size), "--seed", "42", "--mixed_precision", "no", "--cache_latents",
           "--max_grad_norm", "1.0", "--sdpa"]
    if ns.gradient_checkpointing:
        cmd.append("--gradient_checkpointing")
    cmd += shlex.split(ns.kohya_extra)
    env = {k: v for k, v in env.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return cmd, Path(ns.kohya), env


def lora_file(tool: str, out: Path) -> Path:
    path = out / "bench" / "bench.safetensors" if tool == "project" else out / "bench.safetensors"
    if not path.is_file():
        raise RuntimeError(f"{tool}: no LoRA at {path}")
    return path


def lora_shapes(path: Path) -> Dict[str, tuple]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}


def project_metrics_median(out: Path) -> Optional[float]:
    import csv

    path = out / "bench" / "metrics.csv"
    if not path.is_file():
        return None
    with open(path, newline="") as fh:  # "seconds" is the time since training began, at the end of each step
        seconds = [float(row["seconds"]) for row in csv.DictReader(fh) if row["seconds"]]
    steps = [b - a for a, b in zip(seconds, seconds[1:])]
    return statistics.median(steps) if steps else None


# ---- report ---------------------------------------------------------------------------------------------------
ROWS = [("wall clock, launch -> exit", "wall_s", "s"), ("CPU time (user+sys)", "cpu_s", "s"),
        ("launch -> progress bar shown", "to_bar_s", "s"), ("launch -> step 1 done", "to_first_step_s", "s"),
        ("first step", "first_step_s", "s"), ("median step (steps 2..N)", "median_step_s", "s"),
        ("after the last step -> exit", "after_last_step_s", "s"),
        ("peak RSS, largest process (ru_maxrss)", "maxrss_bytes", "GiB"),
        ("peak PSS, process tree", "tree_peak_pss_bytes", "GiB"),
        ("peak RSS, process tree", "tree_peak_rss_bytes", "GiB"),
        ("other processes' CPU during the run (cores)", "other_cores", "cores")]


def table(results: List[dict]) -> str:
    def med(tool, key):
        values = [r[key] for r in results if r["tool"] == tool and r[key] is not None]
        return statistics.median(values) if values else None

    lines = ["| | project | kohya | project / kohya |", "|---|---|---|---|"]
    for label, key, unit in ROWS:
        a, b = med("project", key), med("kohya", key)
        cells = ["-" if v is None else f"{v / 1024 ** 3:.2f} GiB" if unit == "GiB" else f"{v:.2f} {unit}"
                 for v in (a, b)]
        ratio = f"{a / b:.2f}" if a is not None and b and unit != "cores" else "-"
        lines.append(f"| {label} | {cells[0]} | {cells[1]} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kohya", help="the sd-scripts checkout")
    parser.add_argument("--kohya-python", help="python of kohya's venv")
    parser.add_argument("--python", default=sys.executable, help="python of the project's venv (default: this one)")
    parser.add_argument("--work", type=Path, help="work folder: model, tokenizer, datasets, runs (reused)")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--pairs", type=int, default=1, help="alternating project, kohya runs")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS / MKL_NUM_THREADS for both")
    parser.add_argument("--wait-idle", type=float, default=0, metavar="SECONDS",
                        help="before each run, wait up to this long for 5 s in which other jobs use < 0.3 cores")
    parser.add_argument("--kohya-extra", default="", help="more train_network.py arguments, e.g. "
                        "'--max_data_loader_n_workers 0' (for experiments; the table is for the defaults)")
    parser.add_argument("--project-extra", default="", help="more `lora_trainer train` arguments, e.g. "
                        "'--final_check off'")
    parser.add_argument("--build-checkpoint", type=Path, help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.build_checkpoint:
        build_checkpoint_here(ns.build_checkpoint)
        return
    if not (ns.kohya and ns.kohya_python and ns.work):
        parser.error("--kohya, --kohya-python and --work are required")
    ns.kohya, ns.kohya_python = str(Path(ns.kohya).resolve()), str(Path(ns.kohya_python).absolute())
    work = ns.work.resolve()
    inputs = prepare(work, ns.resolution, ns.images)
    env = dict(os.environ, OMP_NUM_THREADS=str(ns.threads), MKL_NUM_THREADS=str(ns.threads), PYTHONUNBUFFERED="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    tag = f"{ns.resolution}px-b{ns.batch_size}-s{ns.steps}{'-gc' if ns.gradient_checkpointing else ''}"
    tag += "-extra" if ns.kohya_extra or ns.project_extra else ""
    results, loras = [], {}
    for pair in range(ns.pairs):
        for tool, make in (("project", project_run), ("kohya", kohya_run)):
            out = work / "runs" / f"{tag}-{tool}-{pair}"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            cmd, cwd, tool_env = make(ns, inputs, out, env)
            print(f"pair {pair + 1}/{ns.pairs}: {tool} ...", flush=True)
            busy_before = wait_until_idle(ns.wait_idle) if ns.wait_idle else None
            warm_page_cache(inputs["checkpoint"])
            r = run_one(tool, cmd, cwd, tool_env, out / "stamped.log")
            r["pair"], r["busy_cores_before"] = pair, busy_before
            if tool == "project":
                r["metrics_csv_median_step_s"] = project_metrics_median(out)
            loras[tool] = lora_file(tool, out)
            results.append(r)
            print(f"  wall {r['wall_s']:.1f} s, median step {r['median_step_s'] or 0:.2f} s, after last step "
                  f"{r['after_last_step_s']:.1f} s, ru_maxrss {r['maxrss_bytes'] / 2**30:.2f} GiB, other jobs "
                  f"{r['other_cores']:.2f} cores", flush=True)
    (work / f"results-{tag}.json").write_text(json.dumps(results, indent=1))

    a, b = lora_shapes(loras["project"]), lora_shapes(loras["kohya"])
    print(f"\n{ns.resolution} px, batch {ns.batch_size}, {ns.images} images, {ns.steps} steps, rank 16/alpha 16, fp32, "
          f"gradient checkpointing {'on' if ns.gradient_checkpointing else 'off'}, OMP_NUM_THREADS={ns.threads}, "
          f"{ns.pairs} pair(s) (medians):\n")
    print(table(results))
    csv_med = [r["metrics_csv_median_step_s"] for r in results if r.get("metrics_csv_median_step_s")]
    if csv_med:
        print(f"\nproject's metrics.csv, median step 2..N (cross-check): {statistics.median(csv_med):.2f} s")
    same_keys = set(a) == set(b)
    print(f"LoRA keys: project {len(a)}, kohya {len(b)}, same key set: {same_keys}, "
          f"same shapes: {same_keys and all(a[k] == b[k] for k in a)}")
    if not same_keys:
        print(f"  only in project: {sorted(set(a) - set(b))[:6]}\n  only in kohya: {sorted(set(b) - set(a))[:6]}")
    for tool in ("project", "kohya"):
        last = [r for r in results if r["tool"] == tool][-1]
        print(f"\n{tool}, after the last step (seconds after 'N/N' appeared, last run):")
        for t, text in last["after_last_step_lines"][-12:]:
            print(f"  +{t:7.2f}  {text}")


if __name__ == "__main__":
    main()
