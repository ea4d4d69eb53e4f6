"""``python -m lora_trainer merge a.safetensors:0.6 b.safetensors:0.4 -o blend.safetensors [--rank N]``.

Per layer, a LoRA adds ``delta = (alpha / r) * up @ down``; a blend adds ``sum_i w_i * delta_i``.

* Without ``--rank``: the exact merge. Downs are stacked, ups are stacked with ``w_i * alpha_i / r_i`` folded in,
  and alpha is set to the new rank (scale 1), so ``up @ down`` IS the weighted sum. Ranks add up.
* With ``--rank N``: the weighted delta of each layer truncated to rank N by SVD. The SVD works on the factors
  (QR of the stacked ups and downs, then an SVD of a small R x R matrix), never on the full delta, and the
  error is computed the same way, so merging SD-sized files stays cheap.

Conv layers (4-D downs, 1x1 ups) are flattened to [out, in*kh*kw] and back. No diffusers here.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .errors import ConfigError, ModelError
from .lora_file import save_lora_file
from .lora_formats import family_label, load_tensors, lora_pairs, read_header, with_kohya_names
from .lora_stack import file_family

logger = logging.getLogger("lora_trainer")

# metadata kept when every input that has the key agrees on its value
SHARED_KEYS = ("ss_base_model_version", "ss_v2", "modelspec.architecture", "modelspec.implementation",
               "modelspec.prediction_type", "ss_sd_model_name", "ss_sd_model_hash", "modelspec.resolution",
               "ss_resolution", "ss_clip_skip")
_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16"}

Factors = Tuple[torch.Tensor, torch.Tensor]  # (U [out, R], D [R, in*k*k]) with delta = U @ D


@dataclass
class MergeInput:
    path: Path
    weight: float
    metadata: Dict[str, str]
    family: Optional[str]
    layers: Dict[str, Tuple[torch.Tensor, torch.Tensor, float]]  # module -> (down, up, alpha), float32
    dtype: torch.dtype


@dataclass
class MergeReport:
    path: Path
    method: str  # "concat" | "svd"
    layers: int
    ranks: List[int]  # distinct output ranks
    relative_error: float  # ||merged - exact||_F / ||exact||_F over all layers
    worst_layer: str = ""
    worst_error: float = 0.0
    errors: Dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        ranks = "/".join(str(r) for r in self.ranks)
        text = (f"{self.path}: {self.layers} layers, rank {ranks} ({self.method}); relative error "
                f"{self.relative_error:.2e}")
        if self.method == "svd":
            text += f", worst layer {self.worst_layer} {self.worst_error:.2e}"
        return text


def parse_weighted_path(text: str) -> Tuple[Path, float]:
    """``file.safetensors:0.6`` -> (path, 0.6); no ``:weight`` means 1.0 (a Windows ``C:\\`` stays a path)."""
    head, sep, tail = str(text).rpartition(":")
    if sep and re.fullmatch(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*", tail):
        return Path(head), float(tail)
    if sep and not re.search(r"[\\/]|\.safetensors$", tail, re.IGNORECASE):
        raise ConfigError(f"{text}: the weight after ':' is not a number; write file.safetensors:0.6")
    return Path(text), 1.0


def read_input(path: Path, weight: float) -> MergeInput:
    shapes, metadata = read_header(path)
    tensors = with_kohya_names(path, load_tensors(path), metadata)
    layers = lora_pairs(tensors, str(path))
    dtypes = {v.dtype for k, v in tensors.items() if not k.endswith("alpha")}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    family = file_family(path, metadata, shapes)[0]
    return MergeInput(Path(path), float(weight), metadata, family, layers, dtype)


def check_compatible(inputs: Sequence[MergeInput]) -> Optional[str]:
    """The common family (None if no input tells); one ModelError when families or layer shapes disagree."""
    known = [(i.family, i) for i in inputs if i.family]
    for family, item in known[1:]:
        if family != known[0][0]:
            raise ModelError(f"cannot merge {known[0][1].path.name} ({family_label(known[0][0])}) with "
                             f"{item.path.name} ({family_label(family)}); merge LoRAs made for the same base model")
    versions = {i.metadata.get("ss_base_model_version") for i in inputs} - {None, ""}
    if len(versions) > 1:
        logger.warning("the inputs name different ss_base_model_version values (%s)", ", ".join(sorted(versions)))
    seen: Dict[str, Tuple[Tuple[int, ...], Tuple[int, ...], Path]] = {}
    for item in inputs:
        for name, (down, up, _) in item.layers.items():
            shape = (tuple(down.shape[1:]), (up.shape[0],))
            if name in seen and seen[name][:2] != shape:
                raise ModelError(f"cannot merge: layer {name} is {_describe(seen[name][:2])} in {seen[name][2].name} "
                                 f"but {_describe(shape)} in {item.path.name}; the files were made for different "
                                 "models")
            seen.setdefault(name, shape + (item.path,))
    return known[0][0] if known else None


def _describe(shape) -> str:
    (inner, out) = shape
    return f"{inner[0]}->{out[0]}" + (f" (kernel {inner[1]}x{inner[2]})" if len(inner) == 3 else "")


# ---- the maths ---------------------------------------------------------------------------------------------
def weighted_factors(parts: Sequence[Tuple[torch.Tensor, torch.Tensor, float, float]]) -> Factors:
    """(U, D) with U @ D = sum_i weight_i * alpha_i / r_i * up_i @ down_i, in float64."""
    ups, downs = [], []
    for down, up, alpha, weight in parts:
        scale = weight * alpha / down.shape[0]
        ups.append(up.reshape(up.shape[0], -1).double() * scale)
        downs.append(down.reshape(down.shape[0], -1).double())
    return torch.cat(ups, dim=1), torch.cat(downs, dim=0)


def frobenius2(u: torch.Tensor, d: torch.Tensor) -> float:
    """||u @ d||_F^2 without forming u @ d: trace((u^T u)(d d^T))."""
    return float(((u.T @ u) * (d @ d.T)).sum().clamp_min(0.0))


def truncated(u: torch.Tensor, d: torch.Tensor, rank: int) -> Factors:
    """The best rank-``rank`` factors of u @ d (balanced: each factor carries sqrt of the singular values)."""
    q1, r1 = torch.linalg.qr(u)
    q2, r2 = torch.linalg.qr(d.T)
    small_u, s, small_vh = torch.linalg.svd(r1 @ r2.T, full_matrices=False)
    n = max(1, min(rank, s.shape[0]))
    root = s[:n].sqrt()
    return (q1 @ small_u[:, :n]) * root, root[:, None] * (small_vh[:n] @ q2.T)


def _as_file_tensors(u: torch.Tensor, d: torch.Tensor, down_shape: Tuple[int, ...], dtype: torch.dtype):
    """Factors -> (down, up) shaped like the inputs' (conv: [r, in, kh, kw] and [out, r, 1, 1]) in ``dtype``."""
    rank = d.shape[0]
    down = d.reshape((rank,) + tuple(down_shape[1:])).to(dtype)
    up = u.reshape((u.shape[0], rank) + ((1, 1) if len(down_shape) == 4 else ())).to(dtype)
    return down, up


