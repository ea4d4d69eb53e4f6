"""A dataset's captions as one editable set: list, edit, bulk tag edits, save. The API behind the caption editor.

Captions live where training reads them (``lora_trainer.dataset``): ``metadata.csv`` (``filename,prompt``)
if the folder has one, else sidecar ``.txt`` files. ``save`` writes the chosen store(s) so that
``scan_dataset`` reads back exactly these captions: metadata.csv keeps its other columns, row order, BOM and
line endings; a ``.txt`` file is written only when its caption changed. Every file it replaces is first
copied to ``.lora_trainer_backup/<timestamp>/`` inside the dataset (hidden, so never scanned as data).
Saving captions is the one time this project writes into a dataset folder, and it writes nothing else.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .captions import split_tags, tag_counts
from .dataset import find_images, normalize_name, read_csv_records, read_sidecar
from .errors import DatasetError
from .files import atomic_dir, write_text_atomic

logger = logging.getLogger("lora_trainer")

FORMATS = ("csv", "txt", "both")
METADATA = "metadata.csv"
BACKUP_DIR = ".lora_trainer_backup"
KEEP_BACKUPS = 20


@dataclass(frozen=True)
class CaptionEntry:
    name: str  # the image's path relative to the dataset, "/"-separated: how metadata.csv names it
    path: Path  # absolute
    caption: str  # "" when the image has none


@dataclass(frozen=True)
class SaveResult:
    written: list[Path]  # files created or replaced
    backup_dir: Path | None  # copies of the replaced files; None when nothing was replaced


@dataclass
class _CsvTable:
    header: list[str]
    rows: list[list[str]]
    file_col: int
    text_col: int
    index: dict[str, int]  # image key -> row (the last one, as training reads it)
    bom: bool = False
    newline: str = "\n"


def normalize_caption(text: str) -> str:
    """One line: the lines of a multi-line caption become comma-separated tags, as training reads .txt files."""
    return ", ".join(" ".join(line.split()) for line in str(text).splitlines() if line.strip())


def resolve_format(root: Path, fmt: str = "auto") -> str:
    """``auto``: metadata.csv if the folder has one, else .txt files if there are any, else metadata.csv."""
    if fmt != "auto":
        if fmt not in FORMATS:
            raise DatasetError(f"caption format {fmt!r} is unknown; use one of auto, {', '.join(FORMATS)}")
        return fmt
    if (root / METADATA).is_file():
        return "csv"
    if any(root.glob("*.txt")) or any(root.glob("*/*.txt")):
        return "txt"
    return "csv"


def load_captions(dataset_dir: str | Path, fmt: str = "auto", caption_extension: str = ".txt") -> CaptionSet:
    """Every image of ``dataset_dir`` with the caption training would use now; ``fmt`` says where ``save`` writes."""
    if fmt != "auto" and fmt not in FORMATS:
        raise DatasetError(f"caption format {fmt!r} is unknown; use one of auto, {', '.join(FORMATS)}")
    root = Path(dataset_dir).expanduser()
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist; give a folder of images")
    root = root.resolve()
    if (root / "metadata.jsonl").is_file() and not (root / METADATA).is_file():
        raise DatasetError(f"{root / 'metadata.jsonl'}: the caption tools read and write metadata.csv or .txt "
                           "files; convert it to metadata.csv (filename,prompt) or move it out of the folder")
    images = find_images(root)
    if not images:
        raise DatasetError(f"no images found in {root} (the folder and its sub-folders)")
    ext = caption_extension if caption_extension.startswith(".") else "." + caption_extension
    table = _read_csv(root / METADATA) if (root / METADATA).is_file() else None
    entries, captions, sidecars = [], {}, {}
    for name in images:
        key, path = normalize_name(name), root / name
        entries.append((key, path))
        sidecars[key] = _read_caption_file(path.with_suffix(ext))
        if table is not None:
            row = table.index.get(key)
            cells = table.rows[row] if row is not None else []
            captions[key] = normalize_caption(cells[table.text_col]) if table.text_col < len(cells) else ""
        else:
            captions[key] = read_sidecar(path, ext) or ""
    return CaptionSet(root, resolve_format(root, fmt), entries, captions, table, sidecars, ext)


class CaptionSet:
    """The captions of one dataset folder, edited in memory until ``save``."""

    def __init__(self, root: Path, fmt: str, entries: list[tuple[str, Path]], captions: dict[str, str],
                 table: _CsvTable | None, sidecars: dict[str, str | None], caption_extension: str) -> None:
        self.root = root
        self.format = fmt
        self._paths = dict(entries)
        self._captions = dict(captions)
        self._stored = dict(captions)
        self._table = table
        self._sidecars = sidecars
        self._ext = caption_extension
        self._csv_stamp = _stamp(root / METADATA)

    # -- reading ---------------------------------------------------------------------------------

    def names(self) -> list[str]:
        return list(self._paths)

    def images(self) -> list[CaptionEntry]:
        return [CaptionEntry(k, p, self._captions[k]) for k, p in self._paths.items()]

    def caption(self, name: str) -> str:
        return self._captions[self._key(name)]

    def tag_counts(self) -> dict[str, int]:
        """{tag: how often it occurs}, most used first: for a tag list next to the editor."""
        counts = tag_counts(self._captions.values())
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    def changed(self) -> list[str]:
        """Images whose caption differs from the one on disk."""
        return [k for k in self._paths if self._captions[k] != self._stored[k]]

    # -- editing ---------------------------------------------------------------------------------

    def set_caption(self, name: str, caption: str) -> None:
        self._captions[self._key(name)] = normalize_caption(caption)

    def prepend_tag(self, tags: str, names: list[str] | None = None) -> int:
        """Put ``tags`` (one, or several comma-separated) first in each caption; returns how many changed."""
        new = split_tags(tags)
        if not new:
            raise DatasetError("no tag to prepend: give a tag such as 'brand logo'")
        return self._edit(names, lambda old: new + [t for t in old if t not in new])

    def replace_tag(self, old: str, new: str, names: list[str] | None = None) -> int:
        """Replace the tag ``old`` by ``new`` (which may be several tags, or empty to remove it)."""
        target, replacement = _one_tag(old), split_tags(new)

        def edit(tags: list[str]) -> list[str]:
            if target not in tags:
                return tags
            out: list[str] = []
            for tag in tags:
                out += replacement if tag == target else [tag]
            return list(dict.fromkeys(out))

        return self._edit(names, edit)

    def remove_tag(self, tag: str, names: list[str] | None = None) -> int:
        target = _one_tag(tag)
        return self._edit(names, lambda tags: [t for t in tags if t != target])

    def _edit(self, names: list[str] | None, edit) -> int:
        keys = list(self._paths) if names is None else [self._key(n) for n in names]
        count = 0
        for key in keys:
            tags = split_tags(self._captions[key])
            new_tags = edit(tags)
            if new_tags != tags:
                self._captions[key] = ", ".join(new_tags)
                count += 1
        return count

    def _key(self, name: str) -> str:
        key = normalize_name(str(name))
        if key not in self._paths:
            raise DatasetError(f"{name} is not an image of {self.root}")
        return key

    # -- saving ----------------------------------------------------------------------------------

    def save(self) -> SaveResult:
        """Write the captions to the chosen store(s), backing up every file replaced; nothing if nothing changed."""
        if _stamp(self.root / METADATA) != self._csv_stamp:
            raise DatasetError(f"{self.root / METADATA} changed on disk since it was loaded; reload the captions "
                               "and edit again (nothing was saved)")
        planned = {}  # path -> text
        if self.format in ("csv", "both"):
            text = self._csv_text()
            if text is not None:
                planned[self.root / METADATA] = text
        if self.format in ("txt", "both"):
            planned.update(self._sidecar_texts())
        unwritable = next((p.parent for p in planned if not os.access(p.parent, os.W_OK)), None)
        if unwritable is not None:
            raise DatasetError(f"cannot save captions: {unwritable} is read-only; make it writable or caption a "
                               "copy of the dataset (nothing was saved)")
        replaced = [p for p in planned if p.exists()]
        backup = _backup(self.root, replaced, [p for p in planned if p not in replaced]) if replaced else None
        for path, text in planned.items():
            write_text_atomic(path, text)
        self._after_save(planned)
        if planned:
            logger.info("saved %d caption file(s) in %s%s", len(planned), self.root,
                        f" (previous versions in {backup})" if backup else "")
        return SaveResult(sorted(planned), backup)

    def _csv_text(self) -> str | None:
        """The new metadata.csv, or None when it would not change (or would be empty and does not exist)."""
        table = self._table or _CsvTable(["filename", "prompt"], [], 0, 1, {})
        rows = list(table.rows)
        for key in self._paths:
            caption, row = self._captions[key], table.index.get(key)
            if row is None:
                if caption:
                    cells = [""] * len(table.header)
                    cells[table.file_col], cells[table.text_col] = key, caption
                    rows.append(cells)
                continue
            cells = rows[row]
            current = normalize_caption(cells[table.text_col]) if table.text_col < len(cells) else ""
            if current != caption:
                cells = cells + [""] * (table.text_col + 1 - len(cells))
                cells[table.text_col] = caption
                rows[row] = cells
        if rows == table.rows:
            return None
        out = io.StringIO()
        writer = csv.writer(out, lineterminator=table.newline)
        writer.writerow(table.header)
        writer.writerows(rows)
        return ("\ufeff" if table.bom else "") + out.getvalue()

    def _sidecar_texts(self) -> dict[Path, str]:
        """{sidecar file: caption} for the sidecars whose caption changed."""
        owners: dict[Path, str] = {}  # sidecar -> the first image using it
        planned = {}
        for key, path in self._paths.items():
            sidecar, caption = path.with_suffix(self._ext), self._captions[key]
            if sidecar in owners:
                first = owners[sidecar]
                if self._captions[first] != caption:
                    logger.warning("%s and %s share the caption file %s, which keeps the caption of %s (use "
                                   "metadata.csv to caption them differently)", first, key, sidecar.name, first)
                continue
            owners[sidecar] = key
            current = self._sidecars[key]
            if (current is None and caption) or (current is not None and current != caption):
                planned[sidecar] = caption
        return planned

    def _after_save(self, planned: dict[Path, str]) -> None:
        if self.root / METADATA in planned:
            self._table = _read_csv(self.root / METADATA)
        for key, path in self._paths.items():
            if path.with_suffix(self._ext) in planned:
                self._sidecars[key] = planned[path.with_suffix(self._ext)]
        self._stored = dict(self._captions)
        self._csv_stamp = _stamp(self.root / METADATA)


# -- metadata.csv ------------------------------------------------------------------------------------

def _read_csv(path: Path) -> _CsvTable:
    """metadata.csv with all its columns; a malformed row raises DatasetError naming its line."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DatasetError(f"{path}: not UTF-8 text; save it as UTF-8") from None
    header, file_col, text_col, records = read_csv_records(path, text)
    rows, index = [], {}
    for line, row in records:
        name = row[file_col] if file_col < len(row) else ""
        key = normalize_name(name)
        if not key:
            raise DatasetError(f"{path} line {line}: empty file name; every row needs 'image file,caption'")
        index[key] = len(rows)
        rows.append(row)
    newline = "\r\n" if "\r\n" in text else "\n"
    return _CsvTable(header, rows, file_col, text_col, index, raw.startswith(b"\xef\xbb\xbf"), newline)


