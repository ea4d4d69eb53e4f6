"""Named datasets under one root folder, filled by uploads from the browser or the HTTP API.

Uploads are checked before anything reaches a dataset: only images (that really decode) and caption
files are kept, each file and the total are capped, archive entries that would leave the folder
(absolute paths, ``..``) refuse the whole archive, names are sanitised. Files are staged in a hidden
folder and moved in only when the whole upload passed, so a failed or cancelled upload leaves no
half dataset behind.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import unicodedata
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, List, Optional, Tuple

from .dataset import IMAGE_EXTENSIONS
from .errors import DatasetError
from .files import write_atomic

CAPTION_EXTENSIONS = (".txt", ".caption")
METADATA_FILES = ("metadata.csv", "metadata.jsonl")
STAGING_PREFIX = ".staging-"


@dataclass(frozen=True)
class UploadLimits:
    max_file_bytes: int = 50 * 1024 * 1024
    max_total_bytes: int = 4 * 1024 * 1024 * 1024
    max_files: int = 10_000

    @classmethod
    def from_mb(cls, file_mb: float, total_mb: float, fallback: Optional[UploadLimits] = None) -> UploadLimits:
        """Limits in MiB, as settings and flags give them (fractions allowed). ConfigError unless both are > 0,
        or, with ``fallback`` (a WebUI setting must not cost the tab), a logged warning and ``fallback``."""
        from .errors import ConfigError

        try:
            file_mb, total_mb = float(file_mb), float(total_mb)
            if not (file_mb > 0 and total_mb > 0):
                raise ValueError
        except (TypeError, ValueError):
            message = f"upload limits must be numbers of MB above 0, got {file_mb!r} and {total_mb!r}"
            if fallback is None:
                raise ConfigError(message) from None
            logging.getLogger("lora_trainer").warning("%s; using %s and %s", message,
                                                      _size(fallback.max_file_bytes), _size(fallback.max_total_bytes))
            return fallback
        return cls(max_file_bytes=int(file_mb * 2**20), max_total_bytes=int(total_mb * 2**20))


@dataclass
class UploadReport:
    added: List[str] = field(default_factory=list)
    refused: List[Tuple[str, str]] = field(default_factory=list)  # (name as sent, why)

    def message(self) -> str:
        parts = [f"added {len(self.added)} file(s)"]
        if self.refused:
            shown = "; ".join(f"{name}: {why}" for name, why in self.refused[:5])
            more = f" and {len(self.refused) - 5} more" if len(self.refused) > 5 else ""
            parts.append(f"refused {len(self.refused)}: {shown}{more}")
        return ", ".join(parts)


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    path: Path
    images: int
    captioned: int

    @property
    def coverage(self) -> float:
        return self.captioned / self.images if self.images else 0.0


def safe_file_name(name: str) -> str:
    """A sent file name made safe for every OS, or DatasetError when it tries to name a path."""
    raw = name.replace("\\", "/")
    if "/" in raw or raw in (".", "..") or ".." in PurePosixPath(raw).parts or raw.startswith("~"):
        raise DatasetError(f"{name!r}: file names must not contain '/', '\\' or '..'")
    clean = unicodedata.normalize("NFC", raw).strip()
    clean = re.sub(r"[\x00-\x1f<>:\"|?*]", "_", clean).lstrip(".")
    if not clean or len(clean) > 200:
        raise DatasetError(f"{name!r}: not a usable file name")
    return clean


def safe_dataset_name(name: str) -> str:
    clean = safe_file_name(name.strip())
    if not re.fullmatch(r"[\w][\w .+()-]*", clean):
        raise DatasetError(f"dataset name {name!r}: use letters, digits, spaces, '-', '_' or '.'")
    return clean


def _is_real_image(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.verify()
        return True
    except Exception:  # Pillow raises many kinds for non-images
        return False


class DatasetStore:
    def __init__(self, root: Path, limits: UploadLimits = UploadLimits()):
        self.root, self.limits = Path(root), limits

    # -- listing and housekeeping --------------------------------------------------------------------
    def list(self) -> List[DatasetInfo]:
        if not self.root.is_dir():
            return []
        return [self.info(p.name) for p in sorted(self.root.iterdir())
                if p.is_dir() and not p.name.startswith(".")]

    def info(self, name: str) -> DatasetInfo:
        folder = self.path(name)
        images = [p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")]
        captioned = 0
        listed = _names_in_metadata(folder)
        for image in images:
            rel = image.relative_to(folder).as_posix()
            if rel in listed or any(image.with_suffix(ext).is_file() for ext in CAPTION_EXTENSIONS):
                captioned += 1
        return DatasetInfo(name, folder, len(images), captioned)

    def path(self, name: str) -> Path:
        folder = self.root / safe_dataset_name(name)
        if not folder.is_dir():
            raise DatasetError(f"no dataset named {name!r} in {self.root}")
        return folder

    def create(self, name: str) -> Path:
        folder = self.root / safe_dataset_name(name)
        if folder.exists():
            raise DatasetError(f"a dataset named {name!r} already exists; pick it from the list or choose another name")
        folder.mkdir(parents=True)
        return folder

    def rename(self, old: str, new: str) -> Path:
        source, target = self.path(old), self.root / safe_dataset_name(new)
        if target.exists():
            raise DatasetError(f"a dataset named {new!r} already exists")
        os.replace(source, target)
        return target

    def delete(self, name: str, confirm: str) -> None:
        folder = self.path(name)
        if confirm != name:
            raise DatasetError(f"type the dataset's name ({name}) to confirm deleting it")
        shutil.rmtree(folder)

    # -- uploads -------------------------------------------------------------------------------------
    def add_files(self, name: str, files: Iterable[Tuple[str, Path]],
                  cancelled: Optional[Callable[[], bool]] = None) -> UploadReport:
        """Add uploaded files ``(name as sent, temporary path)``; .zip files are unpacked. All or nothing."""
        folder = self.path(name)
        staging = self.root / f"{STAGING_PREFIX}{uuid.uuid4().hex[:8]}"
        staging.mkdir(parents=True)
        report, total = UploadReport(), [0]

        def check_cancelled() -> None:
            if cancelled is not None and cancelled():
                raise DatasetError("the upload was cancelled; nothing was added")

        try:
            for sent_name, source in files:
                check_cancelled()
                self._stage_one(sent_name, Path(source), staging, report, total, check_cancelled)
            check_cancelled()  # the last moment: from here on the files move in
            clashes = [p.name for p in staging.iterdir() if (folder / p.name).exists()]
            for item in sorted(staging.iterdir()):
                target = folder / item.name
                if item.name in clashes and item.name not in METADATA_FILES:
                    target = _free_name(folder, item.name)
                os.replace(item, target)
                report.added.append(target.name)
            return report
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _stage_one(self, sent_name: str, source: Path, staging: Path, report: UploadReport, total: list,
                   check_cancelled: Callable[[], None]) -> None:
        try:
            clean = safe_file_name(sent_name)
        except DatasetError as exc:
            report.refused.append((sent_name, str(exc).split(": ", 1)[-1]))
            return
        if clean.lower().endswith(".zip"):
            self._stage_zip(clean, source, staging, report, total, check_cancelled)
            return
        size = source.stat().st_size
        self._stage_checked(clean, size, lambda target: shutil.copyfile(source, target), staging, report, total)

    def _stage_zip(self, name: str, source: Path, staging: Path, report: UploadReport, total: list,
                   check_cancelled: Callable[[], None]) -> None:
        try:
            archive = zipfile.ZipFile(source)
        except zipfile.BadZipFile:
            report.refused.append((name, "not a readable .zip archive"))
            return
        with archive:
            entries = [e for e in archive.infolist() if not e.is_dir()]
            for entry in entries:
                parts = PurePosixPath(entry.filename.replace("\\", "/"))
                if parts.is_absolute() or ".." in parts.parts or re.match(r"^[A-Za-z]:", entry.filename):
                    report.refused.append((name, f"entry {entry.filename!r} would be written outside the dataset "
                                                 "folder; nothing from this archive was added"))
                    return
            for entry in entries:
                check_cancelled()
                inner = PurePosixPath(entry.filename.replace("\\", "/"))
                if inner.name.startswith(".") or "__MACOSX" in inner.parts:
                    continue
                try:
                    clean = safe_file_name(inner.name)
                except DatasetError as exc:
                    report.refused.append((entry.filename, str(exc).split(": ", 1)[-1]))
                    continue

                def extract(target: Path, entry=entry) -> None:
                    with archive.open(entry) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst)

                self._stage_checked(clean, entry.file_size, extract, staging, report, total)

    def _stage_checked(self, clean: str, size: int, write: Callable[[Path], None], staging: Path,
                       report: UploadReport, total: list) -> None:
        suffix = Path(clean).suffix.lower()
        if not (suffix in IMAGE_EXTENSIONS or suffix in CAPTION_EXTENSIONS or clean in METADATA_FILES):
            report.refused.append((clean, "only images, .txt captions and metadata.csv/.jsonl are kept"))
            return
        if size > self.limits.max_file_bytes:
            report.refused.append((clean, f"{_size(size)}, larger than the {_size(self.limits.max_file_bytes)} "
                                          "limit per file"))
            return
        if total[0] + size > self.limits.max_total_bytes or len(list(staging.iterdir())) >= self.limits.max_files:
            raise DatasetError(f"the upload is larger than the limit ({_size(self.limits.max_total_bytes)}, "
                               f"{self.limits.max_files} files); nothing was added")
        target = staging / clean
        if target.exists():
            target = _free_name(staging, clean)
        write(target)
        if suffix in IMAGE_EXTENSIONS and not _is_real_image(target):
            target.unlink()
            report.refused.append((clean, "not an image (the contents do not decode)"))
            return
        total[0] += size


def _size(n: int) -> str:
    """Bytes as people read them: 900 bytes, 20 KiB, 50 MiB, 4 GiB (whole numbers unless that hides the size)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            value = n / scale
            return f"{value:.0f} {unit}" if value >= 10 or value == int(value) else f"{value:.1f} {unit}"
    return f"{n} bytes"


