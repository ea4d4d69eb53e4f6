"""A rough estimate of training time and GPU memory, shown before Start. It is a guess, and says so.

    seconds = steps x batch_size x (resolution / native)^2 / it_per_s[family, device] x (1 + rank / 512)
              + images x encode_s[device]                        (caching latents once)
    memory  = model_gib[family]                                   (weights, fp16 on a GPU, fp32 on a CPU)
              + act_gib[family] x batch_size x (resolution / native)^2 x (0.45 with gradient checkpointing)
              + rank x lora_mib_per_rank[family] x 16 bytes/4     (LoRA weights, gradients, two AdamW moments)

``it_per_s`` is one batch-1 step at the family's native resolution (SD1 512 px, SDXL 1024 px) on a mid-range
GPU (an RTX 3060-class card), and on a desktop CPU; real numbers vary by 2-3x either way.
"""

from __future__ import annotations

from dataclasses import dataclass

NATIVE = {"sd1": 512, "sd2": 768, "sdxl": 1024}
IT_PER_S = {("sd1", "gpu"): 2.5, ("sd2", "gpu"): 1.2, ("sdxl", "gpu"): 0.8,
            ("sd1", "cpu"): 0.04, ("sd2", "cpu"): 0.015, ("sdxl", "cpu"): 0.008}
ENCODE_S = {"gpu": 0.05, "cpu": 1.0}
MODEL_GIB = {"sd1": 2.1, "sd2": 2.6, "sdxl": 6.9}
ACT_GIB = {"sd1": 2.5, "sd2": 3.5, "sdxl": 7.0}
LORA_MIB_PER_RANK = {"sd1": 0.55, "sd2": 0.6, "sdxl": 1.4}  # fp32 MiB of LoRA weights per unit of rank


@dataclass(frozen=True)
class Estimate:
    seconds: float
    memory_gib: float
    text: str


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def estimate_run(family: str, device: str, num_images: int, steps: int, resolution: int, rank: int,
                 batch_size: int = 1, gradient_checkpointing: bool = False) -> Estimate:
    family = family if family in NATIVE else "sd1"
    device = "gpu" if device in ("gpu", "cuda") else "cpu"
    area = (resolution / NATIVE[family]) ** 2
    step_s = batch_size * area / IT_PER_S[(family, device)] * (1 + rank / 512)
    seconds = steps * step_s + num_images * ENCODE_S[device] * area
    act = ACT_GIB[family] * batch_size * area * (0.45 if gradient_checkpointing else 1.0)
    memory = MODEL_GIB[family] * (1 if device == "gpu" else 2) + act + rank * LORA_MIB_PER_RANK[family] * 4 / 1024
    where = "GPU memory" if device == "gpu" else "memory"
    text = (f"Estimate (a rough guess, see lora_trainer/ui/estimate.py): about {_duration(seconds)} for {steps} "
            f"steps on {'a GPU' if device == 'gpu' else 'the CPU'}, about {memory:.1f} GiB of {where} "
            f"({family.upper()}, {num_images} images, {resolution} px, batch {batch_size}, rank {rank}).")
    return Estimate(seconds, memory, text)
