"""The text-generation training loop. Like ``trainer.py`` it reads top to bottom: set up, (resume),
loop, checkpoint, finish; it uses the same checkpoints, optimizer, schedule, run folder and events.

A resumed run ends bit-identical to an uninterrupted one on the CPU: the batch order is a function
of (seed, epoch) (``batches.epoch_batches``), dropout is seeded from (seed, micro-step), and a
checkpoint holds the LoRA weights, optimizer, scheduler and step.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from pathlib import Path
from typing import List, Optional

import torch

from .. import checkpoints
from ..batches import batches_per_epoch, epoch_batches
from ..config import TrainConfig
from ..errors import TrainingError
from ..events import CheckpointSaved, EventBus, Finished, Progress, Started, StopRequest
from ..optim import build_lr_scheduler, build_optimizer
from ..run_folder import RunFolder
from ..trainer import AUTOCAST, TrainResult
from ..training_data import TrainPlan
from .model import lora_parameters, pad_token_id, save_adapter
from .sequences import TokenizedData, causal_lm_loss, collate

logger = logging.getLogger("lora_trainer")


def plan_steps(config: TrainConfig, num_sequences: int) -> TrainPlan:
    per_epoch = batches_per_epoch([(0, 0)] * num_sequences, [1] * num_sequences, config.batch_size)
    accumulation = config.gradient_accumulation_steps
    total = config.max_train_steps or math.ceil(config.epochs * per_epoch / accumulation)
    return TrainPlan(batches_per_epoch=per_epoch, accumulation=accumulation, total_steps=max(1, total))


class SequenceOrder:
    """Which sequences form micro-batch ``m``: a shuffle per (seed, epoch), so resumes see the same batches."""

    def __init__(self, num_sequences: int, batch_size: int, seed: int, plan: TrainPlan):
        self.num_sequences, self.batch_size, self.seed, self.plan = num_sequences, batch_size, seed, plan
        self._epoch: Optional[int] = None
        self._batches: List[List[int]] = []

    def micro_batch(self, micro_step: int) -> List[int]:
        epoch, position = divmod(micro_step, self.plan.batches_per_epoch)
        if epoch != self._epoch:
            self._batches = epoch_batches([(0, 0)] * self.num_sequences, [1] * self.num_sequences,
                                          self.batch_size, self.seed, epoch)
            self._epoch = epoch
        return self._batches[position]


class TextLoop:
    def __init__(self, config: TrainConfig, model, tokenizer, data: TokenizedData, run: RunFolder,
                 events: EventBus, stop: StopRequest):
        self.config, self.model, self.tokenizer, self.data = config, model, tokenizer, data
        self.run_folder, self.events, self.stop = run, events, stop
        self.device = next(model.parameters()).device
        self.pad_id = pad_token_id(tokenizer)
        self.plan = plan_steps(config, len(data.sequences))
        self.order = SequenceOrder(len(data.sequences), config.batch_size, config.seed, self.plan)
        self.params = lora_parameters(model)
        self.optimizer = build_optimizer(self.params.values(), config.optimizer, config.learning_rate,
                                         config.weight_decay)
        self.scheduler = build_lr_scheduler(self.optimizer, config.lr_scheduler, config.lr_warmup_steps,
                                            self.plan.total_steps, config.lr_scheduler_num_cycles)
        self.losses: deque = deque(maxlen=50)
        self.step_times: deque = deque(maxlen=20)

    @property
    def adapter_dir(self) -> Path:
        """The final adapter: a folder text-generation-webui's ``loras/`` takes as it is."""
        return self.run_folder.path / self.run_folder.name

    # -- phases ----------------------------------------------------------------------------------
    def run(self, resume: bool) -> TrainResult:
        start_step = self._resume() if resume else 0
        loss_before = self.fixed_batch_loss(adapter=False)
        self.events.emit(Started(self.run_folder.path, self.plan.total_steps, start_step, len(self.data.sequences)))
        self.model.train()
        step = self._train_steps(start_step)
        stopped = step < self.plan.total_steps
        if stopped and not self.stop.save:
            self.run_folder.write_chart()
            self.events.emit(Finished(self.run_folder.path, None, step, stopped=True))
            return TrainResult(self.run_folder.path, None, step, True, loss_before, None)
        loss_after = self.fixed_batch_loss(adapter=True)
        adapter = self._finish(step)
        logger.info("fixed-batch loss without the LoRA %.5f, with it %.5f", loss_before, loss_after)
        self.events.emit(Finished(self.run_folder.path, adapter, step, stopped=stopped))
        return TrainResult(self.run_folder.path, adapter, step, stopped, loss_before, loss_after)

    def _resume(self) -> int:
        folder = checkpoints.latest_checkpoint(self.run_folder.path)
        if folder is None:
            raise TrainingError(f"{self.run_folder.path}: no checkpoint to resume from "
                                "(set save_steps to write checkpoints during training)")
        state = checkpoints.load_checkpoint_state(folder)
        if set(state.get("lora", {})) != set(self.params):
            raise TrainingError(f"{folder}: the checkpoint's LoRA layers do not match this model and config; "
                                "resume with the run's own config.yaml and base model")
        with torch.no_grad():
            for name, value in state["lora"].items():
                self.params[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.losses.extend(state.get("recent_losses", []))
        step = int(state["step"])
        self.run_folder.truncate_metrics(step)
        logger.info("resuming %s from step %d (%s)", self.run_folder.name, step, folder.name)
        return step

    def _train_steps(self, start_step: int) -> int:
        step, started, accum = start_step, time.perf_counter(), self.plan.accumulation
        while step < self.plan.total_steps:
            if self.stop.is_set():
                logger.info("stop requested at step %d", step)
                break
            t0 = time.perf_counter()
            loss = sum(self._micro_step(step * accum + k) for k in range(accum)) / accum
            self._optimizer_step(step)
            step += 1
            self.step_times.append(time.perf_counter() - t0)
            self._report(step, loss, time.perf_counter() - started)
            if self.config.save_steps and step % self.config.save_steps == 0 and step < self.plan.total_steps:
                self._save_checkpoint(step)
        return step

    def _micro_step(self, micro_step: int) -> float:
        batch = collate([self.data.sequences[i] for i in self.order.micro_batch(micro_step)], self.pad_id)
        # Dropout inside the base model draws from the global RNG: seed it per micro-step, so a resumed
        # run draws exactly what the uninterrupted one did, and leave the caller's RNG as it was.
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.config.seed * 1_000_003 + micro_step)
            loss = self._loss(batch)
            if not torch.isfinite(loss):
                raise TrainingError(self._diverged_message(micro_step // self.plan.accumulation + 1, float(loss)))
            (loss / self.plan.accumulation).backward()
        return float(loss.detach())

    def _loss(self, batch: dict) -> torch.Tensor:
        autocast = AUTOCAST.get(self.config.mixed_precision)
        with torch.autocast(device_type=self.device.type, dtype=autocast or torch.float32,
                            enabled=autocast is not None):
            logits = self.model(input_ids=batch["input_ids"].to(self.device),
                                attention_mask=batch["attention_mask"].to(self.device), use_cache=False).logits
        return causal_lm_loss(logits, batch["labels"])

    def _optimizer_step(self, step: int) -> None:
        if self.config.max_grad_norm:
            norm = torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.config.max_grad_norm)
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
        event = Progress(step=step, total_steps=self.plan.total_steps, epoch=self.plan.epoch_of_step(step),
                         loss=loss, avg_loss=sum(self.losses) / len(self.losses), lr=lr,
                         it_per_s=1.0 / seconds_per_step if seconds_per_step else 0.0,
                         eta_s=seconds_per_step * (self.plan.total_steps - step), elapsed_s=elapsed)
        self.run_folder.append_metrics([{
            "step": step, "epoch": event.epoch, "loss": f"{loss:.6f}", "avg_loss": f"{event.avg_loss:.6f}",
            "lr": f"{lr:.3e}", "it_per_s": f"{event.it_per_s:.3f}", "seconds": f"{elapsed:.2f}"}])
        self.events.emit(event)

    # -- saving ----------------------------------------------------------------------------------
    def _save_checkpoint(self, step: int) -> Path:
        state = {
            "step": step,
            "lora": {name: p.detach().cpu().clone() for name, p in self.params.items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "recent_losses": list(self.losses),
        }
        name = self.run_folder.name
        folder = checkpoints.save_checkpoint(self.run_folder.path, step, state,
                                             lambda tmp: save_adapter(self.model, tmp / name))
        checkpoints.prune_checkpoints(self.run_folder.path, self.config.keep_checkpoints)
        logger.info("checkpoint saved: %s", folder)
        self.events.emit(CheckpointSaved(step, folder))
        return folder

    def _finish(self, step: int) -> Path:
        if not checkpoints.checkpoint_dir(self.run_folder.path, step).is_dir():
            self._save_checkpoint(step)  # lets a later run continue from here
        save_adapter(self.model, self.adapter_dir)
        self.run_folder.write_chart()
        logger.info("saved the adapter: %s (copy this folder into text-generation-webui's loras/)", self.adapter_dir)
        return self.adapter_dir

    # -- evaluation ------------------------------------------------------------------------------
    def fixed_batch_loss(self, adapter: bool, max_items: int = 8) -> float:
        """Mean loss over the first sequences, with or without the LoRA, to show what training changed."""
        sequences = self.data.sequences[:max_items]
        was_training = self.model.training
        self.model.eval()
        total = 0.0
        try:
            with torch.no_grad():
                for start in range(0, len(sequences), self.config.batch_size):
                    batch = collate(sequences[start:start + self.config.batch_size], self.pad_id)
                    if adapter:
                        loss = self._loss(batch)
                    else:
                        with self.model.disable_adapter():
                            loss = self._loss(batch)
                    total += float(loss) * len(batch["input_ids"])
        finally:
            self.model.train(was_training)
        return total / len(sequences)