def merge_layer(parts, rank: Optional[int], dtype: torch.dtype):
    """(down, up, squared error, squared norm of the exact delta) for one layer, as stored in ``dtype``."""
    exact_u, exact_d = weighted_factors(parts)
    u, d = truncated(exact_u, exact_d, rank) if rank is not None else (exact_u, exact_d)
    down, up = _as_file_tensors(u, d, tuple(parts[0][0].shape), dtype)
    # the error of what is stored: the exact factors minus the stored ones, stacked side by side
    stored_u, stored_d = up.reshape(up.shape[0], -1).double(), down.reshape(down.shape[0], -1).double()
    error = frobenius2(torch.cat([exact_u, -stored_u], dim=1), torch.cat([exact_d, stored_d], dim=0))
    return down, up, error, frobenius2(exact_u, exact_d)


# ---- the command -------------------------------------------------------------------------------------------
def merge_loras(sources: Sequence[Tuple[Path, float]], out: Path, rank: Optional[int] = None,
                conv_rank: Optional[int] = None, precision: str = "auto", overwrite: bool = False) -> MergeReport:
    """Merge weighted LoRA files into ``out`` (exact by rank concatenation, or SVD to ``rank``)."""
    out = Path(out)
    _check_paths([Path(p) for p, _ in sources], out, overwrite)
    if rank is not None and rank < 1:
        raise ConfigError(f"--rank {rank}: must be 1 or more")
    inputs = [read_input(Path(p), w) for p, w in sources]
    family = check_compatible(inputs)
    if precision == "auto":
        dtypes = {i.dtype for i in inputs}
        precision = _DTYPE_NAMES.get(dtypes.pop(), "fp32") if len(dtypes) == 1 else "fp32"

    names = sorted({name for i in inputs for name in i.layers})
    tensors: Dict[str, torch.Tensor] = {}
    errors: Dict[str, float] = {}
    total_error = total_norm = 0.0
    save_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
    for name in names:
        parts = [(*i.layers[name], i.weight) for i in inputs if name in i.layers and i.weight != 0]
        if not parts:
            continue
        is_conv = parts[0][0].dim() == 4 and tuple(parts[0][0].shape[2:]) != (1, 1)
        target = (conv_rank or rank) if is_conv else rank
        down, up, err2, norm2 = merge_layer(parts, target, save_dtype)
        tensors.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                        f"{name}.alpha": torch.tensor(float(down.shape[0]))})
        errors[name] = math.sqrt(err2 / norm2) if norm2 > 0 else 0.0
        total_error += err2
        total_norm += norm2
    if not tensors:
        raise ConfigError("nothing to merge: every input has weight 0")
    ranks = sorted({int(t.shape[0]) for k, t in tensors.items() if k.endswith(".lora_down.weight")})
    method = "svd" if rank is not None else "concat"
    metadata = merged_metadata(inputs, out, family, tensors, method)
    save_lora_file(out, tensors, metadata, precision)
    worst = max(errors, key=errors.get)
    report = MergeReport(out, method, len(errors), ranks, math.sqrt(total_error / total_norm) if total_norm else 0.0,
                         worst, errors[worst], errors)
    logger.info("%s", report.summary())
    return report


