"""LoRA modules attached to a borrowed model, kept outside its module tree.

We use lycoris-lora's modules: ``LoConModule`` (LoRA for Linear layers, LoCon for convs; DoRA with weight
decomposition), ``LohaModule`` and ``LokrModule``. They attach by replacing ``forward`` on the original layer and
hold the layer in a plain list, so the base model's parameters, state_dict and ``.to()`` moves are untouched
(DESIGN invariant 1). The WebUI's ``--medvram`` hooks and Forge's memory manager move base modules around; our
parameters live in this network, which the trainer places itself.

The file keys are kohya / LyCORIS names, what A1111, Forge and ComfyUI load: ``lora_down/lora_up.weight`` (+
``dora_scale`` for DoRA), ``hada_w1_a/hada_w1_b/hada_w2_a/hada_w2_b`` (LoHa), ``lokr_w1(_a/_b)/lokr_w2(_a/_b)``
(LoKr), and ``alpha`` always. DoRA's magnitude is per INPUT channel, as A1111 merges it (``dora_scale`` of shape
[1, in, ...]; lycoris' ``wd_on_out=False``), and its multiplier scales the merged change, as A1111 does.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from .errors import ModelError

LORA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")
ALGORITHMS = ("lora", "locon", "loha", "lokr", "dora")
_FILE_ALGORITHMS = (("hada_w1_a", "loha"), ("lokr_w1", "lokr"), ("lokr_w1_a", "lokr"), ("dora_scale", "dora"),
                    ("lora_down.weight", "lora"))
_LABELS = {"lora": "LoRA/LoCon", "locon": "LoRA/LoCon", "loha": "LoHa", "lokr": "LoKr", "dora": "DoRA"}


def column_norm(weight: torch.Tensor) -> torch.Tensor:
    """The norm of each input channel of a Linear/Conv weight [out, in, ...], shaped [1, in, 1...] (A1111's DoRA)."""
    rest = [1] * (weight.dim() - 1)
    return weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1, keepdim=True).reshape(
        weight.shape[1], *rest).transpose(0, 1)


def dora_merge(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA's merged weight (A1111 ``apply_weight_decompose``): (W + dW) scaled to ``magnitude`` per input channel."""
    merged = weight + delta
    return merged * (magnitude / column_norm(merged))


def is_conv_kxk(module: nn.Module) -> bool:
    """A conv with a kernel larger than 1x1: trained at ``conv_rank`` (LoCon), as kohya does."""
    return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) != (1, 1)


