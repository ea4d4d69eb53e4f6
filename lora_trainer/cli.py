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
from .ui.command import add_ui_parser, cmd_ui

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
    return (meta["help"] + f" ({'; '.join(extra)})").replace("%", "%%")  # argparse formats help with %


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    for section, fields in fields_by_section().items():
        group = parser.add_argument_group(f"{section} options")
        for f in fields:
            flags = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
            kind = field_type(f.name)
            if kind is list:
                metavar = "YAML" if f.metadata["item"] == "mapping" else "TEXT"  # --subsets "{image_dir: a}"
                group.add_argument(*flags, dest=f.name, action="append", metavar=metavar, help=_field_help(f))
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
    demo.add_argument("--steps", type=int, default=500, help="Training steps (default 500, about a minute).")
    demo.add_argument("--task", choices=("text-to-image", "text-generation"), default="text-to-image",
                      help="text-to-image: a tiny SD1 model; text-generation: a tiny LLaMA-style language model.")
    add_caption_parser(sub)
    add_lora_tool_parsers(sub)
    add_ui_parser(sub)
    return parser


def add_caption_parser(sub) -> None:
    cap = sub.add_parser("caption", help="Caption a folder of images with CLIP (metadata.csv and/or .txt files).",
                         description="Caption every image of DIR by ranking CLIP phrase banks (and your own "
                                     "candidate phrases) against it. Only caption files are written into DIR; "
                                     "replaced ones are backed up in DIR/.lora_trainer_backup/.")
    cap.add_argument("dir", metavar="DIR", help="Folder of training images (and one level of sub-folders).")
    cap.add_argument("--format", dest="fmt", choices=("auto", "csv", "txt", "both"), default="auto",
                     help="Where captions go: metadata.csv, .txt files or both (default auto: the kind the "
                          "folder already has, else metadata.csv).")
    cap.add_argument("--mode", choices=("skip", "append", "overwrite"), default="skip",
                     help="Images that already have a caption: keep it (skip, default), add new phrases to it "
                          "(append) or replace it (overwrite).")
    cap.add_argument("--trigger", default="", metavar="WORD", help="Trigger word put first in every new caption.")
    cap.add_argument("--candidates", metavar="FILE", help="Your own phrases, one a line (up to 3 per image; "
                                                          "a '# top: N' line changes that). They come first.")
    cap.add_argument("--banks", default="all", metavar="NAMES",
                     help="Comma-separated phrase banks to use, 'all' (default) or 'none' (only --candidates).")
    cap.add_argument("--bank-dir", metavar="DIR", help="Folder of extra or replacement bank .txt files.")
    cap.add_argument("--model", default="ViT-L-14", help="open_clip model name, or a model config .json "
                                                         "(default ViT-L-14).")
    cap.add_argument("--pretrained", default="openai",
                     help="Pretrained tag (default openai; downloaded once) or a local weights file.")
    cap.add_argument("--threshold", type=float, default=0.2,
                     help="Lowest CLIP cosine similarity a phrase needs (default 0.2).")
    cap.add_argument("--batch-size", type=int, default=16, help="Images encoded together (default 16).")
    cap.add_argument("--max-tokens", type=int, default=75, help="Caption length limit in CLIP tokens (default 75).")
    cap.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available).")
    cap.add_argument("--cache-dir", default=None, help="Text-embedding cache (default $LORA_TRAINER_CACHE or "
                                                       "~/.cache/lora_trainer).")


