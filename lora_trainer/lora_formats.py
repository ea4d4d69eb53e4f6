"""What kind of LoRA file this is: key style, algorithm, model family, and kohya names for foreign formats.

LoRA files come in three key styles:

* kohya (what A1111, Forge and ComfyUI read): ``lora_unet_<path>.lora_down.weight`` etc., one dot-free module
  name, then an algorithm suffix (LoRA, or a LyCORIS one: ``hada_w1_a``, ``lokr_w1``, ...);
* diffusers: ``unet.<dotted path>.lora_A.weight`` / ``.lora.down.weight`` (``text_encoder.`` for the CLIP);
* peft: ``base_model.model.<dotted path>.lora_A.weight`` (an adapter saved from a bare model).

Everything here reads names, shapes and metadata only; no diffusers, no peft (the WebUI path imports it).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from .errors import ModelError

logger = logging.getLogger("lora_trainer")

# kohya / LyCORIS weight suffixes, by algorithm (longest first where one suffix ends another).
ALGORITHM_SUFFIXES: Dict[str, Tuple[str, ...]] = {
    "lora": ("lora_down.weight", "lora_up.weight", "lora_mid.weight"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
    "ia3": ("on_input", "weight"),
    "full": ("diff", "diff_b"),
    "glora": ("a1.weight", "a2.weight", "b1.weight", "b2.weight"),
    "oft": ("oft_blocks", "oft_diag", "oft_R", "rescale"),
    "norm": ("w_norm", "b_norm"),
}
SHARED_SUFFIXES = ("alpha", "scale", "dora_scale", "bias", "bias_indices", "bias_values", "bias_size")
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "lycoris_", "oft_unet_")

# diffusers / peft suffix -> kohya suffix
FOREIGN_SUFFIXES = (
    (".lora_A.weight", "lora_down.weight"), (".lora_B.weight", "lora_up.weight"),
    (".lora.down.weight", "lora_down.weight"), (".lora.up.weight", "lora_up.weight"),
    (".lora_linear_layer.down.weight", "lora_down.weight"), (".lora_linear_layer.up.weight", "lora_up.weight"),
    (".lora_magnitude_vector", "dora_scale"), (".alpha", "alpha"),
)
FOREIGN_PREFIXES = (("unet.", "lora_unet_"), ("text_encoder.", "lora_te_"), ("text_encoder_2.", "lora_te2_"),
                    ("base_model.model.", ""))
_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora$")

# ss_base_model_version / modelspec.architecture / name.json "sd version" -> our family names
_VERSION_PREFIXES = (("sdxl", "sdxl"), ("sd_v2", "sd2"), ("sd_v1", "sd1"), ("sd3", "sd3"), ("flux", "flux"))
_ARCH_PREFIXES = (("stable-diffusion-xl", "sdxl"), ("stable-diffusion-v2", "sd2"), ("stable-diffusion-v1", "sd1"),
                  ("stable-diffusion-3", "sd3"), ("flux", "flux"))
FAMILY_NAMES = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL", "sd3": "SD3", "flux": "Flux"}
# the cross-attention context width (attn2.to_k input) and CLIP width of each family's real models
_CONTEXT_WIDTH = {768: "sd1", 1024: "sd2", 2048: "sdxl"}


@dataclass
class LoraLayout:
    """What the keys of a LoRA file say about it."""
    key_style: str  # "kohya" | "diffusers" | "peft" | "unknown"
    network_type: str  # "lora" | "locon" | "loha" | "lokr" | "dora" | "ia3" | "full" | ... | "mixed" | "unknown"
    modules: Dict[str, str] = field(default_factory=dict)  # kohya module name -> algorithm
    unknown_keys: List[str] = field(default_factory=list)

    def part_counts(self) -> Dict[str, int]:
        return {"unet": sum(1 for m in self.modules if part_of(m) == "unet"),
                "te": sum(1 for m in self.modules if part_of(m) == "te")}


def part_of(module: str) -> str:
    """"unet", "te" or "other" for a kohya module name."""
    if module.startswith(("lora_unet_", "lycoris_", "oft_unet_")):
        return "unet"
    if module.startswith(("lora_te_", "lora_te1_", "lora_te2_", "lora_te3_")):
        return "te"
    return "other"


def split_kohya_key(key: str) -> Optional[Tuple[str, str, str]]:
    """(module, suffix, algorithm or "") for a kohya-style key, or None."""
    module, dot, suffix = key.partition(".")
    if not dot or not module.startswith(KOHYA_PREFIXES):
        return None
    for algorithm, suffixes in ALGORITHM_SUFFIXES.items():
        if suffix in suffixes:
            return module, suffix, algorithm
    if suffix in SHARED_SUFFIXES:
        return module, suffix, ""
    return None


def foreign_to_kohya_key(key: str) -> Optional[str]:
    """The kohya key for a diffusers/peft key (``unet.a.b.lora_A.weight`` -> ``lora_unet_a_b.lora_down.weight``)."""
    suffix = next(((f, k) for f, k in FOREIGN_SUFFIXES if key.endswith(f)), None)
    if suffix is None:
        return None
    path, kohya_suffix = key[: -len(suffix[0])], suffix[1]
    prefix = next(((p, k) for p, k in FOREIGN_PREFIXES if path.startswith(p)), None)
    if prefix is None:
        return None
    path, kohya_prefix = path[len(prefix[0]):], prefix[1]
    path = _PROCESSOR.sub(lambda m: "." + ("to_out.0" if m.group(1) == "to_out" else m.group(1)), path)
    if not kohya_prefix:  # peft on a bare model: tell UNet from text encoder by the path
        kohya_prefix = "lora_te_" if path.startswith(("text_model.", "encoder.layers.")) else "lora_unet_"
    if kohya_prefix.startswith("lora_te") and not path.startswith("text_model."):
        path = "text_model." + path
    return f"{kohya_prefix}{path.replace('.', '_')}.{kohya_suffix}"


def key_style(keys: Iterable[str]) -> str:
    keys = list(keys)
    if any(split_kohya_key(k) for k in keys):
        return "kohya"
    foreign = [k for k in keys if foreign_to_kohya_key(k)]
    if not foreign:
        return "unknown"
    return "peft" if all(k.startswith("base_model.model.") for k in foreign) else "diffusers"


def kohya_view(tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The same tensors under kohya keys (diffusers/peft keys are renamed; kohya keys are kept)."""
    out = {}
    for key, value in tensors.items():
        if split_kohya_key(key):
            out[key] = value
        else:
            new = foreign_to_kohya_key(key)
            if new:
                out[new] = value
    return out


