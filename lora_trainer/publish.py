"""Putting a finished LoRA where the WebUI finds it: ``<lora_dir>/[subfolder/]name.safetensors`` + sidecars.

Forge caches LoRA tensors by file name and A1111 resolves ``<lora:name>`` by stem across all
sub-folders, so every run gets a name that no LoRA in the folder has yet.
"""

from __future__ import annotations

from pathlib import Path
from typing import List

from .config import is_safe_name
from .errors import ConfigError
from .files import copy_atomic
from .run_folder import RunFolder

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")


def taken_names(lora_dir: Path) -> set:
    """Stems of every LoRA file under ``lora_dir`` (the WebUI scans sub-folders too)."""
    if not lora_dir.is_dir():
        return set()
    return {p.stem.lower() for p in lora_dir.rglob("*") if p.suffix.lower() in LORA_SUFFIXES}


def unique_name(name: str, output_dir: Path, lora_dir: Path) -> str:
    """``name``, or ``name-2``, ``name-3``, ...: free both as a run folder and as a LoRA name."""
    taken = taken_names(lora_dir)
    for n in range(1, 100_000):
        candidate = name if n == 1 else f"{name}-{n}"
        if candidate.lower() not in taken and not (output_dir / candidate).exists():
            return candidate
    raise ConfigError(f"too many LoRAs named {name!r} in {lora_dir}; choose another output_name")


def publish_lora(run: RunFolder, lora_dir: Path, subfolder: str = "") -> List[Path]:
    """Copy the LoRA, its ``.json`` and ``.preview.png`` into the WebUI's folder (atomically)."""
    if subfolder and not all(is_safe_name(part) for part in Path(subfolder).parts):
        raise ConfigError(f"LoRA sub-folder {subfolder!r} must be plain folder names, without '..'")
    target = Path(lora_dir) / subfolder
    copied = []
    for source in (run.lora_path, run.sidecar_path, run.preview_path):
        if source.is_file():
            copied.append(copy_atomic(source, target / source.name))
    return copied