def add_lora_tool_parsers(sub) -> None:
    gen = sub.add_parser("generate", help="Render a prompt with <lora:name:weight> tags (A1111 syntax) to a PNG.",
                         description="Render PROMPT on a base model with every <lora:name:w> / <lora:name:te:unet> "
                                     "tag applied (any number blend). The PNG carries A1111 infotext.")
    gen.add_argument("--base", required=True, metavar="CKPT",
                     help="Base model .safetensors/.ckpt or diffusers folder.")
    gen.add_argument("--prompt", required=True, help='Prompt, e.g. "a phone on a table, <lora:brand:0.7>".')
    gen.add_argument("--negative", default="", help="Negative prompt.")
    gen.add_argument("--seed", type=int, default=1, help="Seed (default 1).")
    gen.add_argument("--steps", type=int, default=20, help="Sampling steps (default 20, DDIM).")
    gen.add_argument("--cfg-scale", type=float, default=7.0, help="Classifier-free guidance scale (default 7).")
    gen.add_argument("--size", default="512x512", help="WIDTHxHEIGHT (default 512x512).")
    gen.add_argument("--lora-dir", default="models/Lora", metavar="DIR",
                     help="Folder searched (recursively) for LoRA names: file stem or ss_output_name.")
    gen.add_argument("--out", metavar="FILE.png", help="Output PNG (default generated-<seed>.png, never overwritten).")
    gen.add_argument("--model-config", default="", metavar="DIR", help="Diffusers config folder for a single file.")
    gen.add_argument("--clip-skip", type=int, default=1, help="CLIP skip (default 1).")
    gen.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto).")

    merge = sub.add_parser("merge", help="Blend LoRA files into one (exact rank concatenation, or SVD to --rank).",
                           description="Merge weighted LoRAs: FILE:WEIGHT ... -o OUT. Without --rank the result is "
                                       "exact (ranks add up); with --rank N each layer is truncated by SVD and the "
                                       "error is reported.")
    merge.add_argument("inputs", nargs="+", metavar="FILE:WEIGHT",
                       help="LoRA files with weights, e.g. a.safetensors:0.6.")
    merge.add_argument("-o", "--out", required=True, metavar="OUT", help="Output .safetensors (must be a new file).")
    merge.add_argument("--rank", type=int, help="SVD-merge to this rank (default: exact concatenation).")
    merge.add_argument("--conv-rank", type=int, help="SVD rank of conv (LoCon) layers (default: --rank).")
    merge.add_argument("--precision", choices=("auto", "fp32", "fp16", "bf16"), default="auto",
                       help="Saved dtype (default auto: the inputs' dtype if they agree, else fp32).")
    merge.add_argument("--overwrite", action="store_true", help="Replace OUT if it exists (never an input).")

    ins = sub.add_parser("inspect", help="Show what a LoRA file is: family, rank, type, trigger words, hashes.",
                         description="Describe a LoRA file (kohya, LyCORIS, diffusers or peft); with --base, count "
                                     "how many of its layers that model has (the rest the WebUI skips).")
    ins.add_argument("file", metavar="FILE", help="LoRA .safetensors file.")
    ins.add_argument("--base", metavar="CKPT", help="Base model to match the layers against.")
    ins.add_argument("--model-config", default="", metavar="DIR", help="Diffusers config folder for --base.")
    ins.add_argument("--json", action="store_true", help="Print JSON instead of text.")


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
    from .distributed import join_from_environment, leave
    from .progress import ConsoleProgress

    config, resume_dir = config_from_args(ns)
    processes = join_from_environment()  # torchrun / accelerate launch: several processes, one run
    try:
        if processes.parallel and config.task_type == "text-generation":
            raise ConfigError("data-parallel training covers text-to-image runs; run text-generation in one process")
        if processes.device():
            config = config.replace(device=processes.device())
        if not processes.is_main:  # the main process reports and writes; the others stay quiet
            logging.getLogger("lora_trainer").setLevel(logging.WARNING)
            from .runner import load_standalone_backbone, run_training

            run_training(config, load_standalone_backbone, resume_dir=resume_dir, processes=processes)
            return 0
        progress = ConsoleProgress()
        with progress.redirect_logging():
            if config.task_type == "text-generation":
                from .text.runner import run_text_training

                result = run_text_training(config, events=progress.bus, resume_dir=resume_dir)
            else:
                from .runner import load_standalone_backbone, run_training

                result = run_training(config, load_standalone_backbone, events=progress.bus, resume_dir=resume_dir,
                                      processes=processes)
    finally:
        leave(processes)
    if result.lora_path:
        logger.info("LoRA: %s", result.lora_path)
    return 0


def cmd_demo(ns: argparse.Namespace) -> int:
    if ns.task == "text-generation":
        from .text.demo import run_text_demo

        run_text_demo(Path(ns.output), steps=ns.steps)
        return 0
    from .demo import run_demo

    run_demo(Path(ns.output), steps=ns.steps)
    return 0


def cmd_caption(ns: argparse.Namespace) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from .caption import caption_dataset

    banks = None if ns.banks.strip().lower() == "all" else [
        b for b in ns.banks.split(",") if b.strip() and b.strip().lower() != "none"]
    with logging_redirect_tqdm(loggers=[logging.root]):
        run = caption_dataset(ns.dir, model_name=ns.model, pretrained=ns.pretrained, device=ns.device,
                              bank_names=banks, bank_dir=ns.bank_dir, cache_dir=ns.cache_dir,
                              candidates=ns.candidates, mode=ns.mode, fmt=ns.fmt, trigger=ns.trigger,
                              threshold=ns.threshold, batch_size=ns.batch_size, max_tokens=ns.max_tokens,
                              show_progress=True)
    print(run.summary())
    return 0


def cmd_generate(ns: argparse.Namespace) -> int:
    from .generate import generate_to_png, parse_size

    result = generate_to_png(ns.base, ns.prompt, ns.negative, seed=ns.seed, steps=ns.steps,
                             size=parse_size(ns.size), lora_dir=Path(ns.lora_dir),
                             out=Path(ns.out) if ns.out else None, model_config=ns.model_config,
                             cfg_scale=ns.cfg_scale, clip_skip=ns.clip_skip, device=ns.device)
    print(result.path)
    return 0


def cmd_merge(ns: argparse.Namespace) -> int:
    from .merge import merge_loras, parse_weighted_path

    sources = [parse_weighted_path(text) for text in ns.inputs]
    report = merge_loras(sources, Path(ns.out), rank=ns.rank, conv_rank=ns.conv_rank, precision=ns.precision,
                         overwrite=ns.overwrite)
    print(report.summary())
    return 0


def cmd_inspect(ns: argparse.Namespace) -> int:
    import json

    from .inspect_lora import format_report, inspect_lora

    targets, family, base_name = None, None, ""
    if ns.base:
        from .backbones.single_file import load_backbone_from_path

        backbone = load_backbone_from_path(ns.base, ns.model_config)
        targets, family, base_name = backbone.lora_targets(conv=True, text_encoder=True), backbone.family, \
            backbone.model_name
    info = inspect_lora(Path(ns.file), targets, family, base_name)
    print(json.dumps(info, indent=2) if ns.json else format_report(info))
    return 0


COMMANDS = {"train": cmd_train, "demo": cmd_demo, "caption": cmd_caption,
            "generate": cmd_generate, "merge": cmd_merge, "inspect": cmd_inspect, "ui": cmd_ui}


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
