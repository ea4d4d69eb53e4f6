"""The dataset as the loop sees it: records with their buckets, the epoch plan, and the caches.

Scanning happens before any model loads, so a bad dataset fails in a second, not after a
minute of loading. Images are read from disk only here; the dataset folder is never written.
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .backbones.base import TrainSize
from .batches import batches_per_epoch, epoch_batches
from .buckets import assign_bucket, make_buckets, square_bucket
from .captions import build_caption
from .config import TrainConfig
from .dataset import DatasetScan, scan_dataset
from .distributed import SINGLE, Processes
from .errors import DatasetError
from .images import cover_and_crop, image_to_tensor, load_image

logger = logging.getLogger("lora_trainer")

Size = Tuple[int, int]


@dataclass(frozen=True)
class TrainPlan:
    """Numbers derived from the config and the data; never written back into the config."""
    batches_per_epoch: int
    accumulation: int
    total_steps: int  # optimizer steps
    global_batch: int = 1  # images in one micro-batch over all processes (batch_size x processes)

    @property
    def steps_per_epoch(self) -> float:
        return self.batches_per_epoch / self.accumulation

    def epoch_of_step(self, step: int) -> int:
        """1-based epoch in which optimizer step ``step`` (1-based) happens."""
        return (max(step, 1) * self.accumulation - 1) // self.batches_per_epoch + 1

    def num_epochs(self) -> int:
        return self.epoch_of_step(self.total_steps)


@dataclass
class PreparedData:
    scan: DatasetScan
    buckets: List[Size]  # one per record
    plan: TrainPlan

    def bucket_counts(self) -> Dict[str, int]:
        return dict(Counter(f"{w}x{h}" for w, h in self.buckets))

    def train_size(self, index: int, flip: bool = False) -> TrainSize:
        """Record ``index``'s bucket, with its original size and the crop ``load_pixels`` takes (SDXL's size
        conditioning). A mirrored image's crop is measured from the mirrored image's left edge."""
        record, bucket = self.scan.records[index], self.buckets[index]
        (resized_w, _), (left, top) = cover_and_crop((record.width, record.height), bucket)
        if flip:
            left = resized_w - bucket[0] - left
        return TrainSize(bucket, (record.width, record.height), (top, left))


def prepare_data(config: TrainConfig, processes: int = 1) -> PreparedData:
    """The dataset scanned and bucketed, and the step plan for ``processes`` data-parallel processes (each takes
    ``batch_size`` images of every micro-batch)."""
    scan = scan_dataset(config.train_data_dir, config.metadata_path, config.caption_extension, config.repeats)
    if config.enable_bucket:
        choices = make_buckets(config.resolution, config.min_bucket_reso, config.max_bucket_reso,
                               config.bucket_reso_steps)
        buckets = [assign_bucket(r.width, r.height, choices, config.bucket_no_upscale, config.bucket_reso_steps)
                   for r in scan.records]
    else:
        buckets = [square_bucket(config.resolution)] * len(scan.records)
    repeats = [r.repeats for r in scan.records]
    global_batch = config.batch_size * processes
    per_epoch = batches_per_epoch(buckets, repeats, global_batch)
    accumulation = config.gradient_accumulation_steps
    if config.max_train_steps:
        total = config.max_train_steps
    else:
        total = math.ceil(config.epochs * per_epoch / accumulation)
    plan = TrainPlan(batches_per_epoch=per_epoch, accumulation=accumulation, total_steps=max(1, total),
                     global_batch=global_batch)
    logger.info("dataset: %d images (%d with repeats) in %d buckets, %d batches per epoch, %d steps",
                scan.num_images(), scan.num_samples(), len(set(buckets)), per_epoch, plan.total_steps)
    return PreparedData(scan=scan, buckets=buckets, plan=plan)


class EpochOrder:
    """Which records form micro-batch ``m``; a function of (seed, epoch) only, so resumes agree."""

    def __init__(self, data: PreparedData, batch_size: int, seed: int):
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self._epoch: Optional[int] = None
        self._batches: List[List[int]] = []

    def micro_batch(self, micro_step: int) -> List[int]:
        epoch, position = divmod(micro_step, self.data.plan.batches_per_epoch)
        if epoch != self._epoch:
            repeats = [r.repeats for r in self.data.scan.records]
            self._batches = epoch_batches(self.data.buckets, repeats, self.batch_size, self.seed, epoch)
            self._epoch = epoch
        return self._batches[position]


def caption_rng(seed: int, micro_step: int) -> random.Random:
    return random.Random(f"{seed}:{micro_step}:caption")


def captions_vary(config: TrainConfig) -> bool:
    """True when a record's caption differs from step to step (then text embeddings are not cached)."""
    return config.shuffle_caption or config.caption_dropout_rate > 0


def caption_for(config: TrainConfig, raw: str, rng: random.Random) -> str:
    return build_caption(raw, trigger_word=config.trigger_word, prefix=config.caption_prefix,
                         shuffle=config.shuffle_caption, keep_tokens=config.keep_tokens,
                         dropout_rate=config.caption_dropout_rate, rng=rng)


def load_pixels(data: PreparedData, indices: Sequence[int], flips: Sequence[bool]) -> torch.Tensor:
    tensors = []
    for i, flip in zip(indices, flips):
        record = data.scan.records[i]
        try:
            image = load_image(record.path)  # the scan read only its header; a damaged body shows up here
        except DatasetError as exc:
            raise DatasetError(f"{exc}; remove or replace this image and start again") from None
        tensors.append(image_to_tensor(image, data.buckets[i], flip=flip))
    return torch.stack(tensors)


class LatentCache:
    """Latents of every record (and its mirror image with flip_aug), encoded once, in bucket batches."""

    def __init__(self, backbone, data: PreparedData, flip_aug: bool, batch_size: int = 4,
                 processes: Processes = SINGLE):
        flips = (False, True) if flip_aug else (False,)
        by_bucket: Dict[Size, List[int]] = {}
        for i, bucket in enumerate(data.buckets):
            by_bucket.setdefault(bucket, []).append(i)
        chunks = [(indices[start:start + batch_size], flip) for indices in by_bucket.values()
                  for start in range(0, len(indices), batch_size) for flip in flips]
        mine: Dict[Tuple[int, bool], torch.Tensor] = {}
        for chunk, flip in processes.mine(chunks):  # data-parallel: each process encodes a part, then all share
            pixels = load_pixels(data, chunk, [flip] * len(chunk))
            with torch.no_grad():
                encoded = backbone.encode_images(pixels.to(backbone.device, _vae_dtype(backbone)))
            for i, latent in zip(chunk, encoded):
                mine[(i, flip)] = latent.float() if not processes.parallel else latent.float().cpu()
        self.encoded_here = len(mine)
        shared = processes.gather(mine)
        self.latents = shared if not processes.parallel else {k: v.to(backbone.device) for k, v in shared.items()}

    def batch(self, indices: Sequence[int], flips: Sequence[bool]) -> torch.Tensor:
        return torch.stack([self.latents[(i, f)] for i, f in zip(indices, flips)])


def _vae_dtype(backbone) -> torch.dtype:
    return getattr(backbone, "vae_dtype", backbone.dtype)
