"""``python -m lora_trainer ui``: the Train LoRA tab as a standalone app (binds 127.0.0.1 unless --listen), with
the HTTP API (``/lora-trainer/v1``) on the same server and the same host, so a run started by either shows in both.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence, Tuple

from ..dataset_store import UploadLimits
from ..host import StandaloneHost
from .context import TabContext

logger = logging.getLogger("lora_trainer")

ROOT = Path(__file__).resolve().parents[2]  # the extension's folder: javascript/ and style.css live there
JS_FILE = ROOT / "javascript" / "lora_trainer.js"
CSS_FILE = ROOT / "style.css"


def default_datasets_dir(output_dir: Path) -> Path:
    """``datasets/`` beside the run folders' folder (``./output`` -> ``./datasets``)."""
    return Path(output_dir).resolve().parent / "datasets"


def standalone_context(output_dir: Path, lora_dir: Optional[Path] = None, base_model: str = "",
                       datasets_dir: Optional[Path] = None, upload_limits: UploadLimits = UploadLimits()) -> TabContext:
    host = StandaloneHost(lora_dir)  # one host for the tab and the API: one model lock
    return TabContext(host_factory=lambda: host, output_dir=Path(output_dir).resolve(),
                      webui=False, defaults={"base_model": base_model} if base_model else {},
                      datasets_dir=Path(datasets_dir or default_datasets_dir(output_dir)).resolve(),
                      upload_limits=upload_limits)


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
           lora_dir: Optional[Path] = None, base_model: str = "", block: bool = True,
           datasets_dir: Optional[Path] = None, allowed: Sequence[Path] = (),
           upload_limits: UploadLimits = UploadLimits()):
    """Serve the tab; the API routes join gradio's FastAPI app once it exists (as the WebUI's on_app_started
    does), which works the same in gradio 3.41, 4.40 and current gradio."""
    from ..api import mount_api
    from . import compat

    context = standalone_context(output_dir, lora_dir, base_model, datasets_dir, upload_limits)
    context.output_dir.mkdir(parents=True, exist_ok=True)
    context.datasets_dir.mkdir(parents=True, exist_ok=True)
    blocks = build_app(context)
    compat.queue(blocks)
    kwargs = {"css": CSS_FILE.read_text(encoding="utf-8")} if compat.MAJOR >= 6 else {}
    host = "0.0.0.0" if listen else "127.0.0.1"
    login = parse_auth(auth) if auth else None
    app, _, _ = blocks.launch(server_name=host, server_port=port, auth=login,
                              allowed_paths=[str(context.output_dir), str(context.datasets_dir)],
                              prevent_thread_lock=True, inbrowser=False, show_error=True, **kwargs)
    mount_api(app, context.host_factory(), context.output_dir, context.datasets_dir, allowed,
              defaults=dict(context.defaults), credentials=dict([login]) if login else None,
              upload_limits=upload_limits)
    logger.info("Train LoRA on http://%s:%s (run folders in %s, datasets in %s)", host, blocks.server_port,
                context.output_dir, context.datasets_dir)
    if block:
        blocks.block_thread()
    return blocks
