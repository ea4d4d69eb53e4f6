"""``python -m lora_trainer inspect FILE [--base CKPT] [--json]``: what a LoRA file is and whether it fits a model.

Reads kohya files (ours and others'), LyCORIS files (LoHa, LoKr, IA3, ...) and diffusers/peft files. With a
base model's layers (``Backbone.lora_targets``), it counts how many of the file's layers the model has: the
ones it lacks are what A1111 silently skips. No diffusers here: the WebUI passes its own model's layers.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from torch import nn

from .errors import ModelError
from .hashing import addnet_hash_file, sha256_file
from .lora_formats import (
    LoraLayout,
    describe_layout,
    family_from_keys,
    family_from_metadata,
    family_from_sidecar,
    family_label,
    foreign_to_kohya_key,
    load_tensors,
    read_header,
    split_kohya_key,
    top_tags,
    with_kohya_names,
)

# metadata key -> report name, in the order shown
TRAINING_KEYS = (
    ("ss_output_name", "name"), ("modelspec.title", "title"), ("ss_sd_model_name", "base model"),
    ("ss_sd_model_hash", "base model hash"), ("ss_steps", "steps"), ("ss_max_train_steps", "max steps"),
    ("ss_epoch", "epoch"), ("ss_num_epochs", "epochs"), ("ss_learning_rate", "learning rate"),
    ("ss_unet_lr", "unet lr"), ("ss_text_encoder_lr", "text encoder lr"), ("ss_optimizer", "optimizer"),
    ("ss_lr_scheduler", "lr scheduler"), ("ss_resolution", "resolution"), ("ss_num_train_images", "train images"),
    ("ss_total_batch_size", "batch size"), ("ss_mixed_precision", "precision"), ("ss_clip_skip", "clip skip"),
    ("ss_network_module", "network module"), ("ss_network_args", "network args"), ("ss_seed", "seed"),
    ("ss_training_comment", "comment"), ("ss_merged_from", "merged from"),
)
DATE_KEYS = (("ss_training_started_at", "started"), ("ss_training_finished_at", "finished"))
# UNet layers outside the trained blocks that A1111 maps (networks.py: convert_diffusers_name_to_compvis)
A1111_EXTRA_LAYERS = ("lora_unet_conv_in", "lora_unet_conv_out", "lora_unet_time_embedding_linear_1",
                      "lora_unet_time_embedding_linear_2")
RANK_SUFFIX = {"lora_down.weight": 0, "hada_w1_b": 0, "lokr_w2_a": 1, "lokr_w1_a": 1}


def inspect_lora(path: Path, targets: Optional[Dict[str, nn.Module]] = None, base_family: Optional[str] = None,
                 base_name: str = "") -> Dict[str, object]:
    """Everything the file tells (a plain dict, JSON-ready); ``targets`` adds the match against a model."""
    path = Path(path)
    shapes, metadata = read_header(path)
    layout = describe_layout(shapes)
    if not layout.modules:
        first = next(iter(shapes), "(no tensors)")
        raise ModelError(f"{path}: holds no LoRA weights (first key: {first}); is it a base model, a VAE or an "
                         "embedding? Give a LoRA file")
    kohya_shapes = {(k if split_kohya_key(k) else foreign_to_kohya_key(k) or k): v for k, v in shapes.items()}
    sidecar = _read_sidecar(path)
    family, family_source = _family(metadata, shapes, sidecar)
    info: Dict[str, object] = {
        "file": str(path), "size_bytes": path.stat().st_size,
        "key_style": layout.key_style, "network_type": layout.network_type,
        "family": family, "family_source": family_source,
        "layers": layout.part_counts(),
        "ranks": _ranks(layout, kohya_shapes),
        "alphas": [], "weights": {},
        "trigger_words": _trigger_words(metadata, sidecar),
        "training": _training(metadata),
        "hashes": _hashes(path, metadata),
        "unknown_keys": layout.unknown_keys[:10],
        "metadata_keys": len(metadata),
    }
    _tensor_facts(path, metadata, info)
    if targets is not None:
        info["match"] = match_model(layout, kohya_shapes, targets, family, base_family, base_name)
    return info


def _read_sidecar(path: Path) -> Dict[str, object]:
    sidecar = path.with_suffix(".json")
    try:
        data = json.loads(sidecar.read_text(encoding="utf-8")) if sidecar.is_file() else {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _family(metadata, shapes, sidecar) -> Tuple[Optional[str], str]:
    for source, family in (("name.json", family_from_sidecar(str(sidecar.get("sd version", "")))),
                           ("metadata", family_from_metadata(metadata)), ("keys", family_from_keys(shapes))):
        if family:
            return family, source
    return None, "unknown"


def _ranks(layout: LoraLayout, shapes) -> Dict[str, List[int]]:
    """Distinct ranks; LoRA/LoCon split into linear and kxk-conv layers (other algorithms store convs flat)."""
    split = layout.network_type in ("lora", "locon", "dora")
    found: Dict[str, set] = {"linear": set(), "conv": set()} if split else {"rank": set()}
    for module in layout.modules:
        for suffix, axis in RANK_SUFFIX.items():
            shape = shapes.get(f"{module}.{suffix}")
            if shape is None:
                continue
            kind = "rank"
            if split:
                kind = "conv" if len(shape) == 4 and tuple(shape[2:]) != (1, 1) else "linear"
            found[kind].add(int(shape[axis]))
            break
    return {kind: sorted(values) for kind, values in found.items()}


def _tensor_facts(path: Path, metadata: Dict[str, str], info: Dict[str, object]) -> None:
    """Alphas, and whether any weight is NaN/inf or a layer is all zero (a file that does nothing)."""
    tensors = with_kohya_names(path, load_tensors(path), metadata)
    alphas, nonfinite, zero_layers = set(), 0, 0
    by_module: Dict[str, List] = {}
    for key, value in tensors.items():
        parts = split_kohya_key(key)
        if parts is None:
            continue
        module, suffix, algorithm = parts
        if suffix == "alpha":
            alphas.add(round(float(value), 4))
        elif algorithm:
            by_module.setdefault(module, []).append(value)
    for values in by_module.values():
        if any(not bool(v.float().isfinite().all()) for v in values):
            nonfinite += 1
        elif any(not bool(v.any()) for v in values):
            zero_layers += 1
    info["alphas"] = sorted(alphas)
    info["weights"] = {"layers_with_nan_or_inf": nonfinite, "layers_all_zero": zero_layers}


def _trigger_words(metadata: Dict[str, str], sidecar: Dict[str, object]) -> Dict[str, List[str]]:
    def words(text: object) -> List[str]:
        return [w.strip() for w in str(text or "").split(",") if w.strip()]

    try:
        frequency = json.loads(metadata.get("ss_tag_frequency", "") or "{}")
    except ValueError:
        frequency = {}
    return {"trigger_phrase": words(metadata.get("modelspec.trigger_phrase")),
            "activation_text": words(sidecar.get("activation text")),
            "top_tags": top_tags(frequency if isinstance(frequency, dict) else {})}


def _training(metadata: Dict[str, str]) -> Dict[str, str]:
    out = {name: metadata[key] for key, name in TRAINING_KEYS if str(metadata.get(key, "")).strip()}
    for key, name in DATE_KEYS:
        try:
            out[name] = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(metadata[key])))
        except (KeyError, ValueError, OverflowError, OSError):
            continue
    if metadata.get("modelspec.date"):
        out["date"] = metadata["modelspec.date"]
    return out


def _hashes(path: Path, metadata: Dict[str, str]) -> Dict[str, object]:
    addnet = addnet_hash_file(path)
    sha = sha256_file(path)
    stored = str(metadata.get("sshs_model_hash", "")).strip().lower()
    return {"addnet": addnet, "a1111_short": (stored or addnet)[:12], "sshs_model_hash": stored or None,
            "sshs_model_hash_matches": (stored == addnet) if stored else None,
            "sha256": sha, "autov2": sha[:10]}


# ---- does it fit a model -----------------------------------------------------------------------------------
def match_model(layout: LoraLayout, shapes, targets: Dict[str, nn.Module], family: Optional[str],
                base_family: Optional[str], base_name: str = "") -> Dict[str, object]:
    """How many of the file's layers the model has (and, for LoRA/LoCon, with fitting shapes)."""
    names = {_target_name(m, targets): m for m in layout.modules}
    matched = [n for n in names if n in targets]
    # layers outside the blocks we train, which the WebUI maps too (shapes not checked)
    outside = [n for n in names if n not in targets and n in A1111_EXTRA_LAYERS]
    missing = sorted(names[n] for n in names if n not in targets and n not in A1111_EXTRA_LAYERS)
    shape_errors = []
    shapes_checked = layout.network_type in ("lora", "locon", "dora")
    if shapes_checked:
        for name in matched:
            problem = _shape_problem(targets[name], shapes.get(f"{names[name]}.lora_down.weight"),
                                     shapes.get(f"{names[name]}.lora_up.weight"))
            if problem:
                shape_errors.append(f"{names[name]}: {problem}")
    notes = []
    if family and base_family and family != base_family:
        notes.append(f"the file is for {family_label(family)}, the base model is {family_label(base_family)}")
    if layout.key_style in ("diffusers", "peft"):
        notes.append("A1111 1.10 reads only kohya-style names and skips every layer of this file; Forge and "
                     "ComfyUI convert diffusers names")
    if missing:
        notes.append(f"A1111 would silently skip {len(missing)} layer(s)")
    return {"base": base_name, "base_family": base_family, "layers": len(names),
            "matched": len(matched) + len(outside),
            "unmatched": len(missing), "unmatched_examples": missing[:5], "shapes_checked": shapes_checked,
            "shape_mismatches": len(shape_errors), "shape_mismatch_examples": shape_errors[:5], "notes": notes}


