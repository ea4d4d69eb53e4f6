"""``python -m lora_trainer``: train, demo (and more subcommands as they land).

Every TrainConfig field is a flag of ``train`` (``--lora_rank 8`` or ``--lora-rank 8``), generated
from the schema, so ``--help`` always matches what the YAML accepts. Errors a user can fix print
one line and exit with status 2; nothing prints a traceback for them.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
import sys
from pathlib import Path
from typing import List, Optional

from .config import FIELDS, TrainConfig, field_type, fields_by_section, load_config_file
from .errors import ConfigError, UserError

logger = logging.getLogger("lora_trainer")


def _field_help(f: dataclasses.Field) -> str:
    meta = f.metadata
    extra = []
    if meta["choices"]:
        extra.append("one of " + ", ".join(meta["choices"]))
    if meta["min"] is not None:
        extra.append(f"{meta['min']:g}..{meta['max']:g}")
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    extra.append("default: empty" if default in ("", None, []) else f"default: {default}")
    return meta["help"] + f" ({'; '.join(extra)})"


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    for section, fields in fields_by_section().items():
        group = parser.add_argument_group(f"{section} options")
        for f in fields:
            flags = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
            kind = field_type(f.name)
            if kind is list:
                group.add_argument(*flags, dest=f.name, action="append", metavar="TEXT", help=_field_help(f))
            elif kind is bool:
                group.add_argument(*flags, dest=f.name, nargs="?", const="true", metavar="BOOL",
                                   help=_field_help(f))
            else:
                group.add_argument(*flags, dest=f.name, metavar=f.name.split("_")[-1].upper(), help=_field_help(f))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lora_trainer",
                                     description="Train LoRAs for Stable Diffusion, offline or inside the WebUI.")
    parser.add_argument("-v", "--verbose", action="store_true", help="Log debug messages.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", usage="python -m lora_trainer train [--config FILE] [--OPTION VALUE ...]",
                           help="Train a LoRA from a YAML config (every option can be overridden).",
                           description="Train a LoRA. Options come from --config and are overridden by flags.")
    train.add_argument("--config", help="YAML config file (see configs/brand_lora.yaml).")
    add_config_flags(train)

    demo = sub.add_parser("demo", help="Train a tiny built-in model on a generated dataset (offline, ~1 minute).")
    demo.add_argument("--output", default="demo_output", help="Folder for the demo model, data and runs.")
    demo.add_argument("--steps", type=int, default=150, help="Training steps (default 150).")
    return parser


def config_from_args(ns: argparse.Namespace) -> tuple:
    """(TrainConfig, resume_dir or None) from parsed ``train`` arguments."""
    overrides = {name: getattr(ns, name) for name in FIELDS if getattr(ns, name, None) is not None}
    resume = overrides.pop("resume", None)
    if resume:
        from .run_folder import RunFolder

        run = RunFolder.open_existing(Path(resume))
        return run.load_config(overrides), run.path
    if ns.config:
        path = Path(ns.config)
        config = load_config_file(path, overrides)
        if not config.output_name:
            config = config.replace(output_name=path.stem)
        return config, None
    return TrainConfig.from_dict(overrides, source="command line"), None


def _reject_unknown_flags(unknown: List[str]) -> None:
    flags = [u for u in unknown if u.startswith("--")]
    if not flags and not unknown:
        return
    bad = (flags or unknown)[0]
    close = difflib.get_close_matches(bad.lstrip("-").replace("-", "_"), list(FIELDS) + ["config"], n=1)
    hint = f"; did you mean --{close[0]}?" if close else ""
    raise ConfigError(f"unknown option {bad}{hint} (run with --help for the list)")


def cmd_train(ns: argparse.Namespace) -> int:
    from .progress import ConsoleProgress
    from .runner import load_standalone_backbone, run_training

    config, resume_dir = config_from_args(ns)
    progress = ConsoleProgress()
    with progress.redirect_logging():
        result = run_training(config, load_standalone_backbone, events=progress.bus, resume_dir=resume_dir)
    if result.lora_path:
        logger.info("LoRA: %s", result.lora_path)
    return 0


def cmd_demo(ns: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(Path(ns.output), steps=ns.steps)
    return 0


COMMANDS = {"train": cmd_train, "demo": cmd_demo}


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    ns, unknown = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.DEBUG if ns.verbose else logging.INFO,
                        format="%(levelname)s %(message)s" if ns.verbose else "%(message)s")
    try:
        _reject_unknown_flags(unknown)
        return COMMANDS[ns.command](ns)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stopped by the user (checkpoints are kept; continue with --resume RUN_FOLDER)", file=sys.stderr)
        return 130
