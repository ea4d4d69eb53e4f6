"""One text-generation run from a config: read and tokenize the data, open the run folder, load the
model, attach LoRA, train. ``python -m lora_trainer train`` calls ``run_text_training`` when
``task_type`` is ``text-generation``; it has the same shape as ``runner.run_training``.

Bad data and a bad model folder fail before anything is written or any weights load.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from ..config import TrainConfig, is_safe_name
from ..devices import resolve_device
from ..errors import ModelError
from ..events import EventBus, StopRequest
from ..run_folder import RunFolder
from ..runner import RunGuard
from ..trainer import TrainResult
from .records import read_records

logger = logging.getLogger("lora_trainer")


def run_text_training(config: TrainConfig, events: Optional[EventBus] = None, stop: Optional[StopRequest] = None,
                      resume_dir: Optional[Path] = None) -> TrainResult:
    """Train a LoRA adapter for ``config.base_model``. With ``resume_dir``, continue that run.

    ``config.load_in_4bit`` loads the base model in 4-bit NF4 (QLoRA; needs bitsandbytes and a CUDA GPU).
    """
    events = events or EventBus()
    with RunGuard(events, resume_dir) as guard:
        _require_libraries()
        from .model import attach_lora, check_context_length, check_model_folder, load_causal_lm, load_tokenizer
        from .sequences import tokenize_records

        records = read_records(config.train_data_dir, config.metadata_path)  # fails before any model loads
        folder = check_model_folder(config.base_model)
        check_context_length(folder, config.max_seq_length)
        tokenizer = load_tokenizer(folder)
        data = tokenize_records(records, tokenizer, config.max_seq_length)
        run = guard.run = RunFolder.open_existing(resume_dir) if resume_dir else RunFolder.create(_named(config))
        run.start_log()
        logger.info("run folder: %s", run.path)
        more = f" and {len(records.files) - 5} more" if len(records.files) > 5 else ""
        logger.info("data: %s%s", ", ".join(str(f) for f in records.files[:5]), more)
        for line in data.summary():
            logger.info("%s", line)
        model = load_causal_lm(folder, resolve_device(config.device), config.mixed_precision,
                               config.gradient_checkpointing, config.load_in_4bit)
        model = attach_lora(model, config.lora_rank, config.lora_alpha, config.target_modules, config.seed)
        from .loop import TextLoop

        loop = TextLoop(config, model, tokenizer, data, run, events, stop or StopRequest())
        return loop.run(resume=resume_dir is not None)


def _named(config: TrainConfig) -> TrainConfig:
    """Without output_name, name the run after the data file or folder (``chats.jsonl`` -> ``chats``)."""
    if config.output_name:
        return config
    stem = Path(config.metadata_path or config.train_data_dir).stem
    return config.replace(output_name=stem if is_safe_name(stem) else "lora")


def _require_libraries() -> None:
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        raise ModelError(f"task_type text-generation needs transformers and peft ({exc.name} is missing): "
                         "`pip install transformers peft`") from None
