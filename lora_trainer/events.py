"""What the training loop tells its front ends, and how they ask it to stop.

The CLI's progress bar, the tab and the HTTP API all subscribe to the same events; none of them
reaches into the loop.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

logger = logging.getLogger("lora_trainer")


@dataclass(frozen=True)
class Started:
    run_dir: Path
    total_steps: int
    start_step: int  # > 0 when resuming
    num_images: int


@dataclass(frozen=True)
class Progress:
    step: int  # optimizer steps done
    total_steps: int
    epoch: int
    loss: float  # this step
    avg_loss: float  # running mean over the last 50 steps
    lr: float
    it_per_s: float
    eta_s: float
    elapsed_s: float
    val_loss: Optional[float] = None  # at the steps the validation loss was computed


@dataclass(frozen=True)
class Phase:
    """Work after the last step (or before the first): ``name`` with ``done`` of ``total`` parts finished."""

    name: str  # "checking the LoRA", "rendering samples", "saving"
    done: int
    total: int


@dataclass(frozen=True)
class SampleSaved:
    step: int
    paths: List[Path] = field(default_factory=list)


@dataclass(frozen=True)
class CheckpointSaved:
    step: int
    path: Path


@dataclass(frozen=True)
class Finished:
    run_dir: Path
    lora_path: Optional[Path]  # None when stopped without saving
    steps: int
    stopped: bool


@dataclass(frozen=True)
class Failed:
    run_dir: Optional[Path]
    message: str


class EventBus:
    """Calls every subscriber with every event; a failing subscriber is logged, never stops training."""

    def __init__(self) -> None:
        self._subscribers: List[Callable[[object], None]] = []

    def subscribe(self, callback: Callable[[object], None]) -> Callable[[object], None]:
        self._subscribers.append(callback)
        return callback

    def emit(self, event: object) -> None:
        for callback in list(self._subscribers):
            try:
                callback(event)
            except Exception:  # a broken UI callback must not kill a long run
                logger.exception("event subscriber %r failed on %s", callback, type(event).__name__)


class StopRequest:
    """Set from any thread; the loop checks it once per step."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.save = True

    def request(self, save: bool = True) -> None:
        self.save = save
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()
