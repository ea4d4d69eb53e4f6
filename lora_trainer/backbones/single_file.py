"""Load a base model from disk (standalone mode): an original-format checkpoint or a diffusers folder.

* ``.safetensors`` / ``.ckpt`` in the original (LDM / A1111) layout: the family is read from the tensor names
  and shapes first (the safetensors header only; nothing is loaded twice in memory), then diffusers'
  ``from_single_file`` builds the modules from a LOCAL config folder (bundled or the user's), offline.
* a diffusers folder: ``from_pretrained(local_files_only=True)``; a missing ``tokenizer/`` is generated.

Every problem a user can fix is a one-line ``ModelError``: "<path>: <what> — <what to do>".
The model file is only ever read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import re
import struct
import zipfile
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from ..errors import ModelError
from .diffusers_sd import DiffusersSDBackbone
from .family_configs import family_config_dir
from .tokenizer_files import clip_tokenizer_dir, has_tokenizer

log = logging.getLogger("lora_trainer")

TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SUPPORTED_FAMILIES = ("sd1",)
UNET = "model.diffusion_model."
CLIP_L = "cond_stage_model.transformer."
CLIP_TOKEN_EMBEDDING = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"

Shapes = Dict[str, Tuple[int, ...]]


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__


# ---- reading tensor names and shapes ---------------------------------------------------------------------------
def read_safetensors_shapes(path: Path) -> Tuple[Shapes, Dict[str, str]]:
    """Tensor names -> shapes and the metadata, from the header alone; checks the file is complete."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelError(f"{path}: not a safetensors file (only {size} bytes) — the download or copy is "
                             "incomplete; get the file again")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 * 2 ** 20):
            raise ModelError(f"{path}: not a valid safetensors file (bad header) — the file is damaged or not a "
                             "safetensors file; get it again")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
        metadata = header.pop("__metadata__", None) or {}
        shapes = {k: tuple(int(d) for d in v["shape"]) for k, v in header.items()}
        end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, UnicodeDecodeError) as e:
        raise ModelError(f"{path}: not a valid safetensors file (unreadable header: {_first_line(e)}) — the "
                         "file is damaged; get it again") from e
    if 8 + n + end > size:
        raise ModelError(f"{path}: truncated ({size} bytes, the header announces {8 + n + end}) — the download or "
                         "copy did not finish; get the file again")
    return shapes, metadata


def load_torch_checkpoint(path: Path) -> Dict[str, Any]:
    """A .ckpt/.pt state dict, loaded with ``weights_only=True`` (no code from the file runs)."""
    kwargs: Dict[str, Any] = {"map_location": "cpu", "weights_only": True}
    if zipfile.is_zipfile(path):
        kwargs["mmap"] = True
    try:
        obj = torch.load(str(path), **kwargs)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower() or "weights_only" in str(e):
            raise ModelError(f"{path}: holds Python objects besides tensors, which are not loaded for safety — "
                             "convert it to .safetensors with a trusted tool, or use a .safetensors "
                             "version of the model") from e
        raise ModelError(f"{path}: not a readable checkpoint ({_first_line(e)}) — the file is damaged or not a "
                         "model; get it again") from e
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise ModelError(f"{path}: not a readable checkpoint ({_first_line(e)}) — the file is damaged or "
                         "incomplete; get it again") from e
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ModelError(f"{path}: holds a {type(obj).__name__}, not a state dict — give a Stable Diffusion "
                         "checkpoint")
    return obj


def _shapes_of(state_dict: Dict[str, Any]) -> Shapes:
    return {k: tuple(v.shape) for k, v in state_dict.items() if isinstance(v, torch.Tensor)}


