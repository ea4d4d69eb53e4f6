"""A training run in a background thread: the one thing the tab, the HTTP API and the WebUI glue drive.

This module, not the UI, enforces one run at a time. The UI only calls ``start_job``, ``stop``,
``extend`` and polls ``snapshot()``; the thread holds the host's model lock for the whole run and
releases it on every exit path.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from enum import Enum
from pathlib import Path
from typing import List, Optional

from .config import TrainConfig
from .errors import UserError
from .events import (
    CheckpointSaved,
    EventBus,
    Failed,
    Finished,
    Phase,
    Progress,
    SampleSaved,
    Started,
    StopRequest,
)
from .host import Host
from .publish import publish_lora
from .run_folder import RunFolder
from .runner import CheckedInput, check_before_start, run_training

logger = logging.getLogger("lora_trainer")


class JobState(str, Enum):
    QUEUED = "queued"  # waiting for the model lock (e.g. a txt2img is still running)
    RUNNING = "running"
    STOPPING = "stopping"
    FINISHED = "finished"
    STOPPED = "stopped"
    FAILED = "failed"


ACTIVE = (JobState.QUEUED, JobState.RUNNING, JobState.STOPPING)


class JobBusy(UserError):
    """Another training run is in progress."""


class JobNotExtendable(UserError):
    """Extend needs a finished or stopped run with a checkpoint."""


_registry_lock = threading.Lock()
_jobs: dict = {}
_current: Optional[TrainingJob] = None


def start_job(config: TrainConfig, host: Host, resume_dir: Optional[Path] = None) -> TrainingJob:
    """Start training in the background; raise JobBusy while another run is active, or the UserError of a dataset
    or init_lora that cannot work (checked here, so the caller can refuse the request before anything starts)."""
    global _current
    with _registry_lock:
        if _current is not None and _current.state in ACTIVE:
            snap = _current.snapshot()
            raise JobBusy(f"a training run is already in progress ({snap['name']}, step {snap['step']}/"
                          f"{snap['total_steps']}); stop it or wait for it to finish")
        try:
            host.check_model()
            checked = check_before_start(config)
        except UserError as exc:
            logger.warning("training not started: %s", exc)  # the WebUI's console too, not only the answer
            raise
        job = TrainingJob(config, host, resume_dir, checked)
        _current = job
        _jobs[job.id] = job
    job._thread.start()
    return job


def current_job() -> Optional[TrainingJob]:
    return _current


def get_job(job_id: str) -> Optional[TrainingJob]:
    return _jobs.get(job_id)


class _LogTail(logging.Handler):
    def __init__(self, lines: deque):
        super().__init__(logging.INFO)
        self.lines = lines
        self.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


class TrainingJob:
    def __init__(self, config: TrainConfig, host: Host, resume_dir: Optional[Path] = None,
                 checked: Optional[CheckedInput] = None):
        self.id = uuid.uuid4().hex[:12]
        self.config, self.host, self.resume_dir, self.checked = config, host, resume_dir, checked
        self.state = JobState.QUEUED
        self.stop_request = StopRequest()
        self.events = EventBus()
        self.events.subscribe(self._on_event)
        self.run_dir: Optional[Path] = Path(resume_dir) if resume_dir else None
        self.step, self.start_step, self.total_steps = 0, 0, 0
        self.last: Optional[Progress] = None
        self.losses: List[tuple] = []
        self.val_losses: List[tuple] = []  # (step, validation loss) where it was measured
        self.samples: List[str] = []
        self.lora_path: Optional[Path] = None
        self.published: List[str] = []
        self.error: Optional[str] = None
        self.phase = ""  # after the last step: "checking the LoRA 3/8", "saving", ...
        self.log_tail: deque = deque(maxlen=200)
        self.created_at, self.finished_at = time.time(), None
        self._thread = threading.Thread(target=self._run, name=f"lora-trainer-{self.id}", daemon=True)

    # -- control -----------------------------------------------------------------------------------
    def stop(self, save: bool = True) -> None:
        """Stop after the current step; with ``save`` the LoRA trained so far is written as the result."""
        if self.state in ACTIVE:
            self.stop_request.request(save=save)
            self.state = JobState.STOPPING

    def extend(self, steps: int) -> TrainingJob:
        """Continue this (finished or stopped) run in place for ``steps`` more steps, as a new job."""
        if self.state not in (JobState.FINISHED, JobState.STOPPED) or self.run_dir is None:
            raise JobNotExtendable(f"only a finished or stopped run can be extended (this one is {self.state.value})")
        if steps < 1:
            raise JobNotExtendable("extend by at least 1 step")
        config = RunFolder.open_existing(self.run_dir).load_config(
            {"max_train_steps": self.step + steps, "device": self.config.device})
        return start_job(config, self.host, resume_dir=self.run_dir)

    def wait(self, timeout: Optional[float] = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def snapshot(self) -> dict:
        """Everything a UI shows, as plain JSON-able values."""
        last = self.last
        return {
            "id": self.id, "state": self.state.value,
            "name": self.run_dir.name if self.run_dir else (self.config.output_name or "lora"),
            "run_dir": str(self.run_dir) if self.run_dir else None,
            "step": self.step, "total_steps": self.total_steps, "start_step": self.start_step,
            "epoch": last.epoch if last else 0,
            "loss": last.loss if last else None, "avg_loss": last.avg_loss if last else None,
            "lr": last.lr if last else None, "it_per_s": last.it_per_s if last else None,
            "eta_s": last.eta_s if last else None, "elapsed_s": last.elapsed_s if last else None,
            "losses": list(self.losses), "val_losses": list(self.val_losses), "samples": list(self.samples),
            "lora_path": str(self.lora_path) if self.lora_path else None, "published": list(self.published),
            "phase": self.phase, "error": self.error, "log": list(self.log_tail)[-30:],
        }

    # -- the thread --------------------------------------------------------------------------------
    def _run(self) -> None:
        handler = _LogTail(self.log_tail)
        logger.addHandler(handler)
        if logger.level == logging.NOTSET or logger.level > logging.INFO:
            logger.setLevel(logging.INFO)
        try:
            with self.host.model_lock():
                if self.stop_request.is_set():  # stopped while still queued
                    self.state = JobState.STOPPED
                    return
                self.state = JobState.RUNNING
                try:
                    result = run_training(self.config, self.host.load_backbone, self.events, self.stop_request,
                                          self.resume_dir, self.checked)
                finally:
                    self.host.progress_finished()
            # The model is given back: the WebUI generates again while the file is published.
            self.lora_path = result.lora_path
            self._set_phase("publishing")
            self._publish()
            self.phase = ""
            self.state = JobState.STOPPED if result.stopped else JobState.FINISHED
        except UserError as exc:
            logger.error("%s", exc)  # the runner keeps it out of the console; the tab's log tail shows it
            self.error, self.state = str(exc), JobState.FAILED
        except Exception as exc:  # a bug: keep the traceback in the log, show one line in the UI
            logger.exception("training failed")
            self.error, self.state = f"{type(exc).__name__}: {exc}", JobState.FAILED
        finally:
            self.finished_at = time.time()
            logger.removeHandler(handler)

    def _set_phase(self, phase: str) -> None:
        self.phase = phase
        self.host.phase(phase)

    def _publish(self) -> None:
        lora_dir = self.host.lora_dir()
        if lora_dir is None or self.lora_path is None or self.run_dir is None:
            return
        paths = publish_lora(RunFolder(self.run_dir), lora_dir)
        self.published = [str(p) for p in paths]
        self.host.published(paths)
        logger.info("published to %s", lora_dir)

    def _on_event(self, event: object) -> None:
        if isinstance(event, Started):
            self.run_dir, self.total_steps = event.run_dir, event.total_steps
            self.step = self.start_step = event.start_step
            if event.start_step:  # resumed or extended: the chart shows the run's whole history
                rows = RunFolder(event.run_dir).read_metrics()
                self.losses = [(int(r["step"]), float(r["loss"])) for r in rows]
                self.val_losses = [(int(r["step"]), float(r["val_loss"])) for r in rows if r.get("val_loss")]
            self.host.progress_started(f"Train LoRA: {event.run_dir.name}", event.total_steps)
        elif isinstance(event, Progress):
            self.step, self.last = event.step, event
            self.losses.append((event.step, event.loss))
            if event.val_loss is not None:
                self.val_losses.append((event.step, event.val_loss))
            self.host.progress(event)
            if self.host.interrupted() and not self.stop_request.is_set():
                logger.info("interrupted from the WebUI: stopping and saving at step %d", event.step)
                self.stop(save=True)
        elif isinstance(event, Phase):
            self._set_phase(f"{event.name} {event.done}/{event.total}" if event.total > 1 else event.name)
        elif isinstance(event, SampleSaved):
            self.samples.extend(str(p) for p in event.paths)
            self.host.sample_saved(list(event.paths))
        elif isinstance(event, CheckpointSaved):
            logger.info("checkpoint %d saved", event.step)
        elif isinstance(event, Finished):
            self.lora_path = event.lora_path
        elif isinstance(event, Failed):
            self.error = event.message
