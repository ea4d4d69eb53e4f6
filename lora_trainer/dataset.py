"""Scanning a dataset folder: which images, with which captions and repeats, at which sizes.

The layout follows what users bring from kohya and diffusers: images in the folder and one level of
sub-folders (``10_name`` repeats its images 10 times), captions from metadata.csv / metadata.jsonl or
sidecar .txt files. The scan only reads: it never writes into the dataset folder.
"""

from __future__ import annotations

import csv
import json
import logging
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from .captions import tag_counts
from .errors import DatasetError
from .images import image_size

logger = logging.getLogger("lora_trainer")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_IGNORED_DIRS = {".ipynb_checkpoints", "__MACOSX"}
_REPEATS_DIR = re.compile(r"^(\d+)_(.+)$")
FILE_COLUMNS = ("filename", "file_name", "image")
TEXT_COLUMNS = ("prompt", "text", "caption")
_MAX_NAMES = 20  # file names listed in one warning before "and N more"


@dataclass(frozen=True)
class ImageRecord:
    path: Path  # absolute
    caption: str  # as stored, without trigger word or prefix; "" when the image has none
    repeats: int
    width: int  # after EXIF orientation
    height: int
    subset: str  # sub-folder name ("10_brand"), or the root folder's name for images in the root


@dataclass
class DatasetScan:
    root: Path
    records: list[ImageRecord]
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (file, reason)
    caption_source: str = ".txt"  # "metadata.csv", "metadata.jsonl" or the sidecar extension

    def num_images(self) -> int:
        return len(self.records)

    def num_samples(self) -> int:
        """Images seen per epoch, repeats included."""
        return sum(r.repeats for r in self.records)

    def missing_captions(self) -> list[Path]:
        return [r.path for r in self.records if not r.caption]

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """{subset: {tag: count}}, kohya's ``ss_tag_frequency``."""
        return {name: tag_counts(r.caption for r in records) for name, records in self._subsets().items()}

    def dataset_dirs(self) -> dict[str, dict[str, int]]:
        """{subset: {"n_repeats", "img_count"}}, kohya's ``ss_dataset_dirs``."""
        return {name: {"n_repeats": records[0].repeats, "img_count": len(records)}
                for name, records in self._subsets().items()}

    def _subsets(self) -> dict[str, list[ImageRecord]]:
        out: dict[str, list[ImageRecord]] = {}
        for record in self.records:
            out.setdefault(record.subset, []).append(record)
        return out


def scan_dataset(train_data_dir: str, metadata_path: str = "", caption_extension: str = ".txt",
                 repeats: int = 1) -> DatasetScan:
    """Find the images of ``train_data_dir`` with captions, repeats and sizes; raise DatasetError if unusable."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    root = _check_root(train_data_dir)
    images = find_images(root)
    if not images:
        raise DatasetError(f"no images found in {root} (looked for {', '.join(IMAGE_EXTENSIONS)} files in the "
                           "folder and its sub-folders)")
    keys = {name: normalize_name(name) for name in images}  # file-system name -> the name metadata uses
    meta_file = _metadata_file(root, metadata_path)
    captions, source, skipped = _find_captions(root, keys, meta_file, caption_extension)

    records, unreadable = [], []
    for name in images:
        path = root / name
        try:
            width, height = image_size(path)
        except DatasetError as exc:
            unreadable.append(name)
            skipped.append((path, str(exc).replace(f"{path}: ", "", 1)))
            continue
        subset, count = _subset_of(name, root, repeats)
        records.append(ImageRecord(path, captions.get(keys[name], ""), count, width, height, subset))
    if unreadable:
        logger.warning("skipping %d unreadable image(s) in %s: %s", len(unreadable), root, _names(unreadable))
    if not records:
        raise DatasetError(f"no readable images in {root}: all {len(images)} image file(s) failed to open "
                           f"({_names(unreadable)})")

    scan = DatasetScan(root, records, skipped, source)
    _check_captions(scan, meta_file)
    logger.info("dataset %s: %d images, %d samples per epoch, captions from %s",
                root, scan.num_images(), scan.num_samples(), source)
    return scan


# -- folder layout -----------------------------------------------------------------------------

def _check_root(train_data_dir: str) -> Path:
    if not str(train_data_dir).strip():
        raise DatasetError("train_data_dir is not set: give the folder of training images")
    root = Path(train_data_dir).expanduser()
    if not root.exists():
        raise DatasetError(f"dataset folder {root} does not exist; check train_data_dir")
    if not root.is_dir():
        raise DatasetError(f"{root} is a file; train_data_dir must be a folder of images")
    return root.resolve()


def find_images(root: Path) -> list[str]:
    """Image paths relative to root (posix, NFC), sorted: the root's files and one level of sub-folders."""
    found = []
    try:
        entries = list(root.iterdir())
        for entry in entries:
            if _hidden(entry.name):
                continue
            if entry.is_dir():
                if entry.name in _IGNORED_DIRS:
                    continue
                found += [f"{entry.name}/{f.name}" for f in entry.iterdir() if _is_image(f)]
            elif _is_image(entry):
                found.append(entry.name)
    except OSError as exc:
        raise DatasetError(f"cannot list {root}: {exc.strerror or exc}") from None
    # Sorting by relative path keeps the record order (and so the run) the same on every machine.
    return sorted(set(found), key=normalize_name)


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _is_image(path: Path) -> bool:
    return not _hidden(path.name) and path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def _subset_of(name: str, root: Path, default_repeats: int) -> tuple[str, int]:
    if "/" not in name:
        return root.name, default_repeats
    folder = name.split("/", 1)[0]
    match = _REPEATS_DIR.match(folder)
    if match and int(match.group(1)) > 0:
        return folder, int(match.group(1))
    return folder, default_repeats


