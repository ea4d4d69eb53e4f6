"""How much does our training loop cost on top of the bare maths, and how does it compare with a plain loop?

Prints, measured in one run on the same tiny SD1 model and the same images:
  1. our median step time / the bare UNet forward+backward+AdamW step on the same cached batch, same LoRA
     (1.0 is the lower limit: no overhead at all);
  2. our steps/s / a plain diffusers+peft loop that loads, encodes and text-encodes every batch (no caching).

    .venv/bin/python benchmarks/step_overhead.py [--steps 60] [--batch 4] [--resolution 64]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_trainer.backbones.single_file import load_backbone_from_path  # noqa: E402
from lora_trainer.backbones.tiny import save_tiny_sd1  # noqa: E402
from lora_trainer.config import TrainConfig  # noqa: E402
from lora_trainer.demo import make_demo_dataset  # noqa: E402
from lora_trainer.diffusion import add_noise, diffusion_loss, noise_generator, sample_noise, sample_timesteps  # noqa: E402
from lora_trainer.events import EventBus, Progress  # noqa: E402
from lora_trainer.network import LoraNetwork  # noqa: E402
from lora_trainer.runner import run_training  # noqa: E402

PEFT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]


def ours(model_dir: Path, data_dir: Path, out: Path, steps: int, batch: int, resolution: int) -> list:
    config = TrainConfig.from_dict({
        "base_model": str(model_dir), "train_data_dir": str(data_dir), "output_dir": str(out), "output_name": "b",
        "resolution": resolution, "enable_bucket": False, "lora_rank": 8, "batch_size": batch,
        "max_train_steps": steps, "sample_steps": 1, "device": "cpu", "seed": 0})
    times, events = [], EventBus()
    events.subscribe(lambda e: times.append(time.perf_counter()) if isinstance(e, Progress) else None)
    run_training(config, lambda c: load_backbone_from_path(c.base_model), events)
    return [b - a for a, b in zip(times, times[1:])]


def bare(model_dir: Path, steps: int, batch: int, resolution: int) -> list:
    backbone = load_backbone_from_path(str(model_dir))
    latent_size = resolution // 8
    latents = torch.randn(batch, 4, latent_size, latent_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cond = backbone.encode_prompts(["a red circle, blue background"] * batch)
    network = LoraNetwork(backbone.lora_targets(), 8, seed=0)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4, weight_decay=0.01)
    times = []
    with backbone.borrow(), network.attached_to_model():
        for step in range(steps):
            t0 = time.perf_counter()
            generator = noise_generator(0, step)
            noise = sample_noise(latents, generator)
            t = sample_timesteps(batch, generator)
            pred = backbone.predict(add_noise(latents, noise, t, backbone.alphas_cumprod), t, cond)
            diffusion_loss(pred, noise).backward()
            torch.nn.utils.clip_grad_norm_(network.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
    return times


def plain_diffusers_peft(model_dir: Path, data_dir: Path, steps: int, batch: int, resolution: int) -> list:
    """What a from-scratch diffusers + peft script does: everything from the files, every step."""
    import csv

    import numpy as np
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from peft import LoraConfig
    from PIL import Image

    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), local_files_only=True, safety_checker=None,
                                                   requires_safety_checker=False)
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian", target_modules=PEFT_TARGETS))
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    with open(data_dir / "metadata.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        chosen = [rows[(step * batch + i) % len(rows)] for i in range(batch)]
        pixels = []
        for row in chosen:
            img = Image.open(data_dir / row["filename"]).convert("RGB").resize((resolution, resolution))
            pixels.append(torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1))
        with torch.no_grad():
            latents = vae.encode(torch.stack(pixels)).latent_dist.sample() * vae.config.scaling_factor
            ids = tokenizer([r["prompt"] for r in chosen], padding="max_length", max_length=77, truncation=True,
                            return_tensors="pt").input_ids
            cond = text_encoder(ids)[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (batch,))
        pred = unet(scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=cond).sample
        torch.nn.functional.mse_loss(pred.float(), noise.float()).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=64)
    ns = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        save_tiny_sd1(0, root / "model")
        data = make_demo_dataset(root / "data", count=12)
        warm = 5  # the first steps include lazy allocations in every loop alike
        ours_t = ours(root / "model", data, root / "out", ns.steps, ns.batch, ns.resolution)[warm:]
        bare_t = bare(root / "model", ns.steps, ns.batch, ns.resolution)[warm:]
        plain_t = plain_diffusers_peft(root / "model", data, ns.steps, ns.batch, ns.resolution)[warm:]
    ours_med, bare_med, plain_med = (statistics.median(x) for x in (ours_t, bare_t, plain_t))
    print(f"tiny SD1, {ns.resolution}px, batch {ns.batch}, rank 8, {ns.steps} steps, "
          f"{torch.get_num_threads()} CPU threads")
    print(f"median step: ours {ours_med * 1000:.1f} ms, bare UNet fwd+bwd+AdamW {bare_med * 1000:.1f} ms, "
          f"plain diffusers+peft {plain_med * 1000:.1f} ms")
    print(f"ours / bare step time:            {ours_med / bare_med:.3f}  (1.0 = no loop overhead)")
    print(f"ours / plain diffusers+peft speed: {plain_med / ours_med:.2f}x steps/s")


if __name__ == "__main__":
    main()
