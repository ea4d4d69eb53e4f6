"""How much does our training loop cost on top of the bare maths, and how does it compare with a plain loop?

Prints, measured in one run on the same tiny SD1 model and the same images:
  1. our median step time / the bare UNet forward+backward+AdamW step on the same cached batch, same LoRA
     (1.0 is the lower limit: no overhead at all);
  2. our steps/s / a plain diffusers+peft loop that loads, encodes and text-encodes every batch (no caching).

The three loops are interleaved in chunks of --chunk steps (ours, bare, plain, ours, bare, plain, ...), so a shared
machine's slow and fast moments hit all three alike: our training runs as usual and, each --chunk steps, its
Progress handler advances the other two loops (generators) by --chunk steps; the time spent there is not counted
in our step. Medians are over all chunks' steps after the first --warm steps of each loop.

    .venv/bin/python benchmarks/step_overhead.py [--steps 60] [--batch 4] [--resolution 64] [--chunk 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, List

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


def ours(model_dir: Path, data_dir: Path, out: Path, steps: int, batch: int, resolution: int, chunk: int,
         between: Callable[[], None]) -> List[float]:
    """Our full training run; every ``chunk`` steps it calls ``between()`` (the other loops' turn), not timed."""
    config = TrainConfig.from_dict({
        "base_model": str(model_dir), "train_data_dir": str(data_dir), "output_dir": str(out), "output_name": "b",
        "resolution": resolution, "enable_bucket": False, "lora_rank": 8, "batch_size": batch,
        "max_train_steps": steps, "sample_steps": 1, "device": "cpu", "seed": 0})
    times, events, resumed = [], EventBus(), [None]

    def on_event(event: object) -> None:
        if not isinstance(event, Progress):
            return
        now = time.perf_counter()
        if resumed[0] is not None:  # the step from the previous report (or the end of the others' turn) to this one
            times.append(now - resumed[0])
        if event.step % chunk == 0 or event.step == event.total_steps:
            between()
        resumed[0] = time.perf_counter()

    events.subscribe(on_event)
    run_training(config, lambda c: load_backbone_from_path(c.base_model), events)
    return times


def bare(model_dir: Path, steps: int, batch: int, resolution: int) -> Iterator[float]:
    backbone = load_backbone_from_path(str(model_dir))
    latent_size = resolution // 8
    latents = torch.randn(batch, 4, latent_size, latent_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cond = backbone.encode_prompts(["a red circle, blue background"] * batch)
    network = LoraNetwork(backbone.lora_targets(), 8, seed=0)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4, weight_decay=0.01)
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
            yield time.perf_counter() - t0


def plain_diffusers_peft(model_dir: Path, data_dir: Path, steps: int, batch: int, resolution: int) -> Iterator[float]:
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
        yield time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=5, help="steps per turn of each loop")
    parser.add_argument("--warm", type=int, default=5, help="first steps of each loop not counted")
    ns = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        save_tiny_sd1(0, root / "model")
        data = make_demo_dataset(root / "data", count=12)
        others = {"bare": bare(root / "model", ns.steps, ns.batch, ns.resolution),
                  "plain": plain_diffusers_peft(root / "model", data, ns.steps, ns.batch, ns.resolution)}
        other_t = {name: [] for name in others}

        def between() -> None:  # the other loops' turn: --chunk steps each, in a fixed order
            for name, loop in others.items():
                for _ in range(ns.chunk):
                    value = next(loop, None)
                    if value is not None:
                        other_t[name].append(value)

        ours_t = ours(root / "model", data, root / "out", ns.steps, ns.batch, ns.resolution, ns.chunk, between)
        for name, loop in others.items():  # finish the others (they close their models)
            other_t[name].extend(loop)
    # step number -> seconds; ours has no step 1 (its time runs from one report to the next)
    by_step = {"ours": dict(enumerate(ours_t, start=2)), "bare": dict(enumerate(other_t["bare"], start=1)),
               "plain": dict(enumerate(other_t["plain"], start=1))}
    counted = {name: {k: v for k, v in t.items() if k > ns.warm} for name, t in by_step.items()}  # lazy allocations
    ours_med, bare_med, plain_med = (statistics.median(counted[n].values()) for n in ("ours", "bare", "plain"))
    ratios = []  # ours / bare per turn (steps (k-1)*chunk+1 .. k*chunk ran back to back)
    for turn in sorted({(k - 1) // ns.chunk for k in counted["ours"]}):
        a, b = ([v for k, v in counted[n].items() if (k - 1) // ns.chunk == turn] for n in ("ours", "bare"))
        if a and b:
            ratios.append(statistics.median(a) / statistics.median(b))
    print(f"tiny SD1, {ns.resolution}px, batch {ns.batch}, rank 8, {ns.steps} steps in turns of {ns.chunk}, "
          f"{torch.get_num_threads()} CPU threads")
    print(f"median step: ours {ours_med * 1000:.1f} ms, bare UNet fwd+bwd+AdamW {bare_med * 1000:.1f} ms, "
          f"plain diffusers+peft {plain_med * 1000:.1f} ms")
    print(f"ours / bare step time:            {ours_med / bare_med:.3f}  (1.0 = no loop overhead; per turn "
          f"{min(ratios):.3f}-{max(ratios):.3f})")
    print(f"ours / plain diffusers+peft speed: {plain_med / ours_med:.2f}x steps/s")


if __name__ == "__main__":
    main()
