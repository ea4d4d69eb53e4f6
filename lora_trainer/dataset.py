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
from .images import image_size, load_image

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
    source: int = 0  # which of the run's folders (dataset_layout.Subset) it comes from
    role: str = "train"  # train, reg (regularization) or val (validation only)


@dataclass
class DatasetScan:
    root: Path
    records: list[ImageRecord]
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (file, reason)
    caption_source: str = ".txt"  # "metadata.csv", "metadata.jsonl" or the sidecar extension

    def of_role(self, role: str) -> list[ImageRecord]:
        return [r for r in self.records if r.role == role]

    def num_images(self) -> int:
        """Training images (not regularization or validation ones)."""
        return len(self.of_role("train"))

    def num_samples(self) -> int:
        """Training images seen per epoch, repeats included."""
        return sum(r.repeats for r in self.of_role("train"))

    def missing_captions(self) -> list[Path]:
        return [r.path for r in self.records if not r.caption]

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """{subset: {tag: count}} of the training images, kohya's ``ss_tag_frequency``."""
        return {name: tag_counts(r.caption for r in records) for name, records in self._subsets("train").items()}

    def dataset_dirs(self, role: str = "train") -> dict[str, dict[str, int]]:
        """{subset: {"n_repeats", "img_count"}}, kohya's ``ss_dataset_dirs`` (``ss_reg_dataset_dirs`` for reg)."""
        return {name: {"n_repeats": records[0].repeats, "img_count": len(records)}
                for name, records in self._subsets(role).items()}

    def _subsets(self, role: str) -> dict[str, list[ImageRecord]]:
        out: dict[str, list[ImageRecord]] = {}
        for record in self.of_role(role):
            out.setdefault(record.subset, []).append(record)
        return out


def scan_dataset(train_data_dir: str, metadata_path: str = "", caption_extension: str = ".txt",
                 repeats: int = 1, *, class_tokens: str = "", folder_repeats: bool = True, verify: bool = False,
                 what: str = "train_data_dir") -> DatasetScan:
    """Find the images of ``train_data_dir`` with captions, repeats and sizes; raise DatasetError if unusable.

    ``class_tokens`` is the caption of an image that has none (kohya's subsets); ``folder_repeats`` lets 10_name
    sub-folders set repeats; ``verify`` decodes every image now, so a damaged or partly downloaded file is skipped by
    name instead of stopping the run when its turn comes."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    root = _check_root(train_data_dir, what)
    images = find_images(root)
    if not images:
        raise DatasetError(f"no images found in {root} (looked for {', '.join(IMAGE_EXTENSIONS)} files in the "
                           "folder and its sub-folders)")
    keys = {name: normalize_name(name) for name in images}  # file-system name -> the name metadata uses
    meta_file = _metadata_file(root, metadata_path)
    captions, source, skipped = _find_captions(root, keys, meta_file, caption_extension)

    records, unreadable = [], []
    sizes = _read_sizes([root / name for name in images], verify)
    for name, size in zip(images, sizes):
        path = root / name
        if isinstance(size, DatasetError):
            reason = str(size).replace(f"{path}: ", "", 1).replace("cannot be read as an image (", "", 1).rstrip(")")
            unreadable.append(f"{name} ({reason})")
            skipped.append((path, str(size).replace(f"{path}: ", "", 1)))
            continue
        subset, count = _subset_of(name, root, repeats) if folder_repeats else (_folder_name(name, root), repeats)
        fallback = class_tokens.strip() or (_folder_class(name) if folder_repeats else "")
        caption = captions.get(keys[name], "") or fallback
        records.append(ImageRecord(path, caption, count, size[0], size[1], subset))
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


_DECODED: dict = {}  # (path, bytes, mtime_ns) -> size, of images decoded without error in this process


def _read_sizes(paths: list[Path], verify: bool) -> list:
    """Each image's (width, height), or the DatasetError that says why it cannot be used. With ``verify`` every image
    is decoded (in threads: PIL releases the GIL while decoding), which is the only way to find a truncated file."""
    def one(path: Path):
        try:
            if not verify:
                return image_size(path)
            stat = path.stat()
            key = (str(path), stat.st_size, stat.st_mtime_ns)
            if key not in _DECODED:  # the tab's estimate and its Start scan the same files: decode them once
                load_image(path)
                if len(_DECODED) > 500_000:
                    _DECODED.clear()
                _DECODED[key] = image_size(path)
            return _DECODED[key]
        except OSError as exc:
            return DatasetError(f"{path}: cannot be read as an image ({exc.strerror or exc})")
        except DatasetError as exc:
            return exc

    if not verify or len(paths) < 8:
        return [one(p) for p in paths]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(one, paths))


# -- folder layout -----------------------------------------------------------------------------

def _check_root(train_data_dir: str, what: str = "train_data_dir") -> Path:
    if not str(train_data_dir).strip():
        raise DatasetError(f"{what} is not set: give the folder of training images")
    root = Path(train_data_dir).expanduser()
    if not root.exists():
        raise DatasetError(f"dataset folder {root} does not exist; check {what}")
    if not root.is_dir():
        raise DatasetError(f"{root} is a file; {what} must be a folder of images")
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


def _folder_class(name: str) -> str:
    """kohya's DreamBooth rule: an image without a caption in a ``10_sks dog`` folder is captioned "sks dog"."""
    match = _REPEATS_DIR.match(name.split("/", 1)[0]) if "/" in name else None
    return match.group(2).strip() if match else ""


def _folder_name(name: str, root: Path) -> str:
    return name.split("/", 1)[0] if "/" in name else root.name


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
        if path.suffix.lower() not in (".csv", ".jsonl", ".json"):
            raise DatasetError(f"{path}: metadata must be a .csv (filename,prompt), .jsonl (file_name,text) or kohya "
                               ".json file")
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
    suffix = meta_file.suffix.lower()
    source = {".jsonl": "metadata.jsonl", ".json": meta_file.name}.get(suffix, "metadata.csv")
    captions = _read_kohya_json(meta_file, root, keys) if suffix == ".json" else _read_metadata(meta_file)
    absent = sorted(set(captions) - set(keys.values()))
    if absent:
        logger.warning("%s: %d listed image(s) not found in %s, skipped: %s",
                       meta_file, len(absent), root, _names(absent))
    return captions, source, [(root / name, _absent_reason(root / name, meta_file)) for name in absent]


def _read_kohya_json(path: Path, root: Path, keys: dict[str, str]) -> dict[str, str]:
    """kohya's fine-tuning metadata ({image: {"caption": ..., "tags": ...}}) as {normalized name: caption}. kohya keys
    an image by its full path or by its name without extension; both are matched to the folder's images."""
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot be read as UTF-8 text ({exc})") from None
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path} line {exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise DatasetError(f'{path}: expected kohya\'s metadata, {{"image": {{"caption": "...", "tags": "..."}}}}')
    by_stem = {normalize_name(k).rsplit(".", 1)[0]: k for k in keys.values()}
    captions: dict[str, str] = {}
    for name, entry in data.items():
        if not isinstance(entry, dict):
            raise DatasetError(f"{path}: the entry of {name!r} must be an object with caption and/or tags")
        text = ", ".join(str(entry[k]).strip() for k in ("caption", "tags") if str(entry.get(k) or "").strip())
        key = normalize_name(str(name))
        if Path(key).is_absolute():
            try:
                key = normalize_name(Path(key).relative_to(root).as_posix())
            except ValueError:
                key = Path(key).name
        captions[by_stem.get(key, key)] = text
    return captions


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
