"""Ready-to-use diffusers config folders (no weights) for loading original-format checkpoints offline.

``StableDiffusionPipeline.from_single_file(path, config=folder, local_files_only=True)`` needs a local
diffusers-layout folder with each component's config and a tokenizer; without one it goes to the hub.
The package bundles the JSON configs per family (``sd_configs/<family>/``: ``sd1``, ``sd2`` (512 px, epsilon),
``sd2-v`` (768 px, v-prediction) and ``sdxl`` (base 1.0)); the tokenizers are generated (see ``tokenizer_files``:
CLIP's pads with ``<|endoftext|>``, OpenCLIP's, for SD2 and SDXL's ``tokenizer_2``, with "!"). Both are assembled
once in the cache.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Dict, List

from ..errors import ModelError
from .tokenizer_files import EOS, OPEN_CLIP_PAD, build_atomically, cache_root, clip_tokenizer_dir, has_tokenizer

BUNDLED = Path(__file__).resolve().parent / "sd_configs"
CONFIG_SUFFIXES = (".json", ".txt", ".yaml")  # what we copy from a config folder: never weights


def bundled_families() -> List[str]:
    return sorted(p.name for p in BUNDLED.iterdir() if (p / "model_index.json").is_file())


def tokenizer_pads(family: str) -> Dict[str, str]:
    """The tokenizer folders a family's pipeline needs -> the pad token each one uses."""
    if family == "sdxl":
        return {"tokenizer": EOS, "tokenizer_2": OPEN_CLIP_PAD}
    if family.startswith("sd2"):
        return {"tokenizer": OPEN_CLIP_PAD}
    return {"tokenizer": EOS}


def has_tokenizers(folder: Path, family: str) -> bool:
    return all(has_tokenizer(folder / name) for name in tokenizer_pads(family))


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


def _assemble(source: Path, name: str, family: str) -> Path:
    """Copy ``source``'s config files plus the generated tokenizers into ``<cache>/configs/<name>-<digest>``."""
    pads = tokenizer_pads(family)
    files = [p for p in _config_files(source) if p.relative_to(source).parts[0] not in pads]
    target = cache_root() / "configs" / f"{name}-{_digest(source, files)}"

    def fill(tmp: Path) -> None:
        for p in files:
            dest = tmp / p.relative_to(source)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, dest)
        for folder, pad in pads.items():
            shutil.copytree(clip_tokenizer_dir(pad), tmp / folder)

    return build_atomically(target, fill)


def family_config_dir(family: str, model_config: str = "") -> Path:
    """A local diffusers config folder (with its tokenizers) for ``family`` (``sd1``, ``sd2``, ``sd2-v``, ``sdxl``),
    or for the user's ``model_config``.

    ``model_config`` is used as it is when it has the tokenizers; otherwise its config files are copied into the
    cache next to generated tokenizers (the user's folder is never written to).
    """
    if model_config:
        folder = Path(model_config).expanduser()
        if not (folder / "model_index.json").is_file():
            raise ModelError(f"{folder}: not a diffusers config folder (no model_index.json) — give the folder "
                             "that holds model_index.json, unet/, vae/, text_encoder/ and scheduler/")
        if has_tokenizers(folder, family):
            return folder
        return _assemble(folder, f"custom-{family}", family)
    source = BUNDLED / family
    if not (source / "model_index.json").is_file():
        raise ModelError(f"{family}: no bundled model config for this family (have: {', '.join(bundled_families())})"
                         " — pass model_config=<a diffusers config folder>")
    return _assemble(source, family, family)