def describe_layout(shapes: Dict[str, Sequence[int]]) -> LoraLayout:
    """Key style, algorithm per module and the overall network type, from names and shapes."""
    style = key_style(shapes)
    modules: Dict[str, str] = {}
    dora, conv_kxk, unknown = set(), False, []
    for key, shape in shapes.items():
        kohya = key if split_kohya_key(key) else foreign_to_kohya_key(key)
        parts = split_kohya_key(kohya) if kohya else None
        if parts is None:
            unknown.append(key)
            continue
        module, suffix, algorithm = parts
        if suffix == "dora_scale":
            dora.add(module)
        if algorithm:
            modules[module] = algorithm
        if suffix == "lora_down.weight" and len(shape) == 4 and tuple(shape[2:]) != (1, 1):
            conv_kxk = True
    algorithms = set(modules.values())
    if not algorithms:
        kind = "unknown"
    elif len(algorithms) > 1:
        kind = "mixed"
    else:
        kind = algorithms.pop()
        if kind == "lora" and dora:
            kind = "dora"
        elif kind == "lora" and conv_kxk:
            kind = "locon"
    return LoraLayout(style, kind, dict(sorted(modules.items())), unknown)


# ---- model family ----------------------------------------------------------------------------------------------
def family_from_metadata(metadata: Dict[str, str]) -> Optional[str]:
    """The family the file says it was trained for (kohya ``ss_*`` first, then ``modelspec.architecture``)."""
    version = str(metadata.get("ss_base_model_version", "")).lower()
    for prefix, family in _VERSION_PREFIXES:
        if version.startswith(prefix):
            return family
    arch = str(metadata.get("modelspec.architecture", "")).lower()
    for prefix, family in _ARCH_PREFIXES:
        if arch.startswith(prefix):
            return family
    if str(metadata.get("ss_v2", "")).lower() == "true":
        return "sd2"
    return None


