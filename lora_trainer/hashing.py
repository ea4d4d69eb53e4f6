"""The hashes the WebUIs and kohya tools use to identify a LoRA file.

``addnet_hash`` is what A1111 shows in the ``Lora hashes:`` infotext and what kohya stores as
``sshs_model_hash``: sha256 of the bytes after the safetensors header. The tensor bytes do not
depend on the header, so the hash can be computed before the metadata holding it is written.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def addnet_hash(data: bytes) -> str:
    """sha256 of a serialized safetensors file, skipping its 8-byte length and JSON header."""
    header_len = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + header_len:]).hexdigest()


def addnet_legacy_hash(data: bytes) -> str:
    """kohya's legacy 8-hex hash: sha256 of 64 KiB starting at 1 MiB (empty for small files)."""
    return hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


def addnet_hash_file(path: Path) -> str:
    with open(path, "rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
        fh.seek(8 + header_len)
        digest = hashlib.sha256()
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
