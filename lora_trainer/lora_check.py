"""Does the LoRA work? A cheap check after every finished run (``final_check``).

quick (the default) checks the weights (NaN, infinite, all zero) and records the fixed-batch loss the loop measured
with and without the LoRA. full also renders the strength sweep: the same seed and prompt with the LoRA at 0, 0.25,
0.5, 0.75, 1.0 and the preferred weight, in a few sampling steps, saved as ``strength_sweep.png`` in the run folder.
Both write their findings to ``lora_check.json``. A warning is logged and returned when the weights are NaN,
infinite or all zero, or (full) when the LoRA barely changes the image at the preferred weight.
"""

from __future__ import annotations

import io
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .errors import UserError
from .files import write_bytes_atomic, write_text_atomic

logger = logging.getLogger("lora_trainer")

SWEEP_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)
SWEEP_STEPS = 8  # enough for the picture to take shape; the sweep must stay cheap
MIN_MEAN_CHANGE = 1.0 / 255.0  # mean absolute pixel change (0..1) below which the LoRA "barely changes" the image
SWEEP_FILE = "strength_sweep.png"
REPORT_FILE = "lora_check.json"
PRODUCT_FACTORS = ("lora_up.weight", "lora_down.weight", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b",
                   "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")


@dataclass
class LoraCheck:
    warnings: List[str] = field(default_factory=list)
    preferred_weight: float = 1.0
    mean_change: Optional[float] = None  # mean |image(preferred) - image(0)|, pixels in 0..1
    changes: Dict[str, float] = field(default_factory=dict)  # weight -> mean change against weight 0
    sweep_path: Optional[Path] = None
    fixed_batch_loss: Dict[str, Optional[float]] = field(default_factory=dict)  # without_lora / with_lora

    def to_dict(self) -> Dict[str, object]:
        data = asdict(self)
        data["sweep_path"] = str(self.sweep_path) if self.sweep_path else None
        return data


def weight_problems(tensors: Dict[str, torch.Tensor]) -> List[str]:
    """Warnings for NaN/inf weights and layers that do nothing: a layer's change is a product of its factors
    (``up @ down``; LoHa's Hadamard and LoKr's Kronecker products), so one all-zero factor makes it zero."""
    bad = sorted({k.split(".", 1)[0] for k, v in tensors.items() if not bool(torch.isfinite(v).all())})
    ups: Dict[str, List[torch.Tensor]] = {}  # layer -> the factors its change is a product of
    for key, value in tensors.items():
        name, _, suffix = key.partition(".")
        if suffix in PRODUCT_FACTORS:
            ups.setdefault(name, []).append(value)
    zero = sorted(name for name, factors in ups.items() if any(not bool(f.any()) for f in factors))
    # A text encoder's last layers stay at zero when the model reads an earlier layer's output (SDXL's CLIP-L
    # penultimate, clip_skip): expected, so only UNet layers count for the "some layers are zero" warning.
    some_zero = [name for name in zero if not name.startswith("lora_te")]
    out = []
    if bad:
        out.append(f"{len(bad)} of {len(ups)} LoRA layers hold NaN or infinite weights (first: {bad[0]}); the file is "
                   "unusable: lower learning_rate or use mixed_precision bf16/no and train again")
    if ups and len(zero) == len(ups):
        out.append("every LoRA weight is zero: the LoRA changes nothing (learning_rate 0, or no step was trained)")
    elif some_zero:
        out.append(f"{len(some_zero)} of {len(ups)} LoRA layers are all zero (first: {some_zero[0]}); they change "
                   "nothing")
    return out


def mean_change(a, b) -> float:
    """Mean absolute difference of two PIL images, pixels scaled to 0..1."""
    import numpy as np

    x = np.asarray(a.convert("RGB"), dtype=np.float32)
    y = np.asarray(b.convert("RGB"), dtype=np.float32)
    if x.shape != y.shape:
        return float("nan")
    return float(np.abs(x - y).mean() / 255.0)


