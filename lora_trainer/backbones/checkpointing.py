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



def _copy_input_when_training(_module: nn.Module, args: tuple):
    x = args[0]
    if torch.is_grad_enabled() and x.requires_grad:
        return (x.clone(),) + tuple(args[1:])
    return None


@contextlib.contextmanager
def norm_inputs_copied(root: nn.Module, block_class: str = "BasicTransformerBlock",
                       norms: Tuple[str, ...] = ("norm_in", "norm1", "norm2")) -> Iterator[None]:
    """Give each transformer block's LayerNorms a copy of their input while gradients are recorded.

    Forge's ``BasicTransformerBlock._forward`` adds the attention output to the residual in place
    (``n = self.norm1(x); ...; x += n``). LayerNorm keeps its input for the backward pass, so once a LoRA makes
    ``x`` require grad, autograd refuses the modified tensor ("modified by an inplace operation"). A copy
    per norm costs what ldm's out-of-place ``x = attn(norm(x)) + x`` costs; nothing changes without gradients.
    """
    handles = []
    for module in root.modules():
        if type(module).__name__ != block_class:
            continue
        for name in norms:
            norm = getattr(module, name, None)
            if isinstance(norm, nn.LayerNorm):
                handles.append(norm.register_forward_pre_hook(_copy_input_when_training))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
