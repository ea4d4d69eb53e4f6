"""Phrase banks for CLIP captioning: plain text files, one phrase a line, shipped in ``caption_banks/``.

A bank file may set, in a comment line, how many of its phrases one caption takes (``# top: 2``) and where
they go in the caption (``# order: 20``, lower first). The user's own candidate phrases (``--candidates``)
are a bank too, read the same way, and come first by default. A bank's ``digest`` hashes its phrases, so
cached text embeddings follow any edit of the file.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

BANKS_DIR = Path(__file__).parent / "caption_banks"
CANDIDATES = "candidates"
_OPTION = re.compile(r"^#\s*(top|order)\s*:\s*(\S+)\s*$", re.IGNORECASE)
_DEFAULTS = {"top": 1, "order": 100}
_CANDIDATE_DEFAULTS = {"top": 3, "order": 0}


class BankError(UserError):
    """A phrase bank or candidates file cannot be used."""


@dataclass(frozen=True)
class PhraseBank:
    name: str
    phrases: tuple[str, ...]  # unique (case-insensitively), in file order
    top: int  # at most this many phrases of the bank in one caption
    order: int  # banks with a lower order come first in the caption

    @property
    def digest(self) -> str:
        """Hash of the phrases, in order: the key of their cached text embeddings."""
        return hashlib.sha256("\n".join(self.phrases).encode("utf-8")).hexdigest()[:16]


def available_banks(bank_dir: str | Path | None = None) -> dict[str, Path]:
    """{bank name: file}: the bundled banks, replaced or extended by the ``*.txt`` files of ``bank_dir``."""
    files = {p.stem: p for p in sorted(BANKS_DIR.glob("*.txt"))}
    if bank_dir:
        folder = Path(bank_dir).expanduser()
        if not folder.is_dir():
            raise BankError(f"phrase bank folder {folder} does not exist; give a folder of .txt files")
        files.update({p.stem: p for p in sorted(folder.glob("*.txt"))})
    return files


def load_banks(names: list[str] | None = None, bank_dir: str | Path | None = None) -> list[PhraseBank]:
    """The banks called ``names`` (all when None, none when empty), sorted by their order."""
    files = available_banks(bank_dir)
    wanted = list(files) if names is None else list(dict.fromkeys(n.strip() for n in names if n.strip()))
    unknown = [n for n in wanted if n not in files]
    if unknown:
        raise BankError(f"unknown phrase bank {unknown[0]!r}; available: {', '.join(files)} (or 'none')")
    return sort_banks([read_bank(files[n]) for n in wanted])


def read_bank(path: str | Path, name: str = "", defaults: dict[str, int] | None = None) -> PhraseBank:
    """Read one bank file: phrases, ``# top:`` and ``# order:``; raise BankError if it is unusable."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise BankError(f"phrase file {path} does not exist") from None
    except UnicodeDecodeError:
        raise BankError(f"{path}: not UTF-8 text; save it as UTF-8") from None
    except OSError as exc:
        raise BankError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    options = dict(defaults or _DEFAULTS)
    phrases: dict[str, str] = {}  # casefolded -> as written
    for line_no, raw in enumerate(text.splitlines(), start=1):
        line = " ".join(raw.split())
        if line.startswith("#"):
            match = _OPTION.match(line)
            if match:
                options[match.group(1).lower()] = _option_value(path, line_no, match.group(1), match.group(2))
            continue
        if line:
            phrases.setdefault(line.casefold(), line)
    if not phrases:
        raise BankError(f"{path} has no phrases; write one phrase per line")
    if options["top"] < 1:
        raise BankError(f"{path}: '# top:' must be at least 1")
    return PhraseBank(name or path.stem, tuple(phrases.values()), options["top"], options["order"])


def read_candidates(path: str | Path) -> PhraseBank:
    """The user's candidate phrases: a bank named 'candidates' that takes up to 3 phrases and comes first."""
    return read_bank(path, CANDIDATES, _CANDIDATE_DEFAULTS)


def sort_banks(banks: list[PhraseBank]) -> list[PhraseBank]:
    names = [b.name for b in banks]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise BankError(f"phrase bank {duplicate!r} is given twice; rename one of the files")
    return sorted(banks, key=lambda b: (b.order, b.name))


def _option_value(path: Path, line_no: int, key: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise BankError(f"{path} line {line_no}: '# {key}:' needs a whole number, got {value!r}") from None
