"""``python -m lora_trainer ui``: the Train LoRA tab as a standalone app (binds 127.0.0.1 unless --listen)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Tuple

from ..host import StandaloneHost
from .context import TabContext

logger = logging.getLogger("lora_trainer")

ROOT = Path(__file__).resolve().parents[2]  # the extension's folder: javascript/ and style.css live there
JS_FILE = ROOT / "javascript" / "lora_trainer.js"
CSS_FILE = ROOT / "style.css"


def standalone_context(output_dir: Path, lora_dir: Optional[Path] = None, base_model: str = "") -> TabContext:
    return TabContext(host_factory=lambda: StandaloneHost(lora_dir), output_dir=Path(output_dir).resolve(),
                      webui=False, defaults={"base_model": base_model} if base_model else {})


def build_app(context: TabContext):
    """The tab as its own page, with the JS and CSS the WebUI would inject for the extension."""
    from . import compat
    from .tab import TrainTab

    css = CSS_FILE.read_text(encoding="utf-8")
    blocks = TrainTab(context).render(css=css)
    # The WebUI puts javascript/*.js in <head>; here it runs once when the page has loaded.
    script = JS_FILE.read_text(encoding="utf-8")
    with blocks:
        blocks.load(None, None, None, **compat.js("() => {\n" + script + "\n}"))
    return blocks


def parse_auth(text: str) -> Tuple[str, str]:
    from ..errors import ConfigError

    user, sep, password = (text or "").partition(":")
    if not sep or not user or not password:
        raise ConfigError("--auth must be USER:PASSWORD")
    return user, password


def launch(output_dir: Path, port: Optional[int] = None, listen: bool = False, auth: str = "",
           lora_dir: Optional[Path] = None, base_model: str = "", block: bool = True):
    from . import compat

    context = standalone_context(output_dir, lora_dir, base_model)
    context.output_dir.mkdir(parents=True, exist_ok=True)
    blocks = build_app(context)
    compat.queue(blocks)
    kwargs = {"css": CSS_FILE.read_text(encoding="utf-8")} if compat.MAJOR >= 6 else {}
    host = "0.0.0.0" if listen else "127.0.0.1"
    logger.info("Train LoRA on http://%s:%s (run folders in %s)", host, port or 7860, context.output_dir)
    blocks.launch(server_name=host, server_port=port, auth=parse_auth(auth) if auth else None,
                  allowed_paths=[str(context.output_dir)], prevent_thread_lock=not block, inbrowser=False,
                  show_error=True, **kwargs)
    return blocks