def family_from_sidecar(sd_version: str) -> Optional[str]:
    """A1111's name.json ``"sd version"`` (SD1/SD2/SDXL/Flux; "Unknown" says nothing)."""
    value = str(sd_version or "").strip().lower()
    return {"sd1": "sd1", "sd2": "sd2", "sdxl": "sdxl", "flux": "flux", "sd3": "sd3"}.get(value)


def family_from_keys(shapes: Dict[str, Sequence[int]]) -> Optional[str]:
    """A guess from kohya names and real-model widths; None when the keys do not tell (e.g. tiny test models)."""
    kohya = {(k if split_kohya_key(k) else foreign_to_kohya_key(k) or ""): v for k, v in shapes.items()}
    if any(k.startswith(("lora_te1_", "lora_te2_")) for k in kohya):
        return "sdxl"
    for key, shape in kohya.items():
        if re.search(r"attn2_to_k\.(lora_down\.weight|hada_w1_b|lokr_w2)$", key) and len(shape) >= 2:
            family = _CONTEXT_WIDTH.get(int(shape[-1]))
            if family:
                return family
    for key, shape in kohya.items():
        if key.startswith("lora_te_") and key.endswith("mlp_fc1.lora_down.weight") and len(shape) == 2:
            return {768: "sd1", 1024: "sd2"}.get(int(shape[1]))
    return None


def family_label(family: Optional[str]) -> str:
    return FAMILY_NAMES.get(family or "", family or "unknown")


# ---- reading any LoRA file -------------------------------------------------------------------------------------
def read_header(path: Path) -> Tuple[Dict[str, Tuple[int, ...]], Dict[str, str]]:
    """Tensor shapes and metadata from the header, with one-line errors for missing, empty or damaged files."""
    from .backbones.single_file import read_safetensors_shapes

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: LoRA file not found; check the path")
    if path.suffix.lower() != ".safetensors":
        raise ModelError(f"{path}: only .safetensors LoRA files are read; convert the file with a trusted tool")
    if path.stat().st_size == 0:
        raise ModelError(f"{path}: the file is empty (0 bytes); the download or copy failed, get the file again")
    shapes, metadata = read_safetensors_shapes(path)
    return shapes, {str(k): str(v) for k, v in metadata.items()}


