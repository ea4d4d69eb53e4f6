"""LoRA modules attached to a borrowed model, kept outside its module tree.

We use lycoris-lora's ``LoConModule`` (LoRA for Linear layers, LoCon for convs): it attaches by
replacing ``forward`` on the original layer and holds the layer in a plain list, so the base
model's parameters, state_dict and ``.to()`` moves are untouched (DESIGN invariant 1). The
WebUI's ``--medvram`` hooks and Forge's memory manager move base modules around; our parameters
live in this network, which the trainer places itself.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, Optional, Tuple

import torch
from torch import nn

from .errors import ModelError

LORA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")


def is_conv_kxk(module: nn.Module) -> bool:
    """A conv with a kernel larger than 1x1: trained at ``conv_rank`` (LoCon), as kohya does."""
    return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) != (1, 1)


class LoraNetwork(nn.Module):
    """One LoRA module per target layer, named with kohya's module names."""

    def __init__(self, targets: Dict[str, nn.Module], rank: int, alpha: Optional[float] = None,
                 conv_rank: Optional[int] = None, conv_alpha: Optional[float] = None, seed: int = 0):
        super().__init__()
        from lycoris.modules.locon import LoConModule

        if not targets:
            raise ModelError("the model has no layers LoRA can attach to; is it a Stable Diffusion checkpoint?")
        conv_rank = conv_rank or rank
        self.modules_by_name = nn.ModuleDict()
        # Fork the RNG so initial weights depend only on ``seed``, not on what ran before.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for name, layer in targets.items():
                conv = is_conv_kxk(layer)
                dim = conv_rank if conv else rank
                a = (conv_alpha if conv else alpha)
                a = float(dim if a is None else a)
                # bypass_mode: y = W x + up(down(x)) * scale, never materialising W + dW.
                module = LoConModule(name, _lycoris_view(layer), 1.0, dim, a, bypass_mode=True)
                _point_at(module, layer)
                self.modules_by_name[name] = module
        self.attached = False

    # -- attaching -----------------------------------------------------------------------------
    def attach(self) -> None:
        # Remember which layers had an instance-level forward, so detach leaves no trace: a leftover
        # bound ``forward`` would shadow class-level patches such as A1111's lora_patches.
        self._had_forward = [("forward" in m.org_module[0].__dict__) for m in self.modules_by_name.values()]
        for module in self.modules_by_name.values():
            module.apply_to()
        self.attached = True

    def detach(self) -> None:
        modules = list(self.modules_by_name.values())
        for module in reversed(modules):
            module.restore()
        for module, had_forward in zip(modules, self._had_forward):
            layer = module.org_module[0]
            if not had_forward:
                layer.__dict__.pop("forward", None)
        self.attached = False

    @contextlib.contextmanager
    def attached_to_model(self) -> Iterator[LoraNetwork]:
        self.attach()
        try:
            yield self
        finally:
            self.detach()

    def set_multiplier(self, multiplier: float) -> None:
        for module in self.modules_by_name.values():
            module.multiplier = multiplier

    @contextlib.contextmanager
    def multiplier(self, value: float) -> Iterator[None]:
        old = next(iter(self.modules_by_name.values())).multiplier
        self.set_multiplier(value)
        try:
            yield
        finally:
            self.set_multiplier(old)

    # -- weights in the kohya file format ------------------------------------------------------
    def kohya_state_dict(self) -> Dict[str, torch.Tensor]:
        """``name.lora_down.weight``, ``name.lora_up.weight``, ``name.alpha`` for every module."""
        out = {}
        for name, module in self.modules_by_name.items():
            out[f"{name}.lora_down.weight"] = module.lora_down.weight.detach().clone()
            out[f"{name}.lora_up.weight"] = (module.lora_up.weight * module.scalar).detach().clone()
            out[f"{name}.alpha"] = module.alpha.detach().clone().float()
        return out

    def load_kohya_state_dict(self, tensors: Dict[str, torch.Tensor], source: str) -> None:
        """Copy weights from a kohya-format dict; any name, rank or shape mismatch is one ModelError."""
        names = _module_names(tensors)
        unknown = sorted(names - set(self.modules_by_name))
        if unknown:
            raise ModelError(f"{source}: {len(unknown)} of its layers are not in this model "
                             f"(first: {unknown[0]}); it was trained for another model family or network type")
        with torch.no_grad():
            for name in names:
                module = self.modules_by_name[name]
                for key, param in (("lora_down.weight", module.lora_down.weight),
                                   ("lora_up.weight", module.lora_up.weight)):
                    value = tensors.get(f"{name}.{key}")
                    if value is None:
                        raise ModelError(f"{source}: '{name}.{key}' is missing")
                    if value.shape != param.shape:
                        raise _shape_error(source, module, f"{name}.{key}", value.shape, param.shape)
                    param.copy_(value.to(param))
                alpha = tensors.get(f"{name}.alpha")
                if alpha is not None:
                    module.alpha.copy_(alpha.reshape(module.alpha.shape).to(module.alpha))
                    module.scale = float(alpha) / module.lora_dim

    def rank_summary(self) -> Tuple[int, float]:
        first = next(iter(self.modules_by_name.values()))
        return first.lora_dim, float(first.alpha)


def _shape_error(source: str, module: nn.Module, key: str, got: torch.Size, need: torch.Size) -> ModelError:
    """Say which rank to set when only the rank differs; otherwise the file fits another model."""
    rank_dim = 0 if key.endswith("lora_down.weight") else 1
    others = [i for i in range(max(len(got), len(need))) if i != rank_dim]
    if len(got) == len(need) and all(got[i] == need[i] for i in others):
        option = "conv_rank" if is_conv_kxk(module.org_module[0]) else "lora_rank"
        return ModelError(f"{source}: the LoRA has rank {got[rank_dim]} ('{key}'), this run uses {option} "
                          f"{need[rank_dim]}; set {option}: {got[rank_dim]} to start from it")
    return ModelError(f"{source}: '{key}' has shape {tuple(got)}, this model needs {tuple(need)}; the LoRA was "
                      "trained for another model, choose one made for this base model")


def _lycoris_view(layer: nn.Module) -> nn.Module:
    """lycoris recognises only torch's own Linear/Conv classes. Forge builds its own Linear (a plain Module with
    ``weight``, ``in_features``, ``out_features``); lycoris is shown a same-shaped nn.Linear on the meta device
    instead, and the LoRA is then attached to the real layer (bypass mode never reads the base weight)."""
    if isinstance(layer, (nn.Linear, nn.Conv2d)):
        return layer
    return nn.Linear(layer.in_features, layer.out_features, bias=False, device="meta")


def _point_at(module: nn.Module, layer: nn.Module) -> None:
    if module.org_module[0] is not layer:
        module.org_module = [layer]
        module.org_forward = layer.forward


def _module_names(tensors: Dict[str, torch.Tensor]) -> set:
    names = set()
    for key in tensors:
        for suffix in LORA_SUFFIXES:
            if key.endswith(suffix):
                names.add(key[: -len(suffix)])
    return names