# ---- family detection ------------------------------------------------------------------------------------------
def detect_family(shapes: Shapes, where: str, text_width: int = 768, in_channels: int = 4,
                  context_dim: int = 768) -> str:
    """'sd1' for an SD1.x text-to-image checkpoint in the original layout; a one-line ModelError otherwise."""
    keys = list(shapes)
    if not keys:
        raise ModelError(f"{where}: holds no tensors — give a Stable Diffusion 1.x checkpoint")

    def any_prefix(*prefixes: str) -> bool:
        return any(k.startswith(prefixes) for k in keys)

    def reject(what: str, todo: str = "choose a Stable Diffusion 1.x checkpoint") -> ModelError:
        return ModelError(f"{where}: {what} — {todo}")

    if any_prefix("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lycoris_") or any(
            ".lora_down." in k or ".lora_A." in k or ".lora.down." in k or ".hada_w1" in k for k in keys):
        raise reject("this is a LoRA file, not a base model",
                     "choose a full Stable Diffusion 1.x checkpoint as the base model (LoRA files go in models/Lora)")
    if any(".double_blocks." in k or k.startswith("double_blocks.") for k in keys):
        raise reject("a Flux model, which this trainer does not support yet")
    if any_prefix(UNET + "joint_blocks.", UNET + "x_embedder.", "joint_blocks."):
        raise reject("a Stable Diffusion 3 model, which this trainer does not support yet")
    if any_prefix("conditioner.embedders."):
        raise reject("an SDXL model, which this trainer does not support yet")
    if any_prefix("cond_stage_model.model."):
        raise reject("a Stable Diffusion 2.x model (OpenCLIP text encoder), which this trainer does not support yet")
    has_unet = any_prefix(UNET)
    if not has_unet and (any_prefix("encoder.conv_in.", "decoder.conv_in.", "first_stage_model.")):
        raise reject("a VAE file, not a full checkpoint",
                     "choose a full Stable Diffusion 1.x checkpoint as the base model")
    if not has_unet and any_prefix("down_blocks.", "conv_in.", "time_embedding."):
        raise reject("a diffusers UNet weights file, not a full checkpoint",
                     "give the whole diffusers folder (with model_index.json) or an original-format checkpoint")
    if not has_unet:
        raise reject("not a Stable Diffusion checkpoint (no model.diffusion_model.* weights)")
    conv_in = shapes.get(UNET + "input_blocks.0.0.weight")
    if conv_in is None or len(conv_in) != 4:
        raise reject("the UNet has no input layer (input_blocks.0.0) — not a complete SD checkpoint")
    if conv_in[1] != in_channels:
        what = {9: "an inpainting model (9 input channels)", 8: "an instruct-pix2pix model (8 input channels)"}.get(
            conv_in[1], f"a UNet with {conv_in[1]} input channels (expected {in_channels})")
        raise reject(f"{what}, which this trainer cannot train", "choose a text-to-image SD1.x checkpoint")
    if CLIP_TOKEN_EMBEDDING not in shapes:
        raise reject("has no CLIP text encoder (cond_stage_model.transformer.text_model.*)",
                     "choose a complete SD1.x checkpoint (UNet, VAE and text encoder)")
    width = shapes[CLIP_TOKEN_EMBEDDING][-1]
    if width != text_width:
        raise reject(f"its text encoder is {width} wide, SD1 has {text_width}",
                     "choose an SD1.x checkpoint, or pass the matching model_config")
    attn_k = [v for k, v in shapes.items() if k.startswith(UNET) and k.endswith("attn2.to_k.weight")]
    if attn_k and attn_k[0][-1] != context_dim:
        raise reject(f"its UNet cross-attention is {attn_k[0][-1]} wide, SD1 has {context_dim}",
                     "choose an SD1.x checkpoint, or pass the matching model_config")
    if not any_prefix("first_stage_model."):
        raise reject("has no VAE (first_stage_model.*)", "choose a complete SD1.x checkpoint")
    return "sd1"


def legacy_model_hash(path: Path) -> str:
    """A1111's old short hash (also kohya's ss_sd_model_hash): sha256 of 64 KiB at offset 1 MiB, 8 hex digits."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def _dtype_kwargs(dtype: torch.dtype) -> Dict[str, Any]:
    """Load in the target dtype; float32 is the default (and ``torch_dtype`` is deprecated in new diffusers)."""
    return {} if dtype in (None, torch.float32) else {"torch_dtype": dtype}


def _read_json(path: Path) -> Dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: unreadable JSON ({_first_line(e)}) — fix or replace the file") from e


def _prediction_from_files(path: Path, shapes: Shapes, config_dir: Path) -> Optional[str]:
    if "v_pred" in shapes:  # marker some tools (ComfyUI, kohya) add to v-prediction checkpoints
        return "v_prediction"
    yaml_file = path.with_suffix(".yaml")  # A1111's per-checkpoint LDM config
    if yaml_file.is_file():
        found = re.search(r"""^\s*parameterization:\s*["']?(\w+)""", yaml_file.read_text("utf-8", "replace"), re.M)
        if found:
            return "v_prediction" if found.group(1) == "v" else "epsilon"
    scheduler = config_dir / "scheduler" / "scheduler_config.json"
    if scheduler.is_file():
        return _read_json(scheduler).get("prediction_type")
    return None


