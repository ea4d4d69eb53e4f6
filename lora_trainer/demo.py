"""``python -m lora_trainer demo``: the whole pipeline offline on a tiny model, in about a minute.

It builds a tiny SD1-architecture model with a fixed seed, draws a small captioned dataset of
coloured shapes, trains a LoRA on it through the same ``run_training`` as every other front end,
then reloads the saved file and renders the same prompt without and with it.
"""

from __future__ import annotations

import csv
import logging
import random
from pathlib import Path

from PIL import Image, ImageDraw

logger = logging.getLogger("lora_trainer")

TRIGGER = "ltdemo"
COLOURS = {"red": (220, 40, 40), "yellow": (240, 200, 30), "green": (40, 170, 70)}
BACKGROUNDS = {"blue": (30, 60, 160), "black": (15, 15, 20)}


def make_demo_dataset(folder: Path, count: int = 12, seed: int = 0) -> Path:
    """Coloured circles and squares on plain backgrounds, with a metadata.csv of captions."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        colour, background = rng.choice(list(COLOURS)), rng.choice(list(BACKGROUNDS))
        shape = rng.choice(["circle", "square"])
        size = (64, 64) if i % 3 else (96, 64)  # some landscape images, to exercise buckets
        img = Image.new("RGB", size, BACKGROUNDS[background])
        draw = ImageDraw.Draw(img)
        cx, cy, r = rng.randint(24, size[0] - 24), rng.randint(24, 40), rng.randint(10, 18)
        box = [cx - r, cy - r, cx + r, cy + r]
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
        name = f"shape_{i:02d}.png"
        img.save(folder / name)
        rows.append((name, f"a {colour} {shape}, {background} background, flat illustration"))
    with open(folder / "metadata.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["filename", "prompt"])
        writer.writerows(rows)
    return folder


def run_demo(output: Path, steps: int = 150) -> None:
    from .backbones.tiny import save_tiny_sd1
    from .config import TrainConfig
    from .progress import ConsoleProgress
    from .runner import load_standalone_backbone, run_training

    output.mkdir(parents=True, exist_ok=True)
    model_dir = output / "tiny-sd1"
    if not (model_dir / "model_index.json").is_file():
        save_tiny_sd1(0, model_dir)
    data_dir = make_demo_dataset(output / "shapes")
    prompt = f"{TRIGGER}, a red circle, blue background, flat illustration"
    config = TrainConfig.from_dict({
        "base_model": str(model_dir), "train_data_dir": str(data_dir), "output_dir": str(output / "runs"),
        "output_name": "shapes", "resolution": 64, "min_bucket_reso": 32, "max_bucket_reso": 128,
        "bucket_reso_steps": 32, "lora_rank": 8, "learning_rate": 1e-3, "batch_size": 4,
        "max_train_steps": steps, "save_steps": max(steps // 3, 1), "trigger_word": TRIGGER,
        "sample_prompts": [prompt], "sample_every_n_steps": max(steps // 3, 1), "sample_steps": 12,
        "seed": 0, "device": "cpu",
    }, source="demo")
    progress = ConsoleProgress()
    with progress.redirect_logging():
        result = run_training(config, load_standalone_backbone, events=progress.bus)
    comparison = _side_by_side(config, result.lora_path, prompt, result.run_dir / "base_vs_lora.png")
    print(f"\nDemo finished. Run folder: {result.run_dir}")
    print(f"  LoRA file:        {result.lora_path}")
    print(f"  fixed-batch loss: {result.loss_before:.4f} without the LoRA -> {result.loss_after:.4f} with it")
    print(f"  loss chart:       {result.run_dir / 'loss.png'}")
    print(f"  samples:          {result.run_dir / 'samples'}")
    print(f"  base vs LoRA:     {comparison}  (prompt: {prompt!r})")


def _side_by_side(config, lora_path: Path, prompt: str, target: Path) -> Path:
    """Reload the saved file into a fresh model and render the prompt at weight 0 and 1."""
    from .files import write_atomic
    from .lora_file import read_lora_file
    from .network import LoraNetwork
    from .runner import load_standalone_backbone

    backbone = load_standalone_backbone(config)
    network = LoraNetwork(backbone.lora_targets(), config.lora_rank, config.lora_alpha)
    network.load_kohya_state_dict(read_lora_file(lora_path)[0], source=str(lora_path))
    size = (config.resolution * 2, config.resolution * 2)
    images = []
    with network.attached_to_model():
        for weight in (0.0, 1.0):
            with network.multiplier(weight):
                images += backbone.generate([prompt], "", config.sample_seed, 20, 7.0, size)
    canvas = Image.new("RGB", (size[0] * 2 + 8, size[1]), "white")
    canvas.paste(images[0], (0, 0))
    canvas.paste(images[1], (size[0] + 8, 0))
    write_atomic(target, lambda tmp: canvas.save(tmp, format="PNG"))
    return target
