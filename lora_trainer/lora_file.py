"""Reading and writing LoRA files in the kohya format that A1111, Forge and ComfyUI load.

Keys are ``<kohya module name>.lora_down.weight``, ``.lora_up.weight`` and ``.alpha`` (always
written: without it the loaders use scale 1.0). All metadata values are strings.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Tuple

import torch

from .errors import ModelError
from .files import write_bytes_atomic
from .hashing import addnet_hash, addnet_legacy_hash

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# LoRA / LoCon / DoRA, LoHa, LoKr: a file holding none of these is not a LoRA we can read.
WEIGHT_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".hada_w1_a", ".lokr_w1", ".lokr_w1_a")


def save_lora_file(path: Path, tensors: Dict[str, torch.Tensor], metadata: Dict[str, str],
                   precision: str = "fp32") -> Path:
    """Write ``tensors`` (cast to ``precision``; alphas stay fp32) with metadata, atomically.

    ``sshs_model_hash``/``sshs_legacy_hash`` are filled in from the tensor bytes, as kohya does.
    """
    from safetensors.torch import save

    dtype = DTYPES[precision]
    out = {k: (v.float() if k.endswith(".alpha") else v.to(dtype)).detach().cpu().contiguous()
           for k, v in tensors.items()}
    probe = save(out, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    metadata = {**metadata, "sshs_model_hash": addnet_hash(probe), "sshs_legacy_hash": addnet_legacy_hash(probe)}
    return write_bytes_atomic(Path(path), save(out, {k: str(v) for k, v in metadata.items()}))


def read_lora_file(path: Path) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Tensors (fp32, CPU) and metadata of a LoRA file, or one ModelError line saying what is wrong."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: LoRA file not found; check the path")
    if path.suffix.lower() != ".safetensors":
        raise ModelError(f"{path}: expected a .safetensors LoRA file")
    try:
        tensors = load_file(str(path))
        metadata = read_metadata(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"{path}: not a readable safetensors file ({str(exc).splitlines()[0][:120]})") from None
    if not any(k.endswith(WEIGHT_SUFFIXES) for k in tensors):
        raise ModelError(f"{path}: holds no LoRA weights (no .lora_down/.lora_up, LoHa or LoKr keys); is it a full "
                         "checkpoint?")
    return {k: v.float() for k, v in tensors.items()}, metadata


def read_metadata(path: Path) -> Dict[str, str]:
    """The ``__metadata__`` block of a safetensors file, read from the header only."""
    with open(path, "rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
        if header_len <= 0 or header_len > 100_000_000:
            raise ValueError("bad header length")
        header = json.loads(fh.read(header_len))
    return dict(header.get("__metadata__", {}))