def _read_caption_file(path: Path) -> str | None:
    """A sidecar's caption as training reads it, or None when the file does not exist."""
    if not path.is_file():
        return None
    try:
        return normalize_caption(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError:
        raise DatasetError(f"{path}: not UTF-8 text; save the caption as UTF-8") from None
    except OSError as exc:
        raise DatasetError(f"{path}: cannot be read ({exc.strerror or exc})") from None


def _one_tag(tag: str) -> str:
    tags = split_tags(tag)
    if len(tags) != 1:
        raise DatasetError(f"give exactly one tag (no commas), got {tag!r}")
    return tags[0]


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


# -- backups -----------------------------------------------------------------------------------------

def _backup(root: Path, replaced: list[Path], created: list[Path]) -> Path:
    """Copy the files about to be replaced to ``.lora_trainer_backup/<timestamp>/``, with a manifest."""
    base = root / BACKUP_DIR
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, n = base / stamp, 2
    while target.exists():
        target, n = base / f"{stamp}-{n}", n + 1
    lines = [f"replaced {p.relative_to(root).as_posix()}" for p in replaced]
    lines += [f"created {p.relative_to(root).as_posix()}" for p in created]
    with atomic_dir(target) as tmp:
        for path in replaced:
            copy = tmp / path.relative_to(root)
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, copy)
        (tmp / "manifest.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    _prune_backups(base)
    return target


def _prune_backups(base: Path) -> None:
    folders = sorted((p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")),
                     key=lambda p: (p.stat().st_mtime_ns, p.name))
    for old in folders[:-KEEP_BACKUPS]:
        shutil.rmtree(old, ignore_errors=True)
        logger.debug("removed old caption backup %s", old)

