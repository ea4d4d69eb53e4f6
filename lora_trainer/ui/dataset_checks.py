"""Warnings about a dataset before training: too few images, tiny images, duplicate files, missing captions."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from ..caption_editing import CaptionEntry
from ..errors import DatasetError
from ..hashing import sha256_file
from ..images import image_size

MIN_IMAGES = 5
MIN_SIDE = 256  # pixels; smaller images are upscaled into their bucket and train blurry
_LISTED = 5


def _names(paths: Sequence[str]) -> str:
    more = f" and {len(paths) - _LISTED} more" if len(paths) > _LISTED else ""
    return ", ".join(paths[:_LISTED]) + more


def dataset_warnings(entries: Sequence[CaptionEntry]) -> List[str]:
    """One line per problem, most important first; an empty list when the dataset looks fine."""
    warnings = []
    if len(entries) < MIN_IMAGES:
        warnings.append(f"only {len(entries)} image(s): {MIN_IMAGES} or more train a far more useful LoRA")
    tiny, unreadable, by_hash = [], [], {}
    for entry in entries:
        facts = _facts(Path(entry.path))
        if facts is None:
            unreadable.append(entry.name)
            continue
        (width, height), digest = facts
        if min(width, height) < MIN_SIDE:
            tiny.append(f"{entry.name} ({width}x{height})")
        by_hash.setdefault(digest, []).append(entry.name)
    if tiny:
        warnings.append(f"{len(tiny)} image(s) smaller than {MIN_SIDE} px on a side: {_names(tiny)}")
    duplicates = [" = ".join(group) for group in by_hash.values() if len(group) > 1]
    if duplicates:
        warnings.append(f"{len(duplicates)} group(s) of identical files: {_names(duplicates)}")
    missing = [e.name for e in entries if not e.caption]
    if missing:
        warnings.append(f"{len(missing)} image(s) without a caption: {_names(missing)} (auto-caption them, or "
                        "they train on the trigger word alone)")
    if unreadable:
        warnings.append(f"{len(unreadable)} unreadable image(s), skipped in training: {_names(unreadable)}")
    return warnings


def _facts(path: Path) -> Optional[Tuple[Tuple[int, int], str]]:
    """(size, sha256) of an image, or None if unreadable; cached while the file is unchanged."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return _facts_cached(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4096)
def _facts_cached(path: str, mtime_ns: int, size: int) -> Optional[Tuple[Tuple[int, int], str]]:
    try:
        return image_size(Path(path)), sha256_file(Path(path))
    except (DatasetError, OSError):
        return None
