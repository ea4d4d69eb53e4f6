"""One training run from a config: check the data, open the run folder, load the model, train.

Every front end (CLI, tab, HTTP API) calls ``run_training``; they differ only in how the
backbone is obtained and which events they listen to. A run that fails before its first step
(a wrong model, a missing init_lora, no GPU, ...) removes the run folder it created, so the
next attempt gets the same name; the user sees the error from the front end, once.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Callable, Iterator, List, Optional

from .backbones.base import Backbone
from .config import TrainConfig
from .errors import ModelError, UserError
from .events import EventBus, Failed, StopRequest
from .run_folder import RunFolder
from .trainer import TrainResult, train
from .training_data import prepare_data

logger = logging.getLogger("lora_trainer")

BackboneLoader = Callable[[TrainConfig], Backbone]


def run_training(config: TrainConfig, load_backbone: BackboneLoader, events: Optional[EventBus] = None,
                 stop: Optional[StopRequest] = None, resume_dir: Optional[Path] = None) -> TrainResult:
    """Train as ``config`` says. With ``resume_dir``, continue that run from its last checkpoint."""
    events = events or EventBus()
    run: Optional[RunFolder] = None
    discard = False  # set on a user error or Ctrl-C: a folder with no step done is then removed
    try:
        with _remembered_logs() as scan_log:
            data = prepare_data(config)  # a bad dataset fails here, before any model loads
        check_init_lora(config)
        run = RunFolder.open_existing(resume_dir) if resume_dir else RunFolder.create(config)
        if resume_dir:
            run.save_config(config)  # an extend raises max_train_steps; a later resume must see the new total
        run.start_log(earlier=scan_log)  # train.log also lists the images the scan skipped
        logger.info("run folder: %s", run.path)
        backbone = load_backbone(config)
        return train(config, backbone, data, run, events, stop, resume=resume_dir is not None)
    except UserError as exc:
        discard = True
        if run is not None:
            run.log_error(str(exc))  # into train.log; the front end shows it on the console or in the tab
        events.emit(Failed(run.path if run else None, str(exc)))
        raise
    except KeyboardInterrupt:
        discard = True
        raise
    except Exception as exc:
        logger.exception("training failed")
        events.emit(Failed(run.path if run else None, f"{type(exc).__name__}: {exc}"))
        raise
    finally:
        if run is not None:
            run.stop_log()
            if discard and resume_dir is None and run.discard_if_unused():
                logger.info("removed %s: the run stopped before its first step", run.path)


class _Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: List[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def _remembered_logs() -> Iterator[List[logging.LogRecord]]:
    """Keep the records logged inside the block (before train.log exists) to write them there later."""
    recorder = _Recorder()
    logger.addHandler(recorder)
    try:
        yield recorder.records
    finally:
        logger.removeHandler(recorder)


def check_init_lora(config: TrainConfig) -> None:
    """Fail before any model loads when ``init_lora`` names no file."""
    if config.init_lora and not Path(config.init_lora).is_file():
        raise ModelError(f"init_lora {config.init_lora}: no such file; check the path, or leave init_lora empty "
                         "to start from zeros")


def load_standalone_backbone(config: TrainConfig) -> Backbone:
    """The backbone for a checkpoint file or diffusers folder named by ``config.base_model``."""
    from .backbones.single_file import load_backbone_from_path
    from .devices import resolve_device

    device = resolve_device(config.device)
    return load_backbone_from_path(config.base_model, config.model_config, family=config.family,
                                   prediction_type=config.prediction_type, clip_skip=config.clip_skip,
                                   device=device, dtype=base_weight_dtype(config.mixed_precision, device))


def base_weight_dtype(mixed_precision: str, device) -> torch.dtype:  # noqa: F821
    """The frozen base model's dtype: the mixed precision on a GPU (as kohya does; SDXL needs it to fit 12 GB),
    float32 otherwise. The LoRA weights stay float32 either way."""
    import torch

    if getattr(device, "type", str(device)) == "cuda" and mixed_precision in ("fp16", "bf16"):
        return torch.float16 if mixed_precision == "fp16" else torch.bfloat16
    return torch.float32