def sweep_grid(images: Sequence, labels: Sequence[str]):
    """One row of images with a caption strip under each."""
    from PIL import Image, ImageDraw

    width, height = images[0].size
    strip = 14
    grid = Image.new("RGB", (width * len(images), height + strip), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, (image, label) in enumerate(zip(images, labels)):
        grid.paste(image.convert("RGB"), (i * width, 0))
        draw.text((i * width + 3, height + 1), label, fill=(0, 0, 0))
    return grid


def render_sweep(backbone, network, prompt: str, negative_prompt: str, seed: int, steps: int,
                 guidance_scale: float, size: Tuple[int, int], weights: Sequence[float]) -> Dict[float, object]:
    """weight -> image, same seed and prompt, with the attached ``network`` at each weight."""
    images = {}
    for weight in weights:
        with network.multiplier(weight):
            images[weight] = backbone.generate([prompt], negative_prompt, seed, steps, guidance_scale, size)[0]
    return images


def check_lora(backbone, network, prompt: str, negative_prompt: str, seed: int, guidance_scale: float,
               size: Tuple[int, int], preferred_weight: float, out_dir: Optional[Path] = None,
               steps: int = SWEEP_STEPS) -> LoraCheck:
    """Sweep the attached ``network``'s strength; warn when it barely changes the image or its weights are bad."""
    result = LoraCheck(warnings=weight_problems(network.kohya_state_dict()), preferred_weight=preferred_weight)
    weights = sorted(set(SWEEP_WEIGHTS) | {float(preferred_weight)})
    images = render_sweep(backbone, network, prompt, negative_prompt, seed, steps, guidance_scale, size, weights)
    result.changes = {f"{w:g}": mean_change(images[0.0], images[w]) for w in weights}
    result.mean_change = result.changes[f"{float(preferred_weight):g}"]
    if preferred_weight != 0 and not result.mean_change >= MIN_MEAN_CHANGE:
        result.warnings.append(
            f"the LoRA barely changes the image at weight {preferred_weight:g} (mean pixel change "
            f"{result.mean_change * 255:.2f}/255, seed {seed}); train longer, raise learning_rate or check that "
            "the prompt uses the trigger word")
    if out_dir is not None:
        grid = sweep_grid([images[w] for w in SWEEP_WEIGHTS], [f"weight {w:g}" for w in SWEEP_WEIGHTS])
        buffer = io.BytesIO()
        grid.save(buffer, format="PNG")
        result.sweep_path = write_bytes_atomic(Path(out_dir) / SWEEP_FILE, buffer.getvalue())
        write_text_atomic(Path(out_dir) / REPORT_FILE, json.dumps(result.to_dict(), indent=2) + "\n")
    for warning in result.warnings:
        logger.warning("LoRA check: %s", warning)
    return result


def check_weights(network, preferred_weight: float, run_dir: Path,
                  fixed_batch_loss: Optional[Dict[str, float]] = None) -> LoraCheck:
    """The quick check (``final_check: quick``): the weights themselves, and the fixed-batch losses the loop
    measured, written to ``lora_check.json``; no image is rendered."""
    losses = {k: (v if math.isfinite(v) else None) for k, v in (fixed_batch_loss or {}).items()}  # JSON has no NaN
    result = LoraCheck(warnings=weight_problems(network.kohya_state_dict()), preferred_weight=preferred_weight,
                       fixed_batch_loss=losses)
    write_text_atomic(Path(run_dir) / REPORT_FILE, json.dumps(result.to_dict(), indent=2) + "\n")
    for warning in result.warnings:
        logger.warning("LoRA check: %s", warning)
    return result


def check_trained_lora(network, backbone, config, run_dir: Path, caption: str = "") -> LoraCheck:
    """The check after a run, with the config's sample settings (the first sample prompt, else ``caption``).

    A failure of the check itself never fails the finished run: it becomes a warning.
    """
    prompt = config.sample_prompts[0] if config.sample_prompts else ", ".join(
        p for p in (config.trigger_word.strip(), caption.strip()) if p)
    size = (config.resolution, config.resolution)
    try:
        return check_lora(backbone, network, prompt, config.sample_negative_prompt, config.sample_seed,
                          config.sample_guidance_scale, size, config.preferred_weight, run_dir,
                          steps=min(SWEEP_STEPS, config.sample_steps))
    except (UserError, RuntimeError, ValueError, OSError) as exc:
        logger.debug("LoRA check failed", exc_info=True)
        reason = (str(exc).splitlines() or [""])[0][:160]
        message = f"the strength sweep could not run ({type(exc).__name__}: {reason})"
        logger.warning("LoRA check: %s", message)
        return LoraCheck(warnings=weight_problems(network.kohya_state_dict()) + [message],
                         preferred_weight=config.preferred_weight)
