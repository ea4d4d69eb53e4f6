"""Latents and text-encoder outputs kept in files, so memory stays flat with dataset size and later runs reuse them.

Each entry is one small safetensors file named by a hash of everything that decides its content: for a latent,
the image file (path, size, modification time), its bucket and crop, the mirror flag, the mask, and the model; for
a text embedding, the caption, the size (SDXL) and the model. A changed image, resolution, bucket or model makes
a new name, so a stale entry is never read; the old files are just no longer used. "The model" is a fingerprint
of what it computes (a fixed probe encoded once per run), not a file hash: it works for the WebUI's loaded model,
whose file may be gigabytes or absent, and costs one tiny encode.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch

from .files import write_atomic

logger = logging.getLogger("lora_trainer")


class DiskCache:
    """Tensors by key under ``folder/<kind>/<2 hex>/<hash>.safetensors``; writes are atomic (temp file + rename)."""

    def __init__(self, folder: Path, kind: str, fingerprint: str):
        self.folder, self.kind, self.fingerprint = Path(folder) / kind, kind, fingerprint
        self.hits = self.misses = 0

    def path(self, key: Dict[str, Any]) -> Path:
        text = json.dumps({"fingerprint": self.fingerprint, **key}, sort_keys=True, default=str)
        digest = hashlib.sha256(text.encode()).hexdigest()
        return self.folder / digest[:2] / f"{digest}.safetensors"

    def get(self, key: Dict[str, Any]) -> Optional[Dict[str, torch.Tensor]]:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = self.path(key)
        if not path.is_file():
            self.misses += 1
            return None
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:  # a damaged entry is encoded again, not fatal
            logger.warning("cache entry %s is unreadable (%s); encoding it again", path, exc)
            self.misses += 1
            return None
        self.hits += 1
        return tensors

    def put(self, key: Dict[str, Any], tensors: Dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        write_atomic(path, lambda tmp: save_file(contiguous, str(tmp)))


def image_key(path: Path, **details: Any) -> Dict[str, Any]:
    """What identifies an image's latent: the file by path, size and modification time (so an edited or replaced
    image is encoded again without reading every file on each run), plus ``details`` (bucket, crop, flip, mask)."""
    stat = Path(path).stat()
    return {"image": str(Path(path).resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, **details}


def file_stamp(path: Optional[Path]) -> Optional[list]:
    if path is None:
        return None
    stat = Path(path).stat()
    return [str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns]


def fingerprint(encode: Callable[[], Any]) -> str:
    """A short hash of what ``encode()`` returns for a fixed probe, rounded to 3 significant digits so run-to-run
    noise in the last bits (GPU kernels) does not change it, while any other model or setting does."""
    with torch.no_grad():
        out = encode()
    parts = out.values() if isinstance(out, dict) else [out]
    digest = hashlib.sha256()
    for part in parts:
        values = part.detach().float().cpu().flatten()[:4096]
        digest.update(str(list(values.shape)).encode())
        digest.update(json.dumps([float(f"{v:.3g}") for v in values.tolist()]).encode())
    return digest.hexdigest()[:16]
