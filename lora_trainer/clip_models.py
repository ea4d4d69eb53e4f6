"""Loading an open_clip model for captioning: a named tag (downloaded once), a local weights file, or random weights.

Written against the API that open_clip 2.20 (shipped with A1111 and Forge) and 3.x share:
``create_model_and_transforms(name, pretrained, device=, force_quick_gelu=, image_mean=, image_std=)``,
``get_tokenizer(name)``, ``get_pretrained_cfg``, ``list_pretrained_tags_by_model``, ``list_models``,
``add_model_config``. Local files are read here, not by open_clip, because 2.20 reads neither
``.safetensors`` nor OpenAI's TorchScript ``.pt`` through ``pretrained=PATH``.

Offline, a tag whose weights are not in open_clip's caches fails at once with the file to download,
instead of after a minute of retries.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import logging
import os
import socket
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlparse

from .errors import ModelError
from .tensor_files import load_tensors

logger = logging.getLogger("lora_trainer")

_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
_JIT_KEYS = ("input_resolution", "context_length", "vocab_size")  # extra entries in OpenAI's TorchScript files
_IGNORED_MISSING = ("logit_bias", "text.transformer.embeddings.position_ids")
_HF_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_RANDOM = ("", "none", "random")


@dataclass
class ClipModel:
    model: Any  # open_clip CLIP / CustomTextCLIP, in eval mode on ``device``
    preprocess: Callable  # PIL image -> float tensor [3, H, W]
    tokenizer: Callable  # list of texts -> LongTensor [n, context_length]
    name: str
    model_id: str  # identifies the weights, for caches; "" for random weights (nothing is cached)
    device: str


def load_clip(model_name: str = "ViT-L-14", pretrained: str = "openai", device: str | None = None) -> ClipModel:
    """Build ``model_name`` with weights from a tag (``openai``), a file, or ``none`` (random; tests only)."""
    open_clip = _import_open_clip()
    import torch

    name = _model_name(open_clip, model_name)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pretrained = (pretrained or "").strip()
    if name.startswith("hf-hub:"):
        model, preprocess = _load_hf_hub(open_clip, name)
        model_id = name
    elif pretrained.lower() in _RANDOM:
        logger.warning("CLIP %s has random weights (--pretrained none): its captions mean nothing", name)
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
        model_id = ""
    elif _looks_like_path(pretrained):
        model, preprocess = _load_file(open_clip, name, Path(pretrained).expanduser())
        model_id = f"{name}|{_file_identity(Path(pretrained).expanduser())}"
    else:
        model, preprocess = _load_tag(open_clip, name, pretrained)
        model_id = f"{name}|{pretrained}"
    model = model.to(device).eval()
    return ClipModel(model, preprocess, open_clip.get_tokenizer(name), name, model_id, device)


# -- names ----------------------------------------------------------------------------------------

def _import_open_clip():
    try:
        import open_clip
    except ImportError:
        raise ModelError("captioning needs open_clip: pip install open_clip_torch") from None
    return open_clip


def _model_name(open_clip, model_name: str) -> str:
    """A registered model name; a ``.json`` config file path is registered first (its stem is the name)."""
    model_name = model_name.strip()
    if model_name.lower().endswith(".json"):
        path = Path(model_name).expanduser()
        if not path.is_file():
            raise ModelError(f"model config {path} does not exist; give an open_clip model name or a .json config")
        open_clip.add_model_config(path)
        return path.stem
    if model_name.startswith("hf-hub:"):
        return model_name
    name = model_name.replace("/", "-")  # "ViT-L/14" as OpenAI spells it
    models = open_clip.list_models()
    if name not in models:
        close = difflib.get_close_matches(name, models, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else "see open_clip.list_models()"
        raise ModelError(f"unknown CLIP model {model_name!r}: {hint}")
    return name


def _looks_like_path(pretrained: str) -> bool:
    return (os.sep in pretrained or "/" in pretrained or pretrained.startswith("~")
            or pretrained.lower().endswith(_WEIGHT_SUFFIXES) or Path(pretrained).is_file())


def _file_identity(path: Path) -> str:
    """Path, size and modification time: a cheap stand-in for hashing a gigabyte file."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    return f"file-{path.stem}-{hashlib.sha256(key.encode('utf-8')).hexdigest()[:12]}"


