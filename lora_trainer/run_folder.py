"""One run on disk: ``<output_dir>/<name>/`` with its config, log, metrics, samples and results.

A run folder is created new for every run (``name``, ``name-2``, ...) and reused only by a
resume or an extend of that same run.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
from pathlib import Path
from typing import List, Optional, Sequence

from .charts import loss_chart
from .config import TrainConfig, config_to_yaml, load_config_file
from .errors import TrainingError
from .files import new_run_dir, storage_error, write_atomic, write_bytes_atomic, write_text_atomic

logger = logging.getLogger("lora_trainer")

METRICS_COLUMNS = ("step", "epoch", "loss", "avg_loss", "lr", "it_per_s", "seconds", "val_loss")
_START_FILES = {"config.yaml", "train.log"}  # all a run folder holds before its first step


class _LogFile(logging.FileHandler):
    """train.log; a line that cannot be written (full disk) is dropped, not printed as a traceback."""

    def handleError(self, record: logging.LogRecord) -> None:
        pass


class RunFolder:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.name = self.path.name
        self._log_handler: Optional[logging.Handler] = None

    @classmethod
    def create(cls, config: TrainConfig) -> RunFolder:
        name = config.output_name or Path(config.train_data_dir).name or "lora"
        run = cls(new_run_dir(Path(config.output_dir), name))
        try:
            write_text_atomic(run.config_path, config_to_yaml(config))
        except BaseException:
            run.discard_if_unused()
            raise
        return run

    @classmethod
    def open_existing(cls, path: Path) -> RunFolder:
        run = cls(Path(path))
        if not run.path.is_dir():
            raise TrainingError(f"{path}: no such run folder; give the folder a run was written to "
                                "(output_dir/output_name)")
        if not run.config_path.is_file():
            raise TrainingError(f"{path}: not a run folder (no config.yaml); give the folder a run was written to")
        return run

    def save_config(self, config: TrainConfig) -> None:
        text = config_to_yaml(config)
        if not self.config_path.is_file() or self.config_path.read_text(encoding="utf-8") != text:
            write_text_atomic(self.config_path, text)

    def load_config(self, overrides: Optional[dict] = None) -> TrainConfig:
        return load_config_file(self.config_path, overrides)

    # -- paths ---------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def lora_path(self) -> Path:
        return self.path / f"{self.name}.safetensors"

    @property
    def sidecar_path(self) -> Path:
        return self.path / f"{self.name}.json"

    @property
    def preview_path(self) -> Path:
        return self.path / f"{self.name}.preview.png"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.csv"

    @property
    def chart_path(self) -> Path:
        return self.path / "loss.png"

    @property
    def samples_dir(self) -> Path:
        return self.path / "samples"

    # -- the log -------------------------------------------------------------------------------
    def start_log(self, earlier: Sequence[logging.LogRecord] = ()) -> None:
        """Copy the ``lora_trainer`` log into train.log from now on, after the ``earlier`` records."""
        try:
            handler = _LogFile(self.path / "train.log", encoding="utf-8")
        except OSError as exc:
            raise storage_error(exc, self.path / "train.log") from None
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        for record in earlier:
            handler.handle(record)
        logging.getLogger("lora_trainer").addHandler(handler)
        self._log_handler = handler

    def stop_log(self) -> None:
        if self._log_handler is not None:
            logging.getLogger("lora_trainer").removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None

    def log_error(self, message: str) -> None:
        """Write ``message`` to train.log only: the front end shows it to the user itself, once."""
        if self._log_handler is not None:
            self._log_handler.handle(logger.makeRecord(logger.name, logging.ERROR, __file__, 0, "%s", (message,),
                                                       None))

    def discard_if_unused(self) -> bool:
        """Delete this folder if it holds only what a run writes before its first step; True if deleted.

        A run that fails to start (wrong model, missing init_lora, ...) then leaves nothing behind and the
        next attempt gets the same name. A folder with anything else in it is never touched.
        """
        with contextlib.suppress(OSError):
            entries = list(self.path.iterdir())
            if all(e.name in _START_FILES and e.is_file() and not e.is_symlink() for e in entries):
                for entry in entries:
                    entry.unlink()
                self.path.rmdir()
                return True
        return False

    # -- metrics -------------------------------------------------------------------------------
    def read_metrics(self) -> List[dict]:
        if not self.metrics_path.is_file():
            return []
        with open(self.metrics_path, newline="", encoding="utf-8") as fh:
            return [row for row in csv.DictReader(fh)]

    def _metrics_header(self) -> List[str]:
        with open(self.metrics_path, newline="", encoding="utf-8") as fh:
            return next(csv.reader(fh), [])

    def truncate_metrics(self, last_step: int) -> None:
        """Drop rows after ``last_step`` (written by a run that died after its last checkpoint)."""
        rows = [r for r in self.read_metrics() if int(r["step"]) <= last_step]
        self._write_metrics(rows)

    def append_metrics(self, rows: Sequence[dict]) -> None:
        new_file = not self.metrics_path.is_file()
        if not new_file and self._metrics_header() != list(METRICS_COLUMNS):  # written by an older version
            self._write_metrics(self.read_metrics())
        try:
            with open(self.metrics_path, "a", newline="", encoding="utf-8") as fh:
                writer = csv.DictWriter(fh, fieldnames=METRICS_COLUMNS)
                if new_file:
                    writer.writeheader()
                writer.writerows(rows)
        except OSError as exc:
            raise storage_error(exc, self.metrics_path) from None

    def _write_metrics(self, rows: Sequence[dict]) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=METRICS_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
        write_text_atomic(self.metrics_path, buffer.getvalue())

    # -- results -------------------------------------------------------------------------------
    def write_chart(self) -> None:
        rows = self.read_metrics()
        validation = [(int(r["step"]), float(r["val_loss"])) for r in rows if r.get("val_loss")]
        image = loss_chart([int(r["step"]) for r in rows], [float(r["loss"]) for r in rows], title=f"{self.name} loss",
                           validation=validation)
        write_atomic(self.chart_path, lambda tmp: image.save(tmp, format="PNG"))

    def write_sidecar(self, content: dict) -> None:
        write_text_atomic(self.sidecar_path, json.dumps(content, indent=4, ensure_ascii=False) + "\n")

    def write_preview(self, png_bytes: bytes) -> None:
        write_bytes_atomic(self.preview_path, png_bytes)