def _free_name(folder: Path, name: str) -> Path:
    stem, suffix = os.path.splitext(name)
    for n in range(2, 100_000):
        candidate = folder / f"{stem}-{n}{suffix}"
        if not candidate.exists():
            return candidate
    raise DatasetError(f"{folder}: too many files named {name}")


def _names_in_metadata(folder: Path) -> set:
    import csv
    import json

    names = set()
    csv_file, jsonl_file = folder / "metadata.csv", folder / "metadata.jsonl"
    try:
        if csv_file.is_file():
            with open(csv_file, newline="", encoding="utf-8-sig") as fh:
                for row in csv.DictReader(fh):
                    names.add((row.get("filename") or row.get("file_name") or "").strip())
        elif jsonl_file.is_file():
            for line in jsonl_file.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    names.add(str(json.loads(line).get("file_name", "")))
    except (ValueError, OSError, UnicodeDecodeError):
        pass  # a broken captions file counts as no captions; training reports it precisely
    return names


def zip_run_folder(run_dir: Path, target: Path) -> Path:
    """A .zip of a run folder (samples, config, metrics, the LoRA; without resumable checkpoints)."""
    run_dir = Path(run_dir)

    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(run_dir.rglob("*")):
                if path.is_file() and "checkpoints" not in path.relative_to(run_dir).parts:
                    archive.write(path, f"{run_dir.name}/{path.relative_to(run_dir).as_posix()}")

    return write_atomic(Path(target), write)