# -- named tags --------------------------------------------------------------------------------

def _load_tag(open_clip, name: str, tag: str):
    tags = open_clip.list_pretrained_tags_by_model(name)
    match = next((t for t in tags if t.lower() == tag.lower()), None)
    if match is None:
        known = ", ".join(tags) if tags else "none (use --pretrained PATH to a weights file)"
        raise ModelError(f"{tag!r} is neither a weights file nor a pretrained tag of {name}; known tags: {known}")
    cfg = open_clip.get_pretrained_cfg(name, match) or {}
    cached = _cached_weights(cfg)
    if cached is not None:
        logger.info("loading CLIP %s (%s) from %s", name, match, cached)
        return _load_file(open_clip, name, cached, cfg)
    wanted = _file_to_provide(cfg)
    if not _online(cfg):
        raise ModelError(f"cannot download the weights of CLIP {name} ({match}): no network. Download {wanted} "
                         f"on a connected machine and pass --pretrained /path/to/{_basename(wanted)}")
    logger.info("downloading CLIP %s (%s) weights, once (about 0.3-2 GB)", name, match)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=match)
    except Exception as exc:  # noqa: BLE001 - urllib, huggingface_hub and open_clip all raise their own types
        reason = str(exc).splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load the weights of CLIP {name} ({match}): {reason}. Download {wanted} and pass "
                         f"--pretrained /path/to/{_basename(wanted)}") from None
    return model, preprocess


def _load_hf_hub(open_clip, name: str):
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name)
    except Exception as exc:  # noqa: BLE001 - see _load_tag
        repo = name[len("hf-hub:"):]
        raise ModelError(f"cannot load CLIP {name} ({type(exc).__name__}): it needs the network once, or "
                         f"https://huggingface.co/{repo} in the Hugging Face cache") from None
    return model, preprocess


def _cached_weights(cfg: dict) -> Path | None:
    """The tag's weights if open_clip already downloaded them (its URL cache or the Hugging Face cache)."""
    url = cfg.get("url") or ""
    if url:
        path = Path("~/.cache/clip").expanduser() / os.path.basename(urlparse(url).path)
        if path.is_file() and _checksum_ok(path, url):
            return path
    repo, filename = _hf_repo(cfg)
    if repo:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return None
        for candidate in ([filename] if filename else list(_HF_FILES)):
            found = try_to_load_from_cache(repo, candidate)
            if isinstance(found, str) and os.path.isfile(found):
                return Path(found)
    return None


def _checksum_ok(path: Path, url: str) -> bool:
    """open_clip's own check of a URL download (the sha256 prefix is part of the URL), so half files are refused."""
    if "openaipublic" in url:
        expected = url.rstrip("/").split("/")[-2]
    elif "mlfoundations" in url:
        expected = os.path.splitext(os.path.basename(url))[0].split("-")[-1]
    else:
        return True
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest().startswith(expected)


def _hf_repo(cfg: dict) -> tuple[str, str]:
    hub = cfg.get("hf_hub") or ""
    if not hub:
        return "", ""
    repo, filename = os.path.split(hub)  # "org/name/" -> ("org/name", ""); "org/name/file.bin" -> (.., "file.bin")
    return repo, filename


def _file_to_provide(cfg: dict) -> str:
    """One URL whose file ``--pretrained`` reads as it is: the direct URL if the tag has one, else the Hub file."""
    if cfg.get("url"):
        return cfg["url"]
    repo, filename = _hf_repo(cfg)
    return f"{_hf_endpoint()}/{repo}/resolve/main/{filename or _HF_FILES[1]}"