def load_tensors(path: Path) -> Dict[str, torch.Tensor]:
    """Every tensor of a safetensors file in its stored dtype (call ``read_header`` first for clear errors)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        reason = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{path}: not a readable safetensors file ({reason}); get the file again") from None


def with_kohya_names(path: Path, tensors: Dict[str, torch.Tensor],
                     metadata: Optional[Dict[str, str]] = None) -> Dict[str, torch.Tensor]:
    """``kohya_view`` plus the alphas that diffusers/peft keep outside the tensors.

    diffusers writes its LoraConfig into the ``lora_adapter_metadata`` header entry (``unet.lora_alpha``, ...);
    peft writes ``adapter_config.json`` beside the weights. Without them the scale would be 1 instead of alpha/r.
    """
    kohya = kohya_view(tensors)
    if key_style(tensors) == "kohya" or any(k.endswith(".alpha") for k in kohya):
        return kohya
    configs = _adapter_configs(Path(path), metadata or {})
    for key in [k for k in kohya if k.endswith(".lora_down.weight")]:
        module = key[: -len(".lora_down.weight")]
        config = next((c for prefix, c in configs.items() if prefix and module.startswith(prefix)), configs.get(""))
        alpha = (config or {}).get("lora_alpha")
        if isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
            rank = kohya[key].shape[0]
            # kohya's scale is alpha/r; rsLoRA's is alpha/sqrt(r)
            kohya[f"{module}.alpha"] = torch.tensor(float(alpha) * (rank ** 0.5 if config.get("use_rslora") else 1.0))
    return kohya


def _adapter_configs(path: Path, metadata: Dict[str, str]) -> Dict[str, Dict[str, object]]:
    """kohya module prefix ("" = every module) -> the LoraConfig fields that set the scale."""
    configs: Dict[str, Dict[str, object]] = {}
    try:
        grouped = json.loads(metadata.get("lora_adapter_metadata") or "{}")
        config_file = path.parent / "adapter_config.json"
        if config_file.is_file():
            configs[""] = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        grouped = {}
    for key, value in (grouped.items() if isinstance(grouped, dict) else ()):
        part, _, field_name = str(key).partition(".")
        prefix = dict(FOREIGN_PREFIXES).get(part + ".")
        if prefix:
            configs.setdefault(prefix, {})[field_name] = value
    for prefix, config in list(configs.items()):
        if not isinstance(config, dict) or config.get("alpha_pattern") or config.get("rank_pattern"):
            logger.warning("%s: per-layer alpha/rank patterns of the adapter config are not applied", path)
            configs.pop(prefix)
    return configs


def lora_pairs(tensors: Dict[str, torch.Tensor], source: str) -> Dict[str, Tuple[torch.Tensor, torch.Tensor, float]]:
    """kohya module name -> (down, up, alpha) in float32, for LoRA/LoCon weights under any key style.

    Other algorithms, DoRA and Tucker (``lora_mid``) weights are one ModelError: their delta is not ``up @ down``.
    """
    kohya = kohya_view(tensors)
    layout = describe_layout({k: tuple(v.shape) for k, v in kohya.items()})
    if layout.network_type not in ("lora", "locon"):
        what = {"unknown": "holds no LoRA weights"}.get(layout.network_type, f"is a {layout.network_type} file")
        raise ModelError(f"{source}: {what}; only LoRA/LoCon files (lora_down/lora_up) can be used here")
    if any(k.endswith(".lora_mid.weight") for k in kohya):
        raise ModelError(f"{source}: uses Tucker-decomposed convs (lora_mid); only plain LoRA/LoCon files work here")
    out = {}
    for module in layout.modules:
        down, up = kohya.get(f"{module}.lora_down.weight"), kohya.get(f"{module}.lora_up.weight")
        if down is None or up is None:
            raise ModelError(f"{source}: layer {module} lacks its lora_down or lora_up weight; the file is damaged")
        if down.shape[0] != up.shape[1]:
            raise ModelError(f"{source}: layer {module} has lora_down rank {down.shape[0]} but lora_up rank "
                             f"{up.shape[1]}; the file is damaged")
        alpha = kohya.get(f"{module}.alpha")
        rank = down.shape[0]
        out[module] = (down.float(), up.float(), float(alpha) if alpha is not None else float(rank))
    return out


def lora_delta(down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * up @ down`` as a matrix [out, in * kh * kw] (conv downs are flattened, ups are 1x1)."""
    return scale * (up.reshape(up.shape[0], -1).double() @ down.reshape(down.shape[0], -1).double())


def top_tags(tag_frequency: Dict[str, Dict[str, int]], count: int = 5) -> List[str]:
    totals: Dict[str, int] = {}
    for tags in tag_frequency.values():
        if isinstance(tags, dict):
            for tag, n in tags.items():
                try:
                    totals[str(tag).strip()] = totals.get(str(tag).strip(), 0) + int(n)
                except (TypeError, ValueError):
                    continue
    return [t for t, _ in sorted(totals.items(), key=lambda kv: (-kv[1], kv[0])) if t][:count]
