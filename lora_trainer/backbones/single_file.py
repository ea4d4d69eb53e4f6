"""Load a base model from disk (standalone mode): an original-format checkpoint or a diffusers folder.

* ``.safetensors`` / ``.ckpt`` in the original (LDM / A1111) layout: the family is read from the tensor names
  and shapes first (the safetensors header only; nothing is loaded twice in memory), then diffusers'
  ``from_single_file`` builds the modules from a LOCAL config folder (bundled or the user's), offline.
* a diffusers folder: ``from_pretrained(local_files_only=True)``; missing tokenizers are generated.

SD1.x, SD2.x (512 epsilon or 768 v-prediction) and SDXL base are recognised (``detect``); anything else is
refused with one line saying what it is.

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
from .detect import FAMILY_NAMES, SUPPORTED, Shapes, check_fits_config, detect_family
from .diffusers_sd import DiffusersSDBackbone
from .family_configs import family_config_dir, tokenizer_pads
from .tokenizer_files import clip_tokenizer_dir, has_tokenizer

log = logging.getLogger("lora_trainer")

TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SUPPORTED_FAMILIES = ("sd1", "sd2", "sdxl")


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
        if n < 2 or n > 100 * 2 ** 20:
            raise ModelError(f"{path}: not a valid safetensors file (bad header) — the file is damaged or not a "
                             "safetensors file; get it again")
        if n > size - 8:
            raise ModelError(f"{path}: truncated ({size} bytes, its header alone needs {8 + n}) — the download or "
                             "copy did not finish; get the file again")
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


def _prediction_marker(path: Path, shapes: Shapes) -> Optional[str]:
    """v-prediction as the checkpoint or its neighbourhood declares it, or None when nothing says."""
    if "v_pred" in shapes:  # marker some tools (ComfyUI, kohya) add to v-prediction checkpoints
        return "v_prediction"
    yaml_file = path.with_suffix(".yaml")  # A1111's per-checkpoint LDM config
    if yaml_file.is_file():
        found = re.search(r"""^\s*parameterization:\s*["']?(\w+)""", yaml_file.read_text("utf-8", "replace"), re.M)
        return "v_prediction" if found and found.group(1) == "v" else "epsilon"
    return None


def _scheduler_prediction(config_dir: Path) -> Optional[str]:
    scheduler = config_dir / "scheduler" / "scheduler_config.json"
    return _read_json(scheduler).get("prediction_type") if scheduler.is_file() else None


def looks_like_v_prediction(unet: Any) -> bool:
    """A1111's test for SD2 checkpoints that do not say (``sd_models_config.is_using_v_parameterization_for_sd2``):
    at t=999 on a constant input, a v-model's output sits far below its input, an epsilon model's near it."""
    param = next(unet.parameters())
    context_dim = int(unet.config.cross_attention_dim)
    with torch.no_grad():
        x = torch.full((1, int(unet.config.in_channels), 8, 8), 0.5, device=param.device, dtype=param.dtype)
        cond = torch.full((1, 2, context_dim), 0.5, device=param.device, dtype=param.dtype)
        out = unet(x, torch.tensor([999], device=param.device), encoder_hidden_states=cond).sample
        return float((out.float() - x.float()).mean()) < -1


def _check_family(path: Path, family: str, detected: str) -> None:
    if family not in ("auto", detected):
        raise ModelError(f"{path}: family is set to {family!r} but the checkpoint is "
                         f"{FAMILY_NAMES.get(detected, detected)} — set family: auto (or {detected})")