def _target_name(module: str, targets: Dict[str, nn.Module]) -> str:
    if module not in targets and module.startswith("lora_te1_") and "lora_te_" + module[9:] in targets:
        return "lora_te_" + module[9:]
    return module


def _shape_problem(layer: nn.Module, down, up) -> str:
    if down is None or up is None:
        return "lora_down or lora_up is missing"
    if isinstance(layer, nn.Conv2d):
        need_in, need_out, kernel = layer.in_channels, layer.out_channels, tuple(layer.kernel_size)
    elif isinstance(layer, nn.Linear):
        need_in, need_out, kernel = layer.in_features, layer.out_features, (1, 1)
    else:
        return ""
    got_kernel = tuple(down[2:]) if len(down) == 4 else (1, 1)
    if down[1] != need_in or up[0] != need_out or (got_kernel != (1, 1) and got_kernel != kernel):
        return f"file {down[1]}->{up[0]} (kernel {got_kernel}), model {need_in}->{need_out} (kernel {kernel})"
    return ""


# ---- text report -------------------------------------------------------------------------------------------
def format_report(info: Dict[str, object]) -> str:
    lines: List[str] = []

    def row(label: str, value: object) -> None:
        lines.append(f"{label + ':' if label else '':<17}{value}")

    ranks, layers, words = info["ranks"], info["layers"], info["trigger_words"]
    row("file", f"{info['file']} ({info['size_bytes'] / 2**20:.1f} MiB)")
    row("family", f"{family_label(info['family'])} (from {info['family_source']})")
    row("network", f"{info['network_type']} ({info['key_style']} keys)")
    row("layers", f"{layers['unet']} UNet, {layers['te']} text encoder")
    row("rank", ", ".join(f"{kind} {'/'.join(map(str, v))}" for kind, v in ranks.items() if v) or "-")
    row("alpha", "/".join(f"{a:g}" for a in info["alphas"]) or "- (none stored: scale 1)")
    for key, label in (("trigger_phrase", "trigger"), ("activation_text", "activation text"),
                       ("top_tags", "top tags")):
        if words[key]:
            row(label, ", ".join(words[key]))
    weights = info["weights"]
    if weights.get("layers_with_nan_or_inf"):
        row("WARNING", f"{weights['layers_with_nan_or_inf']} layer(s) hold NaN or infinite weights; the file is broken")
    if weights.get("layers_all_zero"):
        row("WARNING", f"{weights['layers_all_zero']} layer(s) are all zero (they change nothing)")
    for name, value in info["training"].items():
        row(name, _merged_from(value) if name == "merged from" else value)
    hashes = info["hashes"]
    row("hash", f"{hashes['a1111_short']} (A1111 Lora hashes), AutoV2 {hashes['autov2']}")
    if hashes["sshs_model_hash_matches"] is False:
        row("", "the stored sshs_model_hash does not match the weights (edited after saving?)")
    if info["unknown_keys"]:
        row("unknown keys", ", ".join(info["unknown_keys"][:3]))
    match = info.get("match")
    if match:
        text = f"{match['matched']}/{match['layers']} layers found in {match['base'] or 'the base model'}"
        text += (f", {match['shape_mismatches']} with wrong shapes" if match["shapes_checked"]
                 else " (shapes not checked for this network type)")
        row("base match", text)
        for line in match["unmatched_examples"] + match["shape_mismatch_examples"] + match["notes"]:
            row("", line)
    return "\n".join(lines)


def _merged_from(value: str) -> str:
    try:
        return ", ".join(f"{item['file']} x {item['weight']:g}" for item in json.loads(value))
    except (ValueError, TypeError, KeyError):
        return value
