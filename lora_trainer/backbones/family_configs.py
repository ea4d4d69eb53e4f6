"""Ready-to-use diffusers config folders (no weights) for loading original-format checkpoints offline.

``StableDiffusionPipeline.from_single_file(path, config=folder, local_files_only=True)`` needs a local
diffusers-layout folder with each component's config and a tokenizer; without one it goes to the hub.
The package bundles the JSON configs per family (``sd_configs/<family>/``); the tokenizer is generated
(see ``tokenizer_files``). Both are assembled once in the cache.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import List

from ..errors import ModelError
from .tokenizer_files import build_atomically, cache_root, clip_tokenizer_dir, has_tokenizer

BUNDLED = Path(__file__).resolve().parent / "sd_configs"
CONFIG_SUFFIXES = (".json", ".txt", ".yaml")  # what we copy from a config folder: never weights


def bundled_families() -> List[str]:
    return sorted(p.name for p in BUNDLED.iterdir() if (p / "model_index.json").is_file())


def _config_files(folder: Path) -> List[Path]:
    """The small config files of a diffusers folder (top level and one level of component folders)."""
    files = [p for p in folder.glob("*") if p.is_file() and p.suffix in CONFIG_SUFFIXES]
    files += [p for p in folder.glob("*/*") if p.is_file() and p.suffix in CONFIG_SUFFIXES]
    return sorted(files)


def _digest(folder: Path, files: List[Path]) -> str:
    h = hashlib.sha256()
    for p in files:
        h.update(p.relative_to(folder).as_posix().encode())
        h.update(b"\0")
        h.update(p.read_bytes())
    return h.hexdigest()[:12]


def _assemble(source: Path, name: str) -> Path:
    """Copy ``source``'s config files plus the generated tokenizer into ``<cache>/configs/<name>-<digest>``."""
    files = [p for p in _config_files(source) if p.relative_to(source).parts[0] != "tokenizer"]
    target = cache_root() / "configs" / f"{name}-{_digest(source, files)}"

    def fill(tmp: Path) -> None:
        for p in files:
            dest = tmp / p.relative_to(source)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, dest)
        shutil.copytree(clip_tokenizer_dir(), tmp / "tokenizer")

    return build_atomically(target, fill)


def family_config_dir(family: str, model_config: str = "") -> Path:
    """A local diffusers config folder (with ``tokenizer/``) for ``family``, or for the user's ``model_config``.

    ``model_config`` is used as it is when it has a tokenizer; otherwise its config files are copied into the
    cache next to a generated tokenizer (the user's folder is never written to).
    """
    if model_config:
        folder = Path(model_config).expanduser()
        if not (folder / "model_index.json").is_file():
            raise ModelError(f"{folder}: not a diffusers config folder (no model_index.json) — give the folder "
                             "that holds model_index.json, unet/, vae/, text_encoder/ and scheduler/")
        if has_tokenizer(folder / "tokenizer"):
            return folder
        return _assemble(folder, "custom")
    source = BUNDLED / family
    if not (source / "model_index.json").is_file():
        raise ModelError(f"{family}: no bundled model config for this family (have: {', '.join(bundled_families())})"
                         " — pass model_config=<a diffusers config folder>")
    return _assemble(source, family)