# ---- the loader ------------------------------------------------------------------------------------------------
def load_backbone_from_path(base_model: str, model_config: str = "", family: str = "auto",
                            prediction_type: str = "auto", clip_skip: int = 1, device: Any = "cpu",
                            dtype: torch.dtype = torch.float32) -> DiffusersSDBackbone:
    """A ready, frozen, eval-mode backbone from a checkpoint file or a diffusers folder (offline).

    The family (SD1, SD2, SDXL) is read from the checkpoint; ``family`` other than "auto" only confirms it.
    ``prediction_type`` "auto" takes a ``v_pred`` key, the ``<name>.yaml`` beside the checkpoint, the given
    ``model_config``'s scheduler, and for an SD2 checkpoint that says nothing, A1111's test of the UNet.
    """
    if not base_model:
        raise ModelError("base_model is empty — give a .safetensors/.ckpt checkpoint or a diffusers folder")
    path = Path(base_model).expanduser()
    if family not in ("auto",) + SUPPORTED_FAMILIES:
        raise ModelError(f"{path}: family {family!r} is not supported — use auto, {', '.join(SUPPORTED_FAMILIES)}")
    if not path.exists():
        raise ModelError(f"{path}: no such file or folder — check the path (a .safetensors/.ckpt checkpoint or a "
                         "diffusers folder)")
    if path.is_dir():
        return _load_diffusers_folder(path, family, prediction_type, clip_skip, device, dtype)
    if path.stat().st_size == 0:
        raise ModelError(f"{path}: the file is empty (0 bytes) — the download or copy failed; get the file again")

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
    detected = detect_family(shapes, str(path))
    _check_family(path, family, detected)

    if prediction_type == "auto":
        prediction_type = _prediction_marker(path, shapes)
        if prediction_type is None and model_config:
            prediction_type = _scheduler_prediction(Path(model_config).expanduser())
        if prediction_type is None and detected != "sd2":
            prediction_type = "epsilon"
    config_name = "sd2-v" if detected == "sd2" and prediction_type == "v_prediction" else detected
    config_dir = family_config_dir(config_name, model_config)
    unet_cfg = _read_json(config_dir / "unet" / "config.json")
    te_cfg = _read_json(config_dir / "text_encoder" / "config.json")
    te2_file = config_dir / "text_encoder_2" / "config.json"
    check_fits_config(shapes, str(path), detected, text_width=int(te_cfg.get("hidden_size", 0)),
                      context_dim=int(unet_cfg.get("cross_attention_dim", 0)),
                      text_width_2=int(_read_json(te2_file).get("hidden_size", 0)) if te2_file.is_file() else 0)

    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    name = FAMILY_NAMES[detected]
    log.info("loading %s (%s, %s) with the config in %s", path, name, prediction_type or "prediction to be tested",
             config_dir)
    try:
        if detected == "sdxl":
            pipe = StableDiffusionXLPipeline.from_single_file(
                str(path), config=str(config_dir), local_files_only=True, add_watermarker=False,
                **_dtype_kwargs(dtype))
        else:
            pipe = StableDiffusionPipeline.from_single_file(
                str(path), config=str(config_dir), local_files_only=True, safety_checker=None,
                feature_extractor=None, **_dtype_kwargs(dtype))
    except ModelError:
        raise
    except Exception as e:  # diffusers raises many kinds; the user needs one line, the log keeps the rest
        log.debug("from_single_file failed", exc_info=True)
        raise ModelError(f"{path}: diffusers could not build the model ({_first_line(e)}) — check that it is an "
                         f"{name} checkpoint that matches the model config") from e
    if prediction_type is None:
        prediction_type = "v_prediction" if looks_like_v_prediction(pipe.unet) else "epsilon"
        log.info("%s: an SD2 checkpoint without a v_pred key or .yaml; A1111's test of the UNet says %s "
                 "(set prediction_type to override)", path.name, prediction_type)
    return _backbone_from_pipe(pipe, detected, path.stem, legacy_model_hash(path), prediction_type, clip_skip,
                               device, dtype)


_FOLDER_PIPELINES = {"StableDiffusionPipeline": "sd", "": "sd", "StableDiffusionXLPipeline": "sdxl",
                     "StableDiffusionXLImg2ImgPipeline": "sdxl"}


