"""Text embeddings of phrase banks, cached on disk per model so a bank is encoded once, not once per run.

Files live in ``$LORA_TRAINER_CACHE`` (default ``~/.cache/lora_trainer``) under ``clip_text/``, one folder
per model and weights (the model id) and numeric variant, one ``.npy`` per bank named by the bank's
content hash: editing a bank file makes a new entry, and a stale or broken file is simply re-encoded.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UserError
from .files import write_atomic

if TYPE_CHECKING:
    import numpy as np

    from .phrase_banks import PhraseBank

logger = logging.getLogger("lora_trainer")


def cache_root() -> Path:
    """``$LORA_TRAINER_CACHE``, else ``~/.cache/lora_trainer``."""
    return Path(os.environ.get("LORA_TRAINER_CACHE") or "~/.cache/lora_trainer").expanduser()


class TextEmbeddingCache:
    """Bank embeddings of one model: ``load`` returns None on a miss; ``save`` never fails the caller."""

    def __init__(self, model_id: str, variant: str, root: str | Path | None = None) -> None:
        self.enabled = bool(model_id)  # random weights differ on every load: nothing to cache
        key = hashlib.sha256(f"{model_id}\0{variant}".encode()).hexdigest()[:12]
        readable = re.sub(r"[^A-Za-z0-9._-]+", "_", model_id.split("|")[0])[:60]
        self.folder = (Path(root).expanduser() if root else cache_root()) / "clip_text" / f"{readable}-{key}"

    def path(self, bank: PhraseBank) -> Path:
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", bank.name)[:60]
        return self.folder / f"{name}-{bank.digest}.npy"

    def load(self, bank: PhraseBank) -> np.ndarray | None:
        import numpy as np

        path = self.path(bank)
        if not self.enabled or not path.is_file():
            return None
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            logger.debug("ignoring broken embedding cache %s (%s)", path, exc)
            return None
        if array.ndim != 2 or array.shape[0] != len(bank.phrases):
            return None
        return array

    def save(self, bank: PhraseBank, array: np.ndarray) -> None:
        import numpy as np

        if not self.enabled:
            return

        def writer(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                np.save(fh, array, allow_pickle=False)

        try:
            write_atomic(self.path(bank), writer)
        except UserError as exc:  # a read-only or full cache disk only costs speed
            logger.warning("cannot cache text embeddings (%s); set LORA_TRAINER_CACHE to a writable folder", exc)