# -- captions ----------------------------------------------------------------------------------

def _metadata_file(root: Path, metadata_path: str) -> Path | None:
    if metadata_path:
        path = Path(metadata_path).expanduser()  # relative to the working folder, like any CLI path
        if not path.is_file():
            raise DatasetError(f"metadata file {path} does not exist; check metadata_path")
        if path.suffix.lower() not in (".csv", ".jsonl"):
            raise DatasetError(f"{path}: metadata must be a .csv (filename,prompt) or .jsonl (file_name,text) file")
        return path
    for name in ("metadata.csv", "metadata.jsonl"):
        if (root / name).is_file():
            return root / name
    return None


def _find_captions(root: Path, keys: dict[str, str], meta_file: Path | None,
                   caption_extension: str) -> tuple[dict[str, str], str, list[tuple[Path, str]]]:
    """({normalized name: caption}, caption source, metadata rows naming no image)."""
    if meta_file is None:
        ext = caption_extension if caption_extension.startswith(".") else "." + caption_extension
        captions = {key: text for name, key in keys.items() if (text := read_sidecar(root / name, ext)) is not None}
        return captions, ext, []
    source = "metadata.jsonl" if meta_file.suffix.lower() == ".jsonl" else "metadata.csv"
    captions = _read_metadata(meta_file)
    absent = sorted(set(captions) - set(keys.values()))
    if absent:
        logger.warning("%s: %d listed image(s) not found in %s, skipped: %s",
                       meta_file, len(absent), root, _names(absent))
    return captions, source, [(root / name, _absent_reason(root / name, meta_file)) for name in absent]


