"""TensorBoard event files for a run (``log_with: tensorboard``): loss, lr and validation loss per step.

tensorboard is optional (AUTOMATIC1111's venv may lack it), so it is imported only when a log is
opened. Logging is a side channel: a write that fails (full disk, a removed folder) turns the log
off with one warning and never stops training.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Optional

from .errors import ConfigError

if TYPE_CHECKING:
    from .config import TrainConfig

logger = logging.getLogger("lora_trainer")

_MISSING = ("log_with: tensorboard needs the tensorboard package (pip install tensorboard), "
            "or set log_with: none")
_EVENTS_PREFIX = "events.out.tfevents."


def require_tensorboard() -> None:
    """Fail before a run starts, in one line, rather than after the model has loaded."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise ConfigError(_MISSING) from None


def _newest_file_stamp(log_dir: Path) -> int:
    """The creation second in the newest event file's name (0 when there is none)."""
    stamps = [0]
    if log_dir.is_dir():
        for entry in log_dir.iterdir():
            stamp = entry.name[len(_EVENTS_PREFIX):].split(".", 1)[0]
            if entry.name.startswith(_EVENTS_PREFIX) and stamp.isdigit():
                stamps.append(int(stamp))
    return max(stamps)


class TensorBoardLog:
    """One run's TensorBoard writer; every call is a no-op once a write has failed."""

    def __init__(self, log_dir: Path, purge_step: Optional[int] = None):
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        # TensorBoard reads a folder's event files in name order, and a name starts with its creation second:
        # a resumed writer made in the same second as the old one could sort first, and its purge would then
        # be undone by the old file's steps. Only a resume within a second of the start (tests) ever waits.
        while _newest_file_stamp(self.log_dir) >= int(time.time()):
            time.sleep(0.05)
        self._writer = SummaryWriter(str(self.log_dir), purge_step=purge_step)

    @classmethod
    def open(cls, config: TrainConfig, run_folder_path: Path, run_name: str,
             start_step: int) -> Optional[TensorBoardLog]:
        """The run's log, or None with ``log_with: none`` or when its folder cannot be created (one warning).

        A resume from ``start_step`` purges the events after it: TensorBoard then hides the steps the
        interrupted run logged past its checkpoint, so each step shows once, with the resumed values.
        """
        if config.log_with == "none":
            return None
        log_dir = Path(config.logging_dir) / run_name if config.logging_dir else Path(run_folder_path) / "tensorboard"
        try:
            return cls(log_dir, purge_step=start_step + 1 if start_step > 0 else None)
        except OSError as exc:
            logger.warning("TensorBoard log off: %s cannot be written (%s); training goes on", log_dir, exc)
            return None

    @property
    def enabled(self) -> bool:
        return self._writer is not None

    def scalars(self, step: int, values: Dict[str, Optional[float]]) -> None:
        """Write ``{tag: value}`` at ``step``; None and NaN (no value this step) are left out."""
        if self._writer is None:
            return
        try:
            for tag, value in values.items():
                if value is None:
                    continue
                value = float(value)
                if not math.isnan(value):
                    self._writer.add_scalar(tag, value, step)
        except OSError as exc:  # raised here, or by the writer thread and re-raised on the next call
            self._fail(exc)

    def flush(self) -> None:
        self._guarded(lambda writer: writer.flush())

    def close(self) -> None:
        self._guarded(lambda writer: writer.close())
        self._writer = None

    def _guarded(self, call) -> None:
        if self._writer is None:
            return
        try:
            call(self._writer)
        except OSError as exc:
            self._fail(exc)

    def _fail(self, exc: OSError) -> None:
        logger.warning("TensorBoard log off: writing to %s failed (%s); training goes on", self.log_dir, exc)
        writer, self._writer = self._writer, None
        try:
            writer.close()  # releases the file; a broken writer raises its error again
        except OSError:
            pass
