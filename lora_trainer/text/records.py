"""Training text as records: plain text, prompt/completion pairs, or chat conversations.

Plain Python (no transformers), so a bad dataset fails in a second, before any model loads.
Accepted files, alone or in a folder (searched recursively, hidden files skipped, sorted by path):

  .jsonl  one JSON object per line: {"text": ...}, {"prompt": ..., "completion": ...}
          or {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}
  .json   a list of such objects
  .csv    a header row with a ``text`` column, or ``prompt`` and ``completion`` columns
  .txt    a single .txt file holds documents separated by blank lines; in a folder, each .txt
          file is one document

Empty records (blank text, empty completion, a chat without an assistant answer) are counted
and skipped; a malformed line raises ``DatasetError`` naming the file and line.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

from ..errors import DatasetError

SUFFIXES = (".jsonl", ".json", ".csv", ".txt")
_BLANK_LINES = re.compile(r"\n[ \t]*\n")


@dataclass(frozen=True)
class TextRecord:
    """One training example; exactly one of ``text``, ``completion`` or ``messages`` carries content."""
    source: str  # "file:line", for messages
    text: Optional[str] = None
    prompt: Optional[str] = None
    completion: Optional[str] = None
    messages: Tuple[Tuple[str, str], ...] = ()  # (role, content)

    @property
    def kind(self) -> str:
        """'text' (trained on every token), 'prompt' (only the completion) or 'chat' (only assistant turns)."""
        if self.messages:
            return "chat"
        return "prompt" if self.completion is not None else "text"

    def is_empty(self) -> bool:
        if self.kind == "chat":
            return not any(role == "assistant" and content.strip() for role, content in self.messages)
        if self.kind == "prompt":
            return not self.completion.strip()
        return not (self.text or "").strip()


@dataclass
class RecordSet:
    records: List[TextRecord]
    files: List[Path]
    empty: int = 0  # skipped
    kinds: dict = field(default_factory=dict)  # kind -> count


def read_records(train_data_dir: str, metadata_path: str = "") -> RecordSet:
    """All non-empty records of ``metadata_path`` (if set) or ``train_data_dir`` (a file or a folder)."""
    files, single = _data_files(metadata_path or train_data_dir, "metadata_path" if metadata_path else "train_data_dir")
    records, empty = [], 0
    for path in files:
        for record in _read_file(path, single):
            if record.is_empty():
                empty += 1
            else:
                records.append(record)
    where = files[0] if single else Path(metadata_path or train_data_dir)
    if not records:
        detail = f" ({empty} empty record(s) skipped)" if empty else ""
        raise DatasetError(f"{where}: no training text found{detail}; add records with 'text', "
                           "'prompt'/'completion' or 'messages'")
    kinds: dict = {}
    for record in records:
        kinds[record.kind] = kinds.get(record.kind, 0) + 1
    return RecordSet(records, files, empty, kinds)


def _data_files(location: str, key: str) -> Tuple[List[Path], bool]:
    """(files to read, True when the user named one file)."""
    if not str(location).strip():
        raise DatasetError(f"{key} is not set: give a .jsonl/.json/.csv/.txt file or a folder of them")
    path = Path(location).expanduser()
    if not path.exists():
        raise DatasetError(f"{key} {path} does not exist; give a .jsonl/.json/.csv/.txt file or a folder of them")
    if path.is_file():
        if path.suffix.lower() not in SUFFIXES:
            raise DatasetError(f"{path}: unsupported file type '{path.suffix}'; use {', '.join(SUFFIXES)}")
        return [path], True
    try:
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
    except OSError as exc:
        raise DatasetError(f"cannot list {path}: {exc.strerror or exc}") from None
    if not files:
        raise DatasetError(f"no {', '.join(SUFFIXES)} files in {path}; text-generation trains on text, not images")
    return files, False


def _read_file(path: Path, single: bool) -> Iterator[TextRecord]:
    try:
        content = path.read_text(encoding="utf-8-sig")  # -sig drops the BOM that Excel and Notepad write
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({exc.strerror or exc})") from None
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path, content)
    if suffix == ".json":
        return _read_json(path, content)
    if suffix == ".csv":
        return _read_csv(path, content)
    return _read_txt(path, content, split=single)


def _read_jsonl(path: Path, content: str) -> Iterator[TextRecord]:
    for number, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno}); "
                               "fix or remove this line") from None
        yield record_from_mapping(item, where)


def _read_json(path: Path, content: str) -> Iterator[TextRecord]:
    try:
        items = json.loads(content)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}); fix the file, "
                           "or write one object per line as .jsonl") from None
    if not isinstance(items, list):
        raise DatasetError(f"{path}: expected a JSON list of records, got a {type(items).__name__}")
    for number, item in enumerate(items, 1):
        yield record_from_mapping(item, f"{path} item {number}")


def _read_csv(path: Path, content: str) -> Iterator[TextRecord]:
    reader = csv.reader(io.StringIO(content))
    header = [h.strip().lower() for h in next(reader, [])]
    if "text" in header:
        columns = ("text",)
    elif "prompt" in header and "completion" in header:
        columns = ("prompt", "completion")
    else:
        raise DatasetError(f"{path}:1: the header needs a 'text' column or 'prompt' and 'completion' columns, "
                           f"got {', '.join(header) or 'nothing'}")
    index = {name: header.index(name) for name in columns}
    try:
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            where = f"{path}:{reader.line_num}"
            if len(row) < len(header):
                raise DatasetError(f"{where}: {len(row)} column(s), the header has {len(header)}; "
                                   "quote values that contain commas")
            values = {name: row[i] for name, i in index.items()}
            yield record_from_mapping(values, where)
    except csv.Error as exc:
        raise DatasetError(f"{path}:{reader.line_num}: not valid CSV ({exc})") from None


def _read_txt(path: Path, content: str, split: bool) -> Iterator[TextRecord]:
    if not split:
        yield TextRecord(source=str(path), text=content.strip())
        return
    content = content.replace("\r\n", "\n")
    line = 1
    for chunk in _BLANK_LINES.split(content):
        yield TextRecord(source=f"{path}:{line}", text=chunk.strip())
        line += chunk.count("\n") + 2


def record_from_mapping(item: object, where: str) -> TextRecord:
    """A record from one JSON object or CSV row; raise DatasetError naming ``where`` if malformed."""
    if not isinstance(item, dict):
        raise DatasetError(f"{where}: expected an object with 'text', 'prompt'/'completion' or 'messages', "
                           f"got {type(item).__name__}")
    if "messages" in item:
        return TextRecord(source=where, messages=_messages(item["messages"], where))
    if "prompt" in item or "completion" in item:
        return TextRecord(source=where, prompt=_string(item, "prompt", where),
                          completion=_string(item, "completion", where))
    if "text" in item:
        return TextRecord(source=where, text=_string(item, "text", where))
    keys = ", ".join(map(str, item)) or "none"
    raise DatasetError(f"{where}: no 'text', 'prompt'/'completion' or 'messages' key (found: {keys})")


def _string(item: dict, key: str, where: str) -> str:
    if key not in item:
        other = "completion" if key == "prompt" else "prompt"
        raise DatasetError(f"{where}: has '{other}' but no '{key}'; give both")
    value = item[key]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DatasetError(f"{where}: '{key}' must be text, got {type(value).__name__}")
    return value


def _messages(value: object, where: str) -> Tuple[Tuple[str, str], ...]:
    if not isinstance(value, list):
        raise DatasetError(f"{where}: 'messages' must be a list of {{'role', 'content'}} objects")
    out = []
    for i, message in enumerate(value, 1):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise DatasetError(f"{where}: message {i} needs a text 'role' and a text 'content'")
        out.append((message["role"], message["content"]))
    return tuple(out)