def _read_metadata(path: Path) -> dict[str, str]:
    """{relative image path: caption} from a CSV or JSONL file."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig drops the BOM that Excel writes
    except UnicodeDecodeError:
        raise DatasetError(f"{path}: not UTF-8 text; save it as UTF-8") from None
    except OSError as exc:
        raise DatasetError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    rows = _csv_rows(path, text) if path.suffix.lower() == ".csv" else _jsonl_rows(path, text)
    captions: dict[str, str] = {}
    for line, name, caption in rows:
        key = normalize_name(name)
        if not key:
            raise DatasetError(f"{path} line {line}: empty file name")
        if key in captions:
            logger.warning("%s line %d: %s is listed again; the later caption is used", path, line, key)
        captions[key] = caption.strip()
    return captions


def read_csv_records(path: Path, text: str) -> tuple[list[str], int, int, list[tuple[int, list[str]]]]:
    """A metadata.csv's header, its filename and caption column indexes, and (line number, cells) per non-empty row.

    Shared by training and the caption editor, so both read exactly the same captions; malformed quoting is an
    error naming the line, not a silently mangled caption.
    """
    reader = csv.reader(text.splitlines(keepends=True), strict=True)
    try:
        header = next(reader, None)
        if header is None:
            raise DatasetError(f"{path} is empty; expected a header line 'filename,prompt'")
        names = [h.strip().lower() for h in header]
        file_col = next((names.index(c) for c in FILE_COLUMNS if c in names), None)
        text_col = next((names.index(c) for c in TEXT_COLUMNS if c in names), None)
        if file_col is None or text_col is None:
            raise DatasetError(f"{path} line 1: the header must name the columns filename,prompt "
                               f"(found: {','.join(header)})")
        rows = [(reader.line_num, row) for row in reader if any(cell.strip() for cell in row)]
    except csv.Error as exc:
        raise DatasetError(f"{path} line {reader.line_num}: not valid CSV ({exc}); check its quotes") from None
    return header, file_col, text_col, rows


def _csv_rows(path: Path, text: str) -> list[tuple[int, str, str]]:
    _, file_col, text_col, rows = read_csv_records(path, text)
    width = max(file_col, text_col) + 1
    return [(line, (row + [""] * width)[file_col], (row + [""] * width)[text_col]) for line, row in rows]


def _jsonl_rows(path: Path, text: str) -> list[tuple[int, str, str]]:
    rows = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path} line {line_no}: not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise DatasetError(f"{path} line {line_no}: expected an object like "
                               '{"file_name": "a.png", "text": "a caption"}')
        name = next((obj[k] for k in FILE_COLUMNS if k in obj), None)
        caption = next((obj[k] for k in TEXT_COLUMNS if k in obj), "")
        if not isinstance(name, str) or not isinstance(caption, (str, type(None))):
            raise DatasetError(f"{path} line {line_no}: needs a text 'file_name' and a text 'text' field")
        rows.append((line_no, name, caption or ""))
    return rows


def normalize_name(name: str) -> str:
    # Same key for "./10_a\\x.png" and "10_a/x.png"; NFC because macOS stores names decomposed.
    name = unicodedata.normalize("NFC", name.strip().replace("\\", "/"))
    while name.startswith("./"):
        name = name[2:]
    return name


def _absent_reason(path: Path, meta_file: Path) -> str:
    if path.is_file():
        return (f"listed in {meta_file.name} but not a training image (only {', '.join(IMAGE_EXTENSIONS)} files "
                "in the folder and its sub-folders are used)")
    return f"listed in {meta_file.name} but not found"


def read_sidecar(image: Path, ext: str) -> str | None:
    """The caption next to ``image`` (``<stem><ext>``, else ``<stem>.caption``); None if there is none."""
    for candidate in dict.fromkeys((image.with_suffix(ext), image.with_suffix(".caption"))):
        if candidate.is_file():
            try:
                text = candidate.read_text(encoding="utf-8-sig")
            except UnicodeDecodeError:
                raise DatasetError(f"{candidate}: not UTF-8 text; save the caption as UTF-8") from None
            except OSError as exc:
                raise DatasetError(f"{candidate}: cannot be read ({exc.strerror or exc})") from None
            # Tag-per-line files become one comma-separated caption.
            return ", ".join(line.strip() for line in text.splitlines() if line.strip())
    return None


def _check_captions(scan: DatasetScan, meta_file: Path | None) -> None:
    missing = scan.missing_captions()
    if len(missing) == len(scan.records):
        if meta_file is not None:
            raise DatasetError(f"no captions found in {scan.root}: {meta_file} gives none of its images a caption "
                               f"(file names there are relative to {scan.root})")
        raise DatasetError(f"no captions found in {scan.root}: add metadata.csv (filename,prompt), metadata.jsonl "
                           f"or .txt files, or run `python -m lora_trainer caption {scan.root}`")
    if missing:
        names = [p.relative_to(scan.root).as_posix() for p in missing]
        logger.warning("%d of %d images have no caption and train with an empty one: %s",
                       len(missing), len(scan.records), _names(names))


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_NAMES])
    return shown + (f" and {len(names) - _MAX_NAMES} more" if len(names) > _MAX_NAMES else "")
