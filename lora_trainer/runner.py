"""One training run from a config: check the data, open the run folder, load the model, train.

Every front end (CLI, tab, HTTP API) calls ``run_training``; they differ only in how the
backbone is obtained and which events they listen to. A run that fails before its first step
(a wrong model, a missing init_lora, no GPU, ...) removes the run folder it created, so the
next attempt gets the same name; the user sees the error from the front end, once.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional

from .backbones.base import Backbone
from .config import TrainConfig
from .distributed import SINGLE, Processes
from .errors import ModelError, UserError
from .events import EventBus, Failed, StopRequest
from .run_folder import RunFolder
from .tensorboard_log import require_tensorboard
from .trainer import TrainResult, train
from .training_data import PreparedData, prepare_data

logger = logging.getLogger("lora_trainer")

BackboneLoader = Callable[[TrainConfig], Backbone]


@dataclass
class CheckedInput:
    """What ``check_before_start`` found: the prepared dataset and what its scan logged (skipped images)."""

    data: PreparedData
    scan_log: List[logging.LogRecord]


def check_before_start(config: TrainConfig, processes: int = 1) -> CheckedInput:
    """Everything that can be checked without the model: the dataset (images, captions, buckets) and init_lora.

    The job runs it before it accepts a run, so the tab and the API refuse at once (the API with 422) and
    nothing is written or locked; ``run_training`` runs it itself when called without it (the CLI).
    """
    with _remembered_logs() as scan_log:
        data = prepare_data(config, processes)
    check_init_lora(config)
    if config.log_with == "tensorboard":
        require_tensorboard()
    return CheckedInput(data, scan_log)


def run_training(config: TrainConfig, load_backbone: BackboneLoader, events: Optional[EventBus] = None,
                 stop: Optional[StopRequest] = None, resume_dir: Optional[Path] = None,
                 checked: Optional[CheckedInput] = None, processes: Processes = SINGLE) -> TrainResult:
    """Train as ``config`` says. With ``resume_dir``, continue that run from its last checkpoint. Under a
    data-parallel launcher every process calls this; only the main one makes and writes the run folder."""
    events = events or EventBus()
    with RunGuard(events, resume_dir) as guard:
        # a bad dataset fails here, before any model loads
        checked = checked or check_before_start(config, processes.world)
        if processes.is_main:
            guard.run = RunFolder.open_existing(resume_dir) if resume_dir else RunFolder.create(config)
            guard.run.start_log(earlier=checked.scan_log)  # train.log also lists the images the scan skipped
            logger.info("run folder: %s", guard.run.path)
            if processes.parallel:
                logger.info("global batch: %d per process x %d processes x %d accumulation steps = %d images a step",
                            config.batch_size, processes.world, config.gradient_accumulation_steps,
                            checked.data.plan.global_batch * config.gradient_accumulation_steps)
        run = guard.run if not processes.parallel else RunFolder(processes.broadcast(str(guard.run.path)
                                                                                     if guard.run else ""))
        backbone = load_backbone(config)
        return train(config, backbone, checked.data, run, events, stop, resume=resume_dir is not None,
                     processes=processes)


class RunGuard:
    """How every run (image or text) ends when it fails: the error goes into train.log (the front end shows it),
    the failure is reported as an event, the log is closed, and a run folder that got no step is removed."""

    def __init__(self, events: EventBus, resume_dir: Optional[Path]):
        self.events, self.resume_dir = events, resume_dir
        self.run: Optional[RunFolder] = None  # only set where the run folder is written (the main process)

    def __enter__(self) -> RunGuard:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        where = self.run.path if self.run else None
        discard = exc_type is not None and issubclass(exc_type, (UserError, KeyboardInterrupt))
        if exc_type is not None and issubclass(exc_type, UserError):
            if self.run is not None:
                self.run.log_error(str(exc))
            self.events.emit(Failed(where, str(exc)))
        elif exc_type is not None and issubclass(exc_type, Exception):
            logger.error("training failed", exc_info=(exc_type, exc, tb))
            self.events.emit(Failed(where, f"{exc_type.__name__}: {exc}"))
        if self.run is not None:
            self.run.stop_log()
            if discard and self.resume_dir is None and self.run.discard_if_unused():
                logger.info("removed %s: the run stopped before its first step", self.run.path)
        return False


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