def _check_paths(inputs: Sequence[Path], out: Path, overwrite: bool) -> None:
    if not inputs:
        raise ConfigError("merge: give at least one LoRA file (file.safetensors:weight)")
    if out.suffix.lower() != ".safetensors":
        raise ConfigError(f"{out}: the output must be a .safetensors file")
    for path in inputs:
        if path.resolve() == out.resolve() or (out.exists() and path.exists() and out.samefile(path)):
            raise ConfigError(f"{out}: is also an input; write the merge to a new file name")
    if out.exists() and not overwrite:
        raise ConfigError(f"{out}: already exists; choose a new name (the WebUI caches LoRAs by file name) "
                          "or pass --overwrite")


def merged_metadata(inputs: Sequence[MergeInput], out: Path, family: Optional[str],
                    tensors: Dict[str, torch.Tensor], method: str) -> Dict[str, str]:
    from .metadata import FAMILY_KEYS

    linear, conv = set(), set()
    for key, value in tensors.items():
        if key.endswith(".lora_down.weight"):
            (conv if value.dim() == 4 and tuple(value.shape[2:]) != (1, 1) else linear).add(int(value.shape[0]))
    dim = max(linear or conv)
    meta: Dict[str, str] = {}
    for key in SHARED_KEYS:
        values = {i.metadata[key] for i in inputs if i.metadata.get(key)}
        if len(values) == 1:
            meta[key] = values.pop()
    if family in FAMILY_KEYS and "ss_base_model_version" not in meta:
        version, v2, arch, _ = FAMILY_KEYS[family]
        meta.update({"ss_base_model_version": version, "ss_v2": v2, "modelspec.architecture": arch})
    triggers: List[str] = []
    for item in inputs:
        for word in str(item.metadata.get("modelspec.trigger_phrase", "")).split(","):
            if word.strip() and word.strip() not in triggers:
                triggers.append(word.strip())
    recipe = " + ".join(f"{i.path.name} x {i.weight:g}" for i in inputs)
    meta.update({
        "ss_output_name": out.stem,
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(dim),
        "ss_network_alpha": str(dim),
        "ss_network_args": json.dumps({"conv_dim": str(max(conv)), "conv_alpha": str(max(conv))} if conv else {}),
        "ss_tag_frequency": json.dumps(merged_tag_frequency(inputs), ensure_ascii=False),
        "ss_merged_from": json.dumps([{"file": i.path.name, "weight": i.weight,
                                       "sshs_model_hash": i.metadata.get("sshs_model_hash", ""),
                                       "ss_output_name": i.metadata.get("ss_output_name", "")} for i in inputs]),
        "ss_training_comment": f"merged by lora_trainer ({'rank concatenation' if method == 'concat' else 'SVD'}): "
                               f"{recipe}",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.title": out.stem,
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "modelspec.trigger_phrase": ", ".join(triggers),
    })
    return {k: v for k, v in meta.items() if v != ""}


def merged_tag_frequency(inputs: Sequence[MergeInput]) -> Dict[str, Dict[str, int]]:
    """Every input's ``ss_tag_frequency`` summed per dataset folder and tag."""
    merged: Dict[str, Dict[str, int]] = {}
    for item in inputs:
        try:
            data = json.loads(item.metadata.get("ss_tag_frequency", "") or "{}")
        except ValueError:
            continue
        for folder, tags in (data.items() if isinstance(data, dict) else ()):
            if not isinstance(tags, dict):
                continue
            target = merged.setdefault(str(folder), {})
            for tag, count in tags.items():
                try:
                    target[str(tag)] = target.get(str(tag), 0) + int(count)
                except (TypeError, ValueError):
                    continue
    return merged
