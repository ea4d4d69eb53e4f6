"""What every training loop does the same way: step, optimize, report, checkpoint, resume, stop.

The image loop (``trainer.py``) and the text-generation loop (``text/loop.py``) differ only in how a
micro-batch's loss is computed and what a checkpoint's files are; they implement ``_micro_step``,
``_trainable`` and ``_write_checkpoint_files`` and inherit the rest.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from pathlib import Path
from typing import Dict, Optional

import torch

from . import checkpoints
from .config import TrainConfig
from .distributed import SINGLE, PeerStopped, Processes
from .errors import TrainingError
from .events import CheckpointSaved, EventBus, Progress, StopRequest
from .run_folder import RunFolder
from .tensorboard_log import TensorBoardLog
from .training_data import TrainPlan

logger = logging.getLogger("lora_trainer")


class LoopBase:
    STATE_KEY = "lora"  # where a checkpoint keeps the trainable parameters

    def __init__(self, config: TrainConfig, plan: TrainPlan, run: RunFolder, events: EventBus, stop: StopRequest,
                 processes: Processes = SINGLE):
        self.config, self.plan, self.run_folder, self.events, self.stop = config, plan, run, events, stop
        self.processes = processes  # data-parallel: gradients summed over processes; only the main one writes
        self.optimizer: torch.optim.Optimizer
        self.scheduler: torch.optim.lr_scheduler.LambdaLR
        self.losses: deque = deque(maxlen=50)
        self.step_times: deque = deque(maxlen=20)
        self.tensorboard: Optional[TensorBoardLog] = None  # log_with: tensorboard, in the main process

    # -- what a loop provides --------------------------------------------------------------------
    def _micro_step(self, micro_step: int) -> float:
        """Forward and backward of micro-batch ``micro_step``; returns its loss."""
        raise NotImplementedError

    def _trainable(self) -> Dict[str, torch.nn.Parameter]:
        raise NotImplementedError

    def _write_checkpoint_files(self, folder: Path, step: int) -> None:
        """The usable LoRA/adapter files of a checkpoint, beside its training state."""
        raise NotImplementedError

    def _after_step(self, step: int) -> None:
        """Periodic work after an optimizer step (samples); nothing by default."""

    def _step_metrics(self, step: int) -> Dict[str, float]:
        """Extra numbers for step ``step``'s metrics row (the image loop's validation loss); none by default."""
        return {}

    # -- the loop --------------------------------------------------------------------------------
    def _train_steps(self, start_step: int) -> int:
        if self.processes.is_main:
            self.tensorboard = TensorBoardLog.open(self.config, self.run_folder.path, self.run_folder.name, start_step)
        try:
            return self._steps(start_step)
        except PeerStopped as exc:  # data-parallel: say where to resume from
            last = checkpoints.latest_checkpoint(self.run_folder.path)
            raise PeerStopped(f"{exc}; the last checkpoint is {last.name if last else 'none yet'}: resume with "
                              f"--resume {self.run_folder.path} (with the same number of processes for a "
                              "bit-identical result)") from None
        finally:
            if self.tensorboard is not None:
                self.tensorboard.close()

    def _steps(self, start_step: int) -> int:
        step, started, accum = start_step, time.perf_counter(), self.plan.accumulation
        while step < self.plan.total_steps:
            if self.stop.is_set():
                logger.info("stop requested at step %d", step)
                break
            t0 = time.perf_counter()
            loss = sum(self._micro_step(step * accum + k) for k in range(accum)) / accum
            loss = self.processes.sum(loss, torch.device("cpu"))  # the whole micro-batches' mean, as one process
            self._optimizer_step(step)
            step += 1
            self.step_times.append(time.perf_counter() - t0)
            self._report(step, loss, time.perf_counter() - started)
            if (self.processes.is_main and self.config.save_steps and step % self.config.save_steps == 0
                    and step < self.plan.total_steps):
                self._save_checkpoint(step)
            self._after_step(step)
        return step

    def _check_finite(self, loss: torch.Tensor, micro_step: int) -> None:
        if not torch.isfinite(loss):
            raise TrainingError(self._diverged_message(micro_step // self.plan.accumulation + 1,
                                                       float(loss.detach())))

    def _optimizer_step(self, step: int) -> None:
        self.processes.reduce_gradients(self._trainable().values())
        if self.config.max_grad_norm:
            params = [p for p in self._trainable().values() if p.requires_grad]
            norm = torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
            if not torch.isfinite(norm):
                raise TrainingError(self._diverged_message(step + 1, float(norm), what="gradient norm"))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _diverged_message(self, step: int, value: float, what: str = "loss") -> str:
        last = checkpoints.latest_checkpoint(self.run_folder.path)
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        return (f"the {what} became {value} at step {step}; training stopped and {kept}. Lower learning_rate, "
                "or use mixed_precision: bf16 or no")

    def _report(self, step: int, loss: float, elapsed: float) -> None:
        self.losses.append(loss)
        seconds_per_step = sum(self.step_times) / len(self.step_times)
        lr = self.scheduler.get_last_lr()[0]
        extra = self._step_metrics(step)
        event = Progress(step=step, total_steps=self.plan.total_steps, epoch=self.plan.epoch_of_step(step),
                         loss=loss, avg_loss=sum(self.losses) / len(self.losses), lr=lr,
                         it_per_s=1.0 / seconds_per_step if seconds_per_step else 0.0,
                         eta_s=seconds_per_step * (self.plan.total_steps - step), elapsed_s=elapsed,
                         val_loss=extra.get("val_loss"))
        if self.processes.is_main:
            val = "" if event.val_loss is None else f"{event.val_loss:.6f}"
            self.run_folder.append_metrics([{
                "step": step, "epoch": event.epoch, "loss": f"{loss:.6f}", "avg_loss": f"{event.avg_loss:.6f}",
                "lr": f"{lr:.3e}", "it_per_s": f"{event.it_per_s:.3f}", "seconds": f"{elapsed:.2f}", "val_loss": val}])
            if self.tensorboard is not None:
                self.tensorboard.scalars(step, {"loss/train": loss, "loss/average": event.avg_loss, "lr": lr,
                                           "loss/validation": event.val_loss})
        self.events.emit(event)

    # -- checkpoints -----------------------------------------------------------------------------
    def _save_checkpoint(self, step: int) -> Path:
        state = {
            "step": step,
            self.STATE_KEY: {name: p.detach().cpu().clone() for name, p in self._trainable().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "recent_losses": list(self.losses),
            "processes": self.processes.world,
        }
        folder = checkpoints.save_checkpoint(self.run_folder.path, step, state,
                                             lambda tmp: self._write_checkpoint_files(tmp, step))
        checkpoints.prune_checkpoints(self.run_folder.path, self.config.keep_checkpoints)
        logger.info("checkpoint saved: %s", folder)
        self.events.emit(CheckpointSaved(step, folder))
        return folder

    def _ensure_final_checkpoint(self, step: int) -> None:
        """A checkpoint at the last step, so "extend" can continue the run later."""
        if not checkpoints.checkpoint_dir(self.run_folder.path, step).is_dir():
            self._save_checkpoint(step)

    def _resume(self) -> int:
        folder = checkpoints.latest_checkpoint(self.run_folder.path)
        if folder is None:
            raise TrainingError(f"{self.run_folder.path}: no checkpoint to resume from "
                                "(set save_steps to write checkpoints during training)")
        state = checkpoints.load_checkpoint_state(folder)
        params = self._trainable()
        saved = state.get(self.STATE_KEY, {})
        if set(saved) != set(params):
            raise TrainingError(f"{folder}: the checkpoint's LoRA layers do not match this model and config; "
                                "resume with the run's own config.yaml and base model")
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.losses.extend(state.get("recent_losses", []))
        step = int(state["step"])
        began_on = int(state.get("processes", 1))
        if began_on != self.processes.world:
            logger.warning("this run's checkpoint was written by %d process(es) and resumes on %d: each step's batch "
                           "is split differently, so the result will not be bit-identical to an uninterrupted run",
                           began_on, self.processes.world)
        # Only now that the checkpoint has loaded: an extend raises max_train_steps, and a later resume must see
        # the new total, but a failed extend or resume leaves the run's config.yaml and metrics as they were.
        if self.processes.is_main:
            self.run_folder.save_config(self.config)
            self.run_folder.truncate_metrics(step)
        logger.info("resuming %s from step %d (%s)", self.run_folder.name, step, folder.name)
        return step