class LoraNetwork(nn.Module):
    """One LoRA (or LoHa / LoKr / DoRA) module per target layer, named with kohya's module names.

    ``algorithm``: lora and locon (the same module; which layers they get is the caller's choice), loha, lokr,
    dora. ``lokr_factor``: LoKr splits each side of a weight into two factors, the smaller at most this (-1: as
    balanced as possible). ``dropouts``: (output, rank, module) dropout while in training mode, lora only.
    """

    def __init__(self, targets: Dict[str, nn.Module], rank: int, alpha: Optional[float] = None,
                 conv_rank: Optional[int] = None, conv_alpha: Optional[float] = None, seed: int = 0,
                 algorithm: str = "lora", lokr_factor: int = -1, dropouts: Tuple[float, float, float] = (0, 0, 0)):
        super().__init__()
        if algorithm not in ALGORITHMS:
            raise ValueError(f"unknown network algorithm {algorithm!r}; use one of {', '.join(ALGORITHMS)}")
        if not targets:
            raise ModelError("the model has no layers LoRA can attach to; is it a Stable Diffusion checkpoint?")
        conv_rank = conv_rank or rank
        self.algorithm = algorithm
        self.modules_by_name = nn.ModuleDict()
        # Fork the RNG so initial weights depend only on ``seed``, not on what ran before.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for name, layer in targets.items():
                conv = is_conv_kxk(layer)
                dim = conv_rank if conv else rank
                a = (conv_alpha if conv else alpha)
                a = float(dim if a is None else a)
                module = make_module(algorithm, name, layer, dim, a, lokr_factor, dropouts)
                point_at(module, layer)
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
            # another network still wrapping this layer keeps its forward (stacked LoRAs detach in any order)
            if not had_forward and "_lycoris_wrappers" not in layer.__dict__:
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

    def parameter_groups(self, unet_lr: float, text_encoder_lr: float) -> List[dict]:
        """Optimizer parameter groups: UNet layers at ``unet_lr``, text-encoder layers (``lora_te*``) at theirs."""
        unet: List[nn.Parameter] = []
        text: List[nn.Parameter] = []
        for name, module in self.modules_by_name.items():
            (text if name.startswith("lora_te") else unet).extend(p for p in module.parameters() if p.requires_grad)
        groups = [{"params": unet, "lr": unet_lr}, {"params": text, "lr": text_encoder_lr}]
        return [g for g in groups if g["params"]]

    # -- weights in the kohya file format ------------------------------------------------------
    def kohya_state_dict(self) -> Dict[str, torch.Tensor]:
        """``<name>.<key>`` for every module and each of its file keys (``lora_down.weight``, ``hada_w1_a``, ...,
        ``alpha``), as lycoris' kohya networks write them."""
        out = {}
        for name, module in self.modules_by_name.items():
            for key, value in module.custom_state_dict().items():
                value = value.detach().clone()
                out[f"{name}.{key}"] = value.float() if key == "alpha" else value
        return out

    def load_kohya_state_dict(self, tensors: Dict[str, torch.Tensor], source: str) -> None:
        """Copy weights from a kohya-format dict; any name, algorithm, rank or shape mismatch is one ModelError."""
        names = _module_names(tensors)
        unknown = sorted(names - set(self.modules_by_name))
        if unknown:
            raise ModelError(f"{source}: {len(unknown)} of its layers are not in this model "
                             f"(first: {unknown[0]}); it was trained for another model family or network type")
        with torch.no_grad():
            for name in sorted(names):
                module = self.modules_by_name[name]
                _check_algorithm(source, name, tensors, _algorithm_of_module(module))
                for key in module.custom_state_dict():
                    if key == "alpha":
                        continue
                    value = tensors.get(f"{name}.{key}")
                    if value is None:
                        raise ModelError(f"{source}: '{name}.{key}' is missing; the file was saved with other "
                                         "network options (lora_rank, conv_rank, lokr_factor)")
                    param = module.get_parameter(key)
                    if value.shape != param.shape:
                        raise _shape_error(source, module, f"{name}.{key}", value.shape, param.shape)
                    param.copy_(value.to(param))
                alpha = tensors.get(f"{name}.alpha")
                if alpha is not None:
                    module.alpha.copy_(alpha.reshape(module.alpha.shape).to(module.alpha))
                    full_lokr = getattr(module, "use_w1", False) and getattr(module, "use_w2", False)
                    module.scale = 1.0 if full_lokr else float(alpha) / module.lora_dim

    @torch.no_grad()
    def apply_max_norm(self, max_norm: float) -> Tuple[int, float]:
        """Max-norm regularisation (kohya's ``scale_weight_norms``), lora/locon layers: where the change
        ``up @ down * alpha/rank`` has a Frobenius norm above ``max_norm``, scale up and down by the square root of
        ``max_norm / norm``. In the parameters themselves (not lycoris' ``scalar`` buffer), so a checkpoint and a
        resumed run hold exactly what was trained. Returns (layers scaled, mean norm after)."""
        scaled, norms = 0, []
        for module in self.modules_by_name.values():
            up, down = module.lora_up.weight, module.lora_down.weight
            norm = float((up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).norm() * module.scale)
            if norm > max_norm:
                factor = (max_norm / norm) ** 0.5
                up.mul_(factor)
                down.mul_(factor)
                scaled, norm = scaled + 1, max_norm
            norms.append(norm)
        return scaled, sum(norms) / max(len(norms), 1)

    def rank_summary(self) -> Tuple[int, float]:
        first = next(iter(self.modules_by_name.values()))
        return first.lora_dim, float(first.alpha)


def make_module(algorithm: str, name: str, layer: nn.Module, dim: int, alpha: float, lokr_factor: int,
                dropouts: Tuple[float, float, float] = (0, 0, 0)) -> nn.Module:
    view = lycoris_view(layer, with_weight=algorithm == "dora")
    if algorithm == "loha":
        from lycoris.modules.loha import LohaModule

        return LohaModule(name, view, 1.0, dim, alpha, bypass_mode=True)
    if algorithm == "lokr":
        from lycoris.modules.lokr import LokrModule

        return LokrModule(name, view, 1.0, dim, alpha, factor=lokr_factor, bypass_mode=True)
    if algorithm == "dora":
        return _dora_class()(name, view, 1.0, dim, alpha, weight_decompose=True, wd_on_out=False, bypass_mode=False)
    from lycoris.modules.locon import LoConModule

    # bypass_mode: y = W x + up(down(x)) * scale, never materialising W + dW.
    dropout, rank_dropout, module_dropout = dropouts
    return LoConModule(name, view, 1.0, dim, alpha, dropout=dropout, rank_dropout=rank_dropout,
                       module_dropout=module_dropout, bypass_mode=True)