# ---- the loader ------------------------------------------------------------------------------------------------
def load_backbone_from_path(base_model: str, model_config: str = "", family: str = "auto",
                            prediction_type: str = "auto", clip_skip: int = 1, device: Any = "cpu",
                            dtype: torch.dtype = torch.float32) -> DiffusersSDBackbone:
    """A ready, frozen, eval-mode backbone from a checkpoint file or a diffusers folder (offline)."""
    if not base_model:
        raise ModelError("base_model is empty — give a .safetensors/.ckpt checkpoint or a diffusers folder")
    path = Path(base_model).expanduser()
    if family not in ("auto",) + SUPPORTED_FAMILIES:
        raise ModelError(f"{path}: family {family!r} is not supported yet — use 'auto' or 'sd1'")
    if not path.exists():
        raise ModelError(f"{path}: no such file or folder — check the path (a .safetensors/.ckpt checkpoint or a "
                         "diffusers folder)")
    if path.is_dir():
        return _load_diffusers_folder(path, prediction_type, clip_skip, device, dtype)
    if path.stat().st_size == 0:
        raise ModelError(f"{path}: the file is empty (0 bytes) — the download or copy failed; get the file again")

    config_dir = family_config_dir("sd1", model_config)
    unet_cfg = _read_json(config_dir / "unet" / "config.json")
    te_cfg = _read_json(config_dir / "text_encoder" / "config.json")
    expected = dict(text_width=int(te_cfg.get("hidden_size", 768)), in_channels=int(unet_cfg.get("in_channels", 4)),
                    context_dim=int(unet_cfg.get("cross_attention_dim", 768)))

    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        shapes, _ = read_safetensors_shapes(path)
    elif suffix in TORCH_SUFFIXES:
        state_dict = load_torch_checkpoint(path)
        shapes = _shapes_of(state_dict)
        del state_dict
    else:
        raise ModelError(f"{path}: unknown model file type {suffix or '(none)'} — give a .safetensors or .ckpt "
                         "checkpoint, or a diffusers folder")
    detect_family(shapes, str(path), **expected)

    if prediction_type == "auto":
        prediction_type = _prediction_from_files(path, shapes, config_dir) or "epsilon"

    from diffusers import StableDiffusionPipeline

    log.info("loading %s (SD1, %s) with the config in %s", path, prediction_type, config_dir)
    try:
        pipe = StableDiffusionPipeline.from_single_file(
            str(path), config=str(config_dir), local_files_only=True, safety_checker=None,
            feature_extractor=None, **_dtype_kwargs(dtype))
    except ModelError:
        raise
    except Exception as e:  # diffusers raises many kinds; the user needs one line, the log keeps the rest
        log.debug("from_single_file failed", exc_info=True)
        raise ModelError(f"{path}: diffusers could not build the model ({_first_line(e)}) — check that it is an "
                         "SD1.x checkpoint that matches the model config") from e
    return _backbone_from_pipe(pipe, path.stem, legacy_model_hash(path), prediction_type, clip_skip, device, dtype)


def _load_diffusers_folder(path: Path, prediction_type: str, clip_skip: int, device: Any,
                           dtype: torch.dtype) -> DiffusersSDBackbone:
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise ModelError(f"{path}: a folder without model_index.json is not a diffusers model — give a "
                         ".safetensors/.ckpt checkpoint or a diffusers model folder")
    index = _read_json(index_file)
    cls = str(index.get("_class_name", ""))
    if "XL" in cls:
        raise ModelError(f"{path}: an SDXL model ({cls}), which this trainer does not support yet — choose an "
                         "SD1.x model")
    if cls not in ("StableDiffusionPipeline", ""):
        raise ModelError(f"{path}: a {cls} folder — choose a StableDiffusionPipeline (SD1.x text-to-image) model")
    for part in ("unet", "vae", "text_encoder"):
        if not (path / part / "config.json").is_file():
            raise ModelError(f"{path}: {part}/config.json is missing — the diffusers folder is incomplete")
    unet_cfg = _read_json(path / "unet" / "config.json")
    te_cfg = _read_json(path / "text_encoder" / "config.json")
    if int(unet_cfg.get("in_channels", 4)) != 4:
        raise ModelError(f"{path}: a UNet with {unet_cfg.get('in_channels')} input channels (inpainting or "
                         "similar), which this trainer cannot train — choose a text-to-image SD1.x model")
    if int(te_cfg.get("hidden_size", 768)) == 1024:
        raise ModelError(f"{path}: a Stable Diffusion 2.x model, which this trainer does not support yet — choose "
                         "an SD1.x model")

    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    extra: Dict[str, Any] = {}
    if not has_tokenizer(path / "tokenizer"):
        extra["tokenizer"] = CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir()))
    try:
        pipe = StableDiffusionPipeline.from_pretrained(str(path), local_files_only=True, safety_checker=None,
                                                       feature_extractor=None, **extra, **_dtype_kwargs(dtype))
    except Exception as e:
        log.debug("from_pretrained failed", exc_info=True)
        raise ModelError(f"{path}: diffusers could not load the folder ({_first_line(e)}) — check that the weights "
                         "files are complete") from e
    if prediction_type == "auto":
        prediction_type = pipe.scheduler.config.get("prediction_type") or "epsilon"
    return _backbone_from_pipe(pipe, path.name, None, prediction_type, clip_skip, device, dtype)


def _backbone_from_pipe(pipe: Any, name: str, model_hash: Optional[str], prediction_type: str, clip_skip: int,
                        device: Any, dtype: torch.dtype) -> DiffusersSDBackbone:
    modules = (pipe.unet, pipe.vae, pipe.text_encoder)
    for module in modules:
        module.eval().requires_grad_(False)
    scheduler_config = {k: v for k, v in dict(pipe.scheduler.config).items()}
    return DiffusersSDBackbone(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, scheduler_config, family="sd1",
                               prediction_type=prediction_type, model_name=name, model_hash=model_hash,
                               device=torch.device(device), dtype=dtype, clip_skip=clip_skip)
