"""The ``ui`` subcommand of ``python -m lora_trainer`` (gradio is imported only when it runs)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UserError


def add_ui_parser(sub) -> None:
    ui = sub.add_parser("ui", help="Open the Train LoRA tab as a standalone app in the browser.",
                        description="The same Train LoRA tab as in the WebUI, on its own page (needs gradio).")
    ui.add_argument("--port", type=int, default=None, help="Port (default 7860, or the next free one).")
    ui.add_argument("--listen", action="store_true",
                    help="Listen on every network interface (default: 127.0.0.1 only).")
    ui.add_argument("--auth", default="", metavar="USER:PASSWORD", help="Ask for this login.")
    ui.add_argument("--output-dir", default="output", help="Folder for run folders (default ./output).")
    ui.add_argument("--lora-dir", default=None, help="Also copy finished LoRAs here (e.g. a WebUI's models/Lora).")
    ui.add_argument("--base-model", default="", help="Checkpoint path to fill in (it can be changed in the tab).")


def cmd_ui(ns: argparse.Namespace) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UserError("the ui command needs gradio: pip install gradio") from None
    from .app import launch, parse_auth

    if ns.auth:
        parse_auth(ns.auth)  # a malformed --auth fails before the server starts
    launch(Path(ns.output_dir), port=ns.port, listen=ns.listen, auth=ns.auth,
           lora_dir=Path(ns.lora_dir) if ns.lora_dir else None, base_model=ns.base_model)
    return 0
