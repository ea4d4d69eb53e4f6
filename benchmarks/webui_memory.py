"""Training on the WebUI's loaded model vs loading the checkpoint again, on an SD1-layout model.

Prints, each mode measured in its own process:
  - resident memory growth while training, as a fraction of the model's parameter bytes
    (a trainer that loads a second copy of the model pays 100% or more);
  - seconds from Start to the first training step.

  inplace: the checkpoint is already loaded the way A1111 loads it (the real ldm classes, see
           tests/standins/a1111.py) and trained through lora_trainer.backbones.a1111;
  disk:    the same checkpoint loaded from disk by the standalone backbone, as a separate trainer would.

    .venv/bin/python benchmarks/webui_memory.py [--size small|sd15] [--steps 3]

``small`` is SD1's layout at 128 base channels (~0.2 B params); ``sd15`` is SD1.5's real size (needs ~12 GB RAM).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

SIZES = {
    "small": dict(block_out_channels=(128, 256, 512, 512), text_hidden=512, text_layers=6, heads=8),
    "sd15": dict(block_out_channels=(320, 640, 1280, 1280), text_hidden=768, text_layers=12, heads=8),
}


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096


class PeakRss:
    def __init__(self):
        self.peak, self._stop = rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.02)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def build_checkpoint(size: str, folder: Path) -> Path:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from lora_trainer.backbones.diffusers_sd import DiffusersSDBackbone
    from lora_trainer.backbones.tiny import TINY_VAE, save_tiny_sd1_single_file, sd1_scheduler_config
    from lora_trainer.backbones.tokenizer_files import clip_tokenizer_dir

    spec = SIZES[size]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=spec["block_out_channels"], layers_per_block=2, cross_attention_dim=spec["text_hidden"],
        attention_head_dim=spec["heads"], sample_size=64,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=spec["text_hidden"], intermediate_size=spec["text_hidden"] * 4,
                                        num_hidden_layers=spec["text_layers"], num_attention_heads=8,
                                        max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu"))
    backbone = DiffusersSDBackbone(unet, AutoencoderKL(**TINY_VAE), text,
                                   CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir())), sd1_scheduler_config())
    path = folder / f"{size}.safetensors"
    save_tiny_sd1_single_file(backbone, path)
    return path


def measure(mode: str, checkpoint: Path, steps: int) -> dict:
    from lora_trainer.config import TrainConfig
    from lora_trainer.demo import make_demo_dataset
    from lora_trainer.events import EventBus, Progress
    from lora_trainer.runner import load_standalone_backbone, run_training

    work = Path(tempfile.mkdtemp())
    data = make_demo_dataset(work / "data", count=4)
    config = TrainConfig.from_dict({
        "base_model": str(checkpoint), "model_config": str(checkpoint.with_name(checkpoint.stem + "_config")),
        "train_data_dir": str(data), "output_dir": str(work / "out"), "resolution": 64, "enable_bucket": False,
        "lora_rank": 16, "batch_size": 1, "max_train_steps": steps, "sample_steps": 1, "device": "cpu"})
    if mode == "inplace":
        from standins.a1111 import load_ldm_model

        from lora_trainer.backbones.a1111 import A1111Backbone

        model = load_ldm_model(checkpoint)
        param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

        def load(c):
            return A1111Backbone(model)
    else:
        param_bytes = None

        def load(c):
            return load_standalone_backbone(c)

    first_step, events = {}, EventBus()
    events.subscribe(lambda e: first_step.setdefault("t", time.perf_counter()) if isinstance(e, Progress) else None)
    base = rss_bytes()
    with PeakRss() as peak:
        start = time.perf_counter()
        backbone_holder = {}

        def loader(c):
            backbone_holder["b"] = load(c)
            return backbone_holder["b"]

        run_training(config, loader, events)
    if param_bytes is None:
        param_bytes = sum(p.numel() * p.element_size() for part in ("unet", "vae", "text_encoder")
                          for p in getattr(backbone_holder["b"], part).parameters())
    return {"mode": mode, "param_bytes": param_bytes, "growth_bytes": peak.peak - base,
            "seconds_to_first_step": first_step["t"] - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--mode", choices=("inplace", "disk"), help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.mode:  # one measurement, in a fresh process
        print(json.dumps(measure(ns.mode, Path(ns.checkpoint), ns.steps)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = build_checkpoint(ns.size, Path(tmp))
        results = {}
        for mode in ("inplace", "disk"):
            out = subprocess.run([sys.executable, __file__, "--mode", mode, "--checkpoint", str(checkpoint),
                                  "--steps", str(ns.steps)], capture_output=True, text=True, check=True)
            results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    gib = 1024 ** 3
    model = results["inplace"]["param_bytes"]
    print(f"model: SD1 layout '{ns.size}', {model / gib:.2f} GiB of parameters (fp32), {ns.steps} steps at 64 px")
    for mode, label in (("inplace", "on the loaded model"), ("disk", "loading the checkpoint")):
        r = results[mode]
        print(f"{label:24s} RSS growth {r['growth_bytes'] / gib:6.2f} GiB = {r['growth_bytes'] / model:6.1%} of the "
              f"model; Start -> first step {r['seconds_to_first_step']:6.1f} s")
    speedup = results["disk"]["seconds_to_first_step"] / results["inplace"]["seconds_to_first_step"]
    print(f"start-up speed-up: {speedup:.1f}x")


if __name__ == "__main__":
    main()
