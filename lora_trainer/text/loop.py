"""The text-generation training loop. Like ``trainer.py`` it reads top to bottom: set up, (resume),
loop, checkpoint, finish; it uses the same checkpoints, optimizer, schedule, run folder and events.

A resumed run ends bit-identical to an uninterrupted one on the CPU: the batch order is a function
of (seed, epoch) (``batches.epoch_batches``), dropout is seeded from (seed, micro-step), and a
checkpoint holds the LoRA weights, optimizer, scheduler and step.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import List, Optional

import torch

from ..batches import batches_per_epoch, epoch_batches
from ..config import TrainConfig
from ..events import EventBus, Finished, Started, StopRequest
from ..loop_base import LoopBase
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


class TextLoop(LoopBase):
    def __init__(self, config: TrainConfig, model, tokenizer, data: TokenizedData, run: RunFolder,
                 events: EventBus, stop: StopRequest):
        super().__init__(config, plan_steps(config, len(data.sequences)), run, events, stop)
        self.model, self.tokenizer, self.data = model, tokenizer, data
        self.device = next(model.parameters()).device
        self.pad_id = pad_token_id(tokenizer)
        self.order = SequenceOrder(len(data.sequences), config.batch_size, config.seed, self.plan)
        self.params = lora_parameters(model)
        self.optimizer = build_optimizer(self.params.values(), config.optimizer, config.learning_rate,
                                         config.weight_decay)
        self.scheduler = build_lr_scheduler(self.optimizer, config.lr_scheduler, config.lr_warmup_steps,
                                            self.plan.total_steps, config.lr_scheduler_num_cycles)

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

    def _micro_step(self, micro_step: int) -> float:
        batch = collate([self.data.sequences[i] for i in self.order.micro_batch(micro_step)], self.pad_id)
        # Dropout inside the base model draws from the global RNG: seed it per micro-step, so a resumed
        # run draws exactly what the uninterrupted one did, and leave the caller's RNG as it was.
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.config.seed * 1_000_003 + micro_step)
            loss = self._loss(batch)
            self._check_finite(loss, micro_step)
            (loss / self.plan.accumulation).backward()
        return float(loss.detach())

    def _loss(self, batch: dict) -> torch.Tensor:
        autocast = AUTOCAST.get(self.config.mixed_precision)
        with torch.autocast(device_type=self.device.type, dtype=autocast or torch.float32,
                            enabled=autocast is not None):
            logits = self.model(input_ids=batch["input_ids"].to(self.device),
                                attention_mask=batch["attention_mask"].to(self.device), use_cache=False).logits
        return causal_lm_loss(logits, batch["labels"])

    def _trainable(self):
        return self.params

    def _write_checkpoint_files(self, folder: Path, step: int) -> None:
        save_adapter(self.model, folder / self.run_folder.name)

    def _finish(self, step: int) -> Path:
        self._ensure_final_checkpoint(step)
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
