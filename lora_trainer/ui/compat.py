"""The few places where gradio 3.41 (A1111), 4.40 (Forge) and current gradio differ, in one place."""

from __future__ import annotations

import gradio as gr

MAJOR = int(gr.__version__.split(".")[0])


def js(code: str) -> dict:
    """Event kwarg for a JavaScript function: ``_js=`` in gradio 3, ``js=`` from 4 on."""
    return {"_js": code} if MAJOR < 4 else {"js": code}


def update(**changes):
    """``gr.update`` (gradio 3's ``Component.update`` is gone in 4; ``gr.update`` works everywhere)."""
    return gr.update(**changes)


def file_path(value) -> str:
    """A file input's value: a tempfile object with ``.name`` (gradio 3) or a path string (4+)."""
    return "" if value is None else getattr(value, "name", value)


def hidden_progress() -> dict:
    """No spinner over the outputs of the periodic refresh."""
    return {"show_progress": False if MAJOR < 4 else "hidden"}


def queue(blocks, size: int = 16):
    return blocks.queue(concurrency_count=size) if MAJOR < 4 else blocks.queue(default_concurrency_limit=size)


def make(component, *args, **kwargs):
    """Build a component, dropping keyword arguments this gradio version does not know (e.g. Gallery's
    ``columns`` before 3.3x, ``show_copy_button`` vs ``buttons``), instead of failing or warning."""
    import inspect

    known = inspect.signature(component.__init__).parameters
    return component(*args, **{k: v for k, v in kwargs.items() if k in known})
