"""Reading ``.pt`` files of tensors (training state, a local CLIP weights file), also inside AUTOMATIC1111."""

from __future__ import annotations

from pathlib import Path
from typing import Union

import torch


def load_tensors(path: Union[str, Path]):
    """``torch.load(path, map_location="cpu", weights_only=True)``, past A1111's replacement of ``torch.load``.

    A1111 replaces ``torch.load`` with ``modules.safe.load``, whose allow-list of zip members predates the
    ``archive/.format_version`` that current torch writes: it rejects every file torch >= 2.x saves and returns
    None instead of raising. ``weights_only=True`` is torch's own restricted unpickler (tensors, dicts, lists,
    numbers only), as safe as A1111's check; ``torch.serialization.load`` is the function A1111 leaves alone.
    """
    return torch.serialization.load(str(path), map_location="cpu", weights_only=True)