def diffusers_folder_family(path: Path) -> str:
    """'sd1', 'sd2' or 'sdxl' for a diffusers model folder, from its config files; one ModelError line otherwise."""
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise ModelError(f"{path}: a folder without model_index.json is not a diffusers model — give a "
                         ".safetensors/.ckpt checkpoint or a diffusers model folder")
    index = _read_json(index_file)
    cls = str(index.get("_class_name", ""))
    kind = _FOLDER_PIPELINES.get(cls)
    if kind is None:
        raise ModelError(f"{path}: a {cls} folder, which this trainer cannot train — choose an {SUPPORTED} "
                         "model (StableDiffusionPipeline or StableDiffusionXLPipeline)")
    if kind == "sdxl" and "text_encoder" in index and not (index["text_encoder"] or [None])[0]:
        raise ModelError(f"{path}: the SDXL refiner (one OpenCLIP text encoder; it only refines images), which this "
                         f"trainer cannot train — choose an {SUPPORTED} model")
    parts = ("unet", "vae", "text_encoder") + (("text_encoder_2",) if kind == "sdxl" else ())
    for part in parts:
        if not (path / part / "config.json").is_file():
            raise ModelError(f"{path}: {part}/config.json is missing — the diffusers folder is incomplete")
    unet_cfg = _read_json(path / "unet" / "config.json")
    if int(unet_cfg.get("in_channels", 4)) != 4:
        raise ModelError(f"{path}: a UNet with {unet_cfg.get('in_channels')} input channels (inpainting or "
                         f"similar), which this trainer cannot train — choose a text-to-image {SUPPORTED} model")
    if kind == "sdxl":
        return "sdxl"
    te_cfg = _read_json(path / "text_encoder" / "config.json")
    # SD2's OpenCLIP-H uses gelu (and is 1024 wide); SD1's OpenAI CLIP-L uses quick_gelu.
    open_clip = te_cfg.get("hidden_act") == "gelu" or int(te_cfg.get("hidden_size", 768)) == 1024
    return "sd2" if open_clip else "sd1"


def _load_diffusers_folder(path: Path, family: str, prediction_type: str, clip_skip: int, device: Any,
                           dtype: torch.dtype) -> DiffusersSDBackbone:
    detected = diffusers_folder_family(path)
    _check_family(path, family, detected)

    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    extra: Dict[str, Any] = {}
    for folder, pad in tokenizer_pads(detected).items():
        if not has_tokenizer(path / folder):
            extra[folder] = CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir(pad)))
    try:
        if detected == "sdxl":
            pipe = StableDiffusionXLPipeline.from_pretrained(str(path), local_files_only=True, add_watermarker=False,
                                                             **extra, **_dtype_kwargs(dtype))
        else:
            pipe = StableDiffusionPipeline.from_pretrained(str(path), local_files_only=True, safety_checker=None,
                                                           feature_extractor=None, **extra, **_dtype_kwargs(dtype))
    except Exception as e:
        log.debug("from_pretrained failed", exc_info=True)
        raise ModelError(f"{path}: diffusers could not load the folder ({_first_line(e)}) — check that the weights "
                         "files are complete") from e
    if prediction_type == "auto":
        prediction_type = pipe.scheduler.config.get("prediction_type") or "epsilon"
    return _backbone_from_pipe(pipe, detected, path.name, None, prediction_type, clip_skip, device, dtype)


def _backbone_from_pipe(pipe: Any, family: str, name: str, model_hash: Optional[str], prediction_type: str,
                        clip_skip: int, device: Any, dtype: torch.dtype) -> DiffusersSDBackbone:
    modules = [pipe.unet, pipe.vae, pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])
    for module in modules:
        module.eval().requires_grad_(False)
    scheduler_config = dict(pipe.scheduler.config)
    common = dict(prediction_type=prediction_type, model_name=name, model_hash=model_hash,
                  device=torch.device(device), dtype=dtype, clip_skip=clip_skip)
    if family == "sdxl":
        from .diffusers_sdxl import DiffusersSDXLBackbone

        return DiffusersSDXLBackbone(pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.tokenizer,
                                     pipe.tokenizer_2, scheduler_config, **common)
    return DiffusersSDBackbone(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, scheduler_config,
                               family=family, **common)