def _basename(url: str) -> str:
    return os.path.basename(urlparse(url).path)


def _hf_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _online(cfg: dict, timeout: float = 3.0) -> bool:
    """Whether a download host of the tag answers; with a proxy configured, assume it does."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    hosts = [urlparse(_hf_endpoint()).hostname] if cfg.get("hf_hub") else []
    hosts += [urlparse(cfg["url"]).hostname] if cfg.get("url") else []
    for host in filter(None, hosts):
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            return True
        except OSError:
            continue
    return False


# -- local files -------------------------------------------------------------------------------

def _load_file(open_clip, name: str, path: Path, cfg: dict | None = None):
    """Build ``name`` and load the weights in ``path`` (.safetensors, a state dict, or OpenAI's TorchScript .pt)."""
    cfg = cfg or {}
    if not path.is_file():
        raise ModelError(f"CLIP weights file {path} does not exist; give an existing file or a pretrained tag")
    state, is_openai_jit = _read_state_dict(path)
    quick_gelu = bool(cfg.get("quick_gelu")) or is_openai_jit  # OpenAI's weights were trained with QuickGELU
    # open_clip 3 tags also name an interpolation and resize mode; 2.20 has neither the keys nor the arguments.
    extra = {f"image_{k}": cfg[k] for k in ("interpolation", "resize_mode") if cfg.get(k)}
    with _no_random_weights_warning():  # the weights are loaded right below
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=None, force_quick_gelu=quick_gelu, image_mean=cfg.get("mean"), image_std=cfg.get("std"),
            **extra)
    _load_state(open_clip, model, state, path, name)
    return model, preprocess


@contextlib.contextmanager
def _no_random_weights_warning() -> Iterator[None]:
    """open_clip 3 logs "Model initialized randomly" on the root logger for ``pretrained=None``: drop that line."""
    def keep(record: logging.LogRecord) -> bool:
        return "initialized randomly" not in str(record.msg)

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def _read_state_dict(path: Path) -> tuple[dict, bool]:
    import torch

    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            return _clean(load_file(str(path))), False
        if _is_torchscript(path):
            with warnings.catch_warnings():  # torch >= 2.9 deprecates jit.load; OpenAI's files are TorchScript
                warnings.simplefilter("ignore", FutureWarning)
                return _clean(torch.jit.load(str(path), map_location="cpu").state_dict()), True
        return _clean(load_tensors(path)), False
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - torch and safetensors raise many types for a bad file
        reason = str(exc).splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{path}: cannot be read as CLIP weights ({reason}); give a .safetensors, .pt or .bin "
                         "file of an open_clip or OpenAI CLIP model") from None


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in archive.namelist())


def _clean(checkpoint: Any) -> dict:
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict) or not checkpoint:
        raise ModelError("the file holds no state dict")
    if all(k.startswith("module.") for k in checkpoint):
        checkpoint = {k[len("module."):]: v for k, v in checkpoint.items()}
    return {k: v for k, v in checkpoint.items() if k not in _JIT_KEYS}


def _load_state(open_clip, model, state: dict, path: Path, name: str) -> None:
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = open_clip.model.convert_to_custom_text_state_dict(state)
    transient = {n for n, _ in model.named_buffers()} - set(model.state_dict())  # e.g. attn_mask, when traced
    state = {k: v for k, v in state.items() if k not in transient}
    if "logit_scale" in state and state["logit_scale"].ndim != model.logit_scale.ndim:
        state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        first = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc)[:160])
        raise ModelError(f"{path} does not fit CLIP {name} ({first}); pass the --model these weights belong to") \
            from None
    missing = [k for k in result.missing_keys if k not in _IGNORED_MISSING]
    if missing or result.unexpected_keys:
        example = (missing or result.unexpected_keys)[0]
        raise ModelError(f"{path} does not fit CLIP {name}: {len(missing)} missing and {len(result.unexpected_keys)} "
                         f"unexpected weights (e.g. {example}); pass the --model these weights belong to")
