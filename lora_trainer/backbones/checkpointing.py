"""Gradient checkpointing for models we do not own, switched on for the duration of a run.

The original UNets have their own checkpointing (ldm's ``CheckpointFunction``, A1111's
``sd_hijack_checkpoint``) that is reentrant and recomputes gradients only for the block's own
parameters, so a LoRA living outside the block would get none. We turn those flags off and wrap
each UNet block in ``torch.utils.checkpoint`` with ``use_reentrant=False`` instead; everything is
put back on exit.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, List, Tuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

_FLAG_NAMES = ("use_checkpoint", "checkpoint")


@contextlib.contextmanager
def native_checkpointing_off(root: nn.Module) -> Iterator[None]:
    """Set ldm/sgm's boolean checkpoint flags to False, restoring them afterwards."""
    saved: List[Tuple[nn.Module, str, bool]] = []
    for module in root.modules():
        for name in _FLAG_NAMES:
            value = module.__dict__.get(name)
            if isinstance(value, bool) and value:
                saved.append((module, name, value))
                setattr(module, name, False)
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


@contextlib.contextmanager
def checkpointed(blocks: Iterable[nn.Module]) -> Iterator[None]:
    """Run each block's forward under non-reentrant checkpointing while training."""
    wrapped: List[Tuple[nn.Module, bool, object]] = []
    for block in blocks:
        had_own = "forward" in block.__dict__
        original = block.forward

        def forward(*args, _original=original, **kwargs):
            if not torch.is_grad_enabled():
                return _original(*args, **kwargs)
            return checkpoint(_original, *args, use_reentrant=False, **kwargs)

        wrapped.append((block, had_own, block.__dict__.get("forward")))
        block.forward = forward
    try:
        yield
    finally:
        for block, had_own, previous in wrapped:
            if had_own:
                block.forward = previous
            else:
                block.__dict__.pop("forward", None)

