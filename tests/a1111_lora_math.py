"""How A1111 1.10's built-in Lora extension applies a file: its formulas written out (network.py,
network_lora/hada/lokr.py, lyco_helpers.py), as the reference our in-forward networks are checked against."""

from __future__ import annotations

import torch


def _rebuild(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return up.reshape(up.size(0), -1) @ down.reshape(down.size(0), -1)


def a1111_updown(w: dict, orig: torch.Tensor) -> torch.Tensor:
    """``calc_updown`` + ``finalize_updown`` for one layer's file weights ``w`` (keys without the module name)."""
    dim = None
    if "lora_down.weight" in w:  # NetworkModuleLora: up @ down
        dim = w["lora_down.weight"].shape[0]
        updown = _rebuild(w["lora_up.weight"], w["lora_down.weight"])
    elif "hada_w1_a" in w:  # NetworkModuleHada: (w1a @ w1b) * (w2a @ w2b)
        dim = w["hada_w1_b"].shape[0]
        updown = _rebuild(w["hada_w1_a"], w["hada_w1_b"]) * _rebuild(w["hada_w2_a"], w["hada_w2_b"])
    else:  # NetworkModuleLokr: kron(w1, w2); dim only when a factor is decomposed
        w1 = w["lokr_w1"] if "lokr_w1" in w else w["lokr_w1_a"] @ w["lokr_w1_b"]
        if "lokr_w1_b" in w:
            dim = w["lokr_w1_b"].shape[0]
        if "lokr_w2" in w:
            w2 = w["lokr_w2"]
        else:
            w2 = w["lokr_w2_a"] @ w["lokr_w2_b"]
            dim = w["lokr_w2_b"].shape[0]
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        updown = torch.kron(w1, w2.contiguous())
    updown = updown.reshape(orig.shape)
    scale = float(w["alpha"]) / dim if dim is not None and "alpha" in w else 1.0
    updown = updown * scale
    if "dora_scale" in w:  # apply_weight_decompose: per input channel
        merged = updown + orig
        norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True).reshape(
            merged.shape[1], *[1] * (orig.dim() - 1)).transpose(0, 1)
        updown = merged * (w["dora_scale"] / norm) - orig
    return updown


def a1111_deltas(tensors: dict, targets: dict) -> dict:
    """Each file module's change to its layer's (original) weight at multiplier 1."""
    names = {k.split(".", 1)[0] for k in tensors}
    deltas = {}
    for name in names:
        weights = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.split(".", 1)[0] == name}
        deltas[name] = a1111_updown(weights, targets[name].weight.detach().clone())
    return deltas


def merge_like_a1111(deltas: dict, originals: dict, targets: dict, multiplier: float) -> None:
    """A1111's merge: weight = original + delta x multiplier, in place."""
    with torch.no_grad():
        for name, delta in deltas.items():
            targets[name].weight.copy_(originals[name] + delta * multiplier)
