"""Small pieces the tab is built from: image thumbnails, the error guard of every handler, a field's widget."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any, Callable

import gradio as gr

from ..errors import UserError
from ..images import load_image
from .compat import make, update
from .fields import FieldSpec

logger = logging.getLogger("lora_trainer")

THUMB = 256


def thumbnail(path: str, caption: str = ""):
    """(small RGB copy, caption): gradio 4+ refuses to serve files from outside its allowed folders, and copies
    a PIL image into its cache instead. Cached while the file is unchanged."""
    try:
        stat = Path(path).stat()
    except OSError:
        return None
    image = _thumbnail(str(path), stat.st_mtime_ns, stat.st_size)
    return (image, caption) if image is not None else None


@functools.lru_cache(maxsize=1024)
def _thumbnail(path: str, mtime_ns: int, size: int):
    try:
        image = load_image(Path(path))
    except UserError:
        return None
    image.thumbnail((THUMB, THUMB))
    return image


def guarded(n_outputs: int):
    """Run a handler whose first output is the status line; a UserError (or a bug) becomes one line there."""
    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def handler(*args: Any):
            try:
                return fn(*args)
            except UserError as exc:
                message = f"Error: {exc}"
            except Exception as exc:  # a bug: the traceback goes to the log, the user sees one line
                logger.exception("Train LoRA tab: %s failed", fn.__name__)
                message = f"Error: {type(exc).__name__}: {exc}"
            return (message,) + tuple(update() for _ in range(n_outputs - 1)) if n_outputs > 1 else message
        return handler
    return wrap


def field_component(spec: FieldSpec):
    common = dict(label=spec.label, elem_id=f"lora_trainer_cfg_{spec.name}", info=spec.help)
    if spec.kind == "dropdown":
        return make(gr.Dropdown, choices=list(spec.choices), value=spec.default, **common)
    if spec.kind == "checkbox":
        return make(gr.Checkbox, value=bool(spec.default), **common)
    if spec.kind == "number":
        return make(gr.Number, value=spec.default, precision=0 if spec.integer else None, **common)
    return make(gr.Textbox, value=spec.default, lines=3 if spec.kind == "lines" else 1, **common)