@functools.cache
def _dora_class() -> type:
    """lycoris' LoConModule with weight decomposition, its forward following A1111's merge exactly:
    y = W x + m * (dora_merge(W, dW) - W) x, so multiplier 0 is the base model and 1 the merged file."""
    from lycoris.modules.locon import LoConModule

    class DoRAModule(LoConModule):
        def forward(self, x, *args, **kwargs):
            base = self.org_forward(x, *args, **kwargs)
            if not self.multiplier:
                return base
            weight = self._current_weight().float()
            delta = self.make_weight(weight.device).float().reshape(weight.shape) * self.scale
            change = (dora_merge(weight, delta, self.dora_scale.float()) - weight) * self.multiplier
            return base + self.op(x, change.to(x.dtype), None, **self.kw_dict)

    return DoRAModule


def _algorithm_of_module(module: nn.Module) -> str:
    if getattr(module, "wd", False):
        return "dora"
    return {"loha": "loha", "kron": "lokr"}.get(getattr(module, "name", ""), "lora")


def _check_algorithm(source: str, name: str, tensors: Dict[str, torch.Tensor], ours: str) -> None:
    found = next((algo for key, algo in _FILE_ALGORITHMS if f"{name}.{key}" in tensors), None)
    if found is not None and found != ours:
        option = "lora (or locon)" if found == "lora" else found
        raise ModelError(f"{source}: a {_LABELS[found]} file, this run trains {_LABELS[ours]}; set network: {option} "
                         "to start from it")


def _shape_error(source: str, module: nn.Module, key: str, got: torch.Size, need: torch.Size) -> ModelError:
    """Say which rank to set when only the rank differs; otherwise the file fits another model."""
    if not key.endswith(("lora_down.weight", "lora_up.weight")):
        return ModelError(f"{source}: '{key}' has shape {tuple(got)}, this run needs {tuple(need)}; set lora_rank, "
                          "conv_rank and lokr_factor as the file was trained, or choose a LoRA for this base model")
    rank_dim = 0 if key.endswith("lora_down.weight") else 1
    others = [i for i in range(max(len(got), len(need))) if i != rank_dim]
    if len(got) == len(need) and all(got[i] == need[i] for i in others):
        option = "conv_rank" if is_conv_kxk(module.org_module[0]) else "lora_rank"
        return ModelError(f"{source}: the LoRA has rank {got[rank_dim]} ('{key}'), this run uses {option} "
                          f"{need[rank_dim]}; set {option}: {got[rank_dim]} to start from it")
    return ModelError(f"{source}: '{key}' has shape {tuple(got)}, this model needs {tuple(need)}; the LoRA was "
                      "trained for another model, choose one made for this base model")


def lycoris_view(layer: nn.Module, with_weight: bool = False) -> nn.Module:
    """lycoris recognises only torch's own Linear/Conv classes. Forge builds its own Linear (a plain Module with
    ``weight``, ``in_features``, ``out_features``); lycoris is shown a same-shaped nn.Linear on the meta device
    instead, and the LoRA is then attached to the real layer (bypass mode never reads the base weight).
    ``with_weight``: the view shares the real weight (DoRA reads it to start its magnitude)."""
    if isinstance(layer, (nn.Linear, nn.Conv2d)):
        return layer
    view = nn.Linear(layer.in_features, layer.out_features, bias=False, device="meta")
    if with_weight:
        view.weight = nn.Parameter(layer.weight.detach(), requires_grad=False)
    return view


def point_at(module: nn.Module, layer: nn.Module) -> None:
    if module.org_module[0] is not layer:
        module.org_module = [layer]
        module.org_forward = layer.forward


def _module_names(tensors: Dict[str, torch.Tensor]) -> set:
    """kohya module names are dot-free: everything before the first dot of each key."""
    return {key.split(".", 1)[0] for key in tensors if "." in key}
