"""One training run from a config: check the data, open the run folder, load the model, train.

Every front end (CLI, tab, HTTP API) calls ``run_training``; they differ only in how the
backbone is obtained and which events they listen to.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional

from .backbones.base import Backbone
from .config import TrainConfig
from .errors import UserError
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
    try:
        data = prepare_data(config)  # a bad dataset fails here, before any model loads
        run = RunFolder.open_existing(resume_dir) if resume_dir else RunFolder.create(config)
        run.start_log()
        logger.info("run folder: %s", run.path)
        backbone = load_backbone(config)
        return train(config, backbone, data, run, events, stop, resume=resume_dir is not None)
    except UserError as exc:
        logger.error("%s", exc)
        events.emit(Failed(run.path if run else None, str(exc)))
        raise
    except Exception as exc:
        logger.exception("training failed")
        events.emit(Failed(run.path if run else None, f"{type(exc).__name__}: {exc}"))
        raise
    finally:
        if run is not None:
            run.stop_log()


def load_standalone_backbone(config: TrainConfig) -> Backbone:
    """The backbone for a checkpoint file or diffusers folder named by ``config.base_model``."""
    from .backbones.single_file import load_backbone_from_path
    from .devices import resolve_device

    device = resolve_device(config.device)
    return load_backbone_from_path(config.base_model, config.model_config, family=config.family,
                                   prediction_type=config.prediction_type, clip_skip=config.clip_skip,
                                   device=device)
