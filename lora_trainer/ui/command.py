"""The ``ui`` subcommand of ``python -m lora_trainer`` (gradio is imported only when it runs)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..dataset_store import UploadLimits
from ..errors import UserError

_DEFAULT_LIMITS = UploadLimits()


def add_ui_parser(sub) -> None:
    ui = sub.add_parser("ui", help="Open the Train LoRA tab as a standalone app in the browser.",
                        description="The same Train LoRA tab as in the WebUI, on its own page, with the HTTP API "
                                    "under /lora-trainer/v1 (needs: pip install -r requirements/ui.txt).")
    ui.add_argument("--port", type=int, default=None, help="Port (default 7860, or the next free one).")
    ui.add_argument("--listen", action="store_true",
                    help="Listen on every network interface (default: 127.0.0.1 only).")
    ui.add_argument("--auth", default="", metavar="USER:PASSWORD",
                    help="Ask for this login (in the browser, and as HTTP basic auth in the API).")
    ui.add_argument("--output-dir", default="output", help="Folder for run folders (default ./output).")
    ui.add_argument("--datasets-dir", default=None,
                    help="Folder for datasets made or uploaded in the tab (default: datasets/ beside --output-dir).")
    ui.add_argument("--allow", action="append", default=[], metavar="DIR",
                    help="A folder the HTTP API may read datasets from, besides the output and datasets folders "
                         "(repeat for more).")
    ui.add_argument("--max-file-mb", type=float, default=_DEFAULT_LIMITS.max_file_bytes / 2**20,
                    help="Uploads: the largest file accepted, in MB (default %(default)g).")
    ui.add_argument("--max-upload-mb", type=float, default=_DEFAULT_LIMITS.max_total_bytes / 2**20,
                    help="Uploads: the most one upload may add, in MB (default %(default)g).")
    ui.add_argument("--lora-dir", default=None, help="Also copy finished LoRAs here (e.g. a WebUI's models/Lora).")
    ui.add_argument("--base-model", default="", help="Checkpoint path to fill in (it can be changed in the tab).")


def cmd_ui(ns: argparse.Namespace) -> int:
    limits = UploadLimits.from_mb(ns.max_file_mb, ns.max_upload_mb)  # bad flags fail before gradio loads
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UserError("the ui command needs gradio: pip install -r requirements/ui.txt") from None
    from .app import launch, parse_auth

    if ns.auth:
        parse_auth(ns.auth)  # a malformed --auth fails before the server starts
    launch(Path(ns.output_dir), port=ns.port, listen=ns.listen, auth=ns.auth,
           lora_dir=Path(ns.lora_dir) if ns.lora_dir else None, base_model=ns.base_model,
           datasets_dir=Path(ns.datasets_dir) if ns.datasets_dir else None,
           allowed=[Path(a) for a in ns.allow], upload_limits=limits)
    return 0
