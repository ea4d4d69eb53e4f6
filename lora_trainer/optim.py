"""Optimizer and learning-rate schedule for the LoRA parameters.

The schedules are short LambdaLR closures rather than diffusers' ``get_scheduler`` because the
engine must not import diffusers inside A1111 (see DESIGN invariant 3).
"""

from __future__ import annotations

import math
from typing import Iterable, List

import torch

from .errors import ConfigError


def parameter_groups(params: Iterable) -> List[dict]:
    """Parameters, or torch-style groups (``{"params": [...], "lr": ...}``), as non-empty groups of trainable
    parameters. A group without its own ``lr`` takes the optimizer's ``learning_rate``."""
    items = list(params)
    if items and all(isinstance(item, dict) for item in items):
        groups = [{**group, "params": [p for p in group["params"] if p.requires_grad]} for group in items]
    else:
        groups = [{"params": [p for p in items if p.requires_grad]}]
    return [group for group in groups if group["params"]]


def build_optimizer(params: Iterable, name: str, learning_rate: float, weight_decay: float) -> torch.optim.Optimizer:
    """``params``: parameters, or parameter groups each with its own ``lr`` (UNet and text encoder)."""
    params = parameter_groups(params)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except Exception:  # bitsandbytes raises more than ImportError when its binaries don't fit
            raise ConfigError("optimizer 'adamw8bit' needs bitsandbytes with a GPU: `pip install bitsandbytes`, "
                              "or use optimizer: adamw") from None
        return bnb.optim.AdamW8bit(params, lr=learning_rate, weight_decay=weight_decay)
    if name == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise ConfigError("optimizer 'prodigy' needs prodigyopt: `pip install prodigyopt`, "
                              "or use optimizer: adamw") from None
        return Prodigy(params, lr=learning_rate, weight_decay=weight_decay)
    raise ConfigError(f"unknown optimizer {name!r}")


def lr_lambda(name: str, warmup_steps: int, total_steps: int, num_cycles: int = 1):
    """Multiplier of the base learning rate at each optimizer step, for ``name``."""
    total_steps = max(total_steps, 1)

    def warmup(step: int) -> float:
        return (step + 1) / (warmup_steps + 1)

    def progress(step: int) -> float:
        return min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))

    def schedule(step: int) -> float:
        if name != "constant" and step < warmup_steps:
            return warmup(step)
        if name in ("constant", "constant_with_warmup"):
            return 1.0
        p = progress(step)
        if name in ("linear", "polynomial"):
            return max(0.0, 1.0 - p)
        if name == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * p))
        if name == "cosine_with_restarts":
            if p >= 1.0:
                return 0.0
            return 0.5 * (1.0 + math.cos(math.pi * ((num_cycles * p) % 1.0)))
        raise ConfigError(f"unknown lr_scheduler {name!r}")

    return schedule


def build_lr_scheduler(optimizer: torch.optim.Optimizer, name: str, warmup_steps: int, total_steps: int,
                       num_cycles: int = 1) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(name, warmup_steps, total_steps, num_cycles))
