"""The dataset as the loop sees it: records with their buckets, the epoch plan, and the caches.

Scanning happens before any model loads, so a bad dataset fails in a second, not after a
minute of loading. Images are read from disk only here; the dataset folder is never written.
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .backbones.base import TrainSize
from .batches import batches_per_epoch, epoch_batches
from .buckets import assign_bucket, make_buckets, square_bucket
from .captions import build_caption
from .config import TrainConfig
from .dataset import DatasetScan, ImageRecord, scan_dataset
from .dataset_layout import Group, Layout, Subset, balanced_reg_repeats, build_layout, validation_indices
from .disk_cache import DiskCache, file_stamp, fingerprint, image_key
from .distributed import SINGLE, Processes
from .errors import DatasetError
from .images import cover_and_crop, image_to_tensor, load_image
from .masks import find_mask_files, mask_tensor, stack_masks

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
    scan: DatasetScan  # every image of the run: training, regularization and validation ones (``record.role``)
    buckets: List[Size]  # one per record
    plan: TrainPlan
    layout: Optional[Layout] = None  # the folders and their options; None: one folder with the config's options
    plan_repeats: Optional[List[int]] = None  # how often each record is in an epoch (0 for validation images)
    masks: Optional[List[Optional[Tuple[Path, bool]]]] = None  # per record: (mask file or the image, from alpha)

    def bucket_counts(self) -> Dict[str, int]:
        return dict(Counter(f"{w}x{h}" for (w, h), r in zip(self.buckets, self.scan.records) if r.role != "val"))

    def subset(self, index: int) -> Optional[Subset]:
        return self.layout.subsets[self.scan.records[index].source] if self.layout else None

    def group_of(self, index: int) -> int:
        return self.layout.subsets[self.scan.records[index].source].group if self.layout else 0

    def repeats(self) -> List[int]:
        return self.plan_repeats if self.plan_repeats is not None else [r.repeats for r in self.scan.records]

    def indices(self, role: str) -> List[int]:
        return [i for i, r in enumerate(self.scan.records) if r.role == role]

    def loss_weight(self, index: int, prior_loss_weight: float) -> float:
        return prior_loss_weight if self.scan.records[index].role == "reg" else 1.0

    def flips_of(self, index: int, config: TrainConfig) -> Tuple[bool, ...]:
        """The mirror states record ``index`` trains in (validation images only upright)."""
        subset = self.subset(index)
        flip = subset.flip_aug if subset else config.flip_aug
        return (False, True) if flip and self.scan.records[index].role != "val" else (False,)

    def train_size(self, index: int, flip: bool = False) -> TrainSize:
        """Record ``index``'s bucket, with its original size and the crop ``load_pixels`` takes (SDXL's size
        conditioning). A mirrored image's crop is measured from the mirrored image's left edge."""
        record, bucket = self.scan.records[index], self.buckets[index]
        (resized_w, _), (left, top) = cover_and_crop((record.width, record.height), bucket)
        if flip:
            left = resized_w - bucket[0] - left
        return TrainSize(bucket, (record.width, record.height), (top, left))

    def mask(self, index: int, flip: bool) -> Optional[torch.Tensor]:
        source = self.masks[index] if self.masks else None
        if source is None:
            return None
        record = self.scan.records[index]
        return mask_tensor(source[0], source[1], (record.width, record.height), self.buckets[index], flip)


def prepare_data(config: TrainConfig, processes: int = 1) -> PreparedData:
    """Every folder of the run scanned (each image decoded once, so a damaged one is skipped by name), regularization
    images balanced and validation images held out as kohya does, each image bucketed by its group's rules, and the
    step plan for ``processes`` data-parallel processes (each takes ``batch_size`` images of every micro-batch)."""
    layout = build_layout(config)
    scan = _scan_all(layout)
    records = _hold_out_validation(scan.records, layout)
    records = _balance_regularization(records, layout)
    scan.records = records
    buckets = [_bucket(r, layout.groups[layout.subsets[r.source].group]) for r in records]
    repeats = [0 if r.role == "val" else r.repeats for r in records]
    groups = [layout.subsets[r.source].group for r in records]
    batch_sizes = [g.batch_size * processes for g in layout.groups]
    per_epoch = batches_per_epoch(buckets, repeats, batch_sizes, groups)
    accumulation = config.gradient_accumulation_steps
    if config.max_train_steps:
        total = config.max_train_steps
    else:
        total = math.ceil(config.epochs * per_epoch / accumulation)
    plan = TrainPlan(batches_per_epoch=per_epoch, accumulation=accumulation, total_steps=max(1, total),
                     global_batch=batch_sizes[0])
    masks = _mask_sources(scan, layout)
    reg, val = scan.of_role("reg"), len(scan.of_role("val"))
    logger.info("dataset: %d images (%d with repeats)%s%s in %d buckets, %d batches per epoch, %d steps",
                scan.num_images(), scan.num_samples(),
                f", {len(reg)} regularization images ({sum(r.repeats for r in reg)} per epoch)" if reg else "",
                f", {val} validation images" if val else "", len(set(buckets)), per_epoch, plan.total_steps)
    return PreparedData(scan=scan, buckets=buckets, plan=plan, layout=layout, plan_repeats=repeats, masks=masks)


def _scan_all(layout: Layout) -> DatasetScan:
    records: List[ImageRecord] = []
    skipped: list = []
    sources: List[str] = []
    names_used: Dict[str, int] = {}
    for index, subset in enumerate(layout.subsets):
        part = scan_dataset(subset.image_dir, subset.metadata_path, subset.caption_extension, subset.repeats,
                            class_tokens=subset.class_tokens, folder_repeats=subset.folder_repeats, verify=True,
                            what=subset.origin)
        renamed: Dict[str, str] = {}
        for record in part.records:
            name = renamed.get(record.subset)
            if name is None:  # two folders of the same name (kohya's "name (2)")
                count = names_used.get(record.subset, 0) + 1
                names_used[record.subset] = count
                name = renamed[record.subset] = record.subset if count == 1 else f"{record.subset} ({count})"
            records.append(replace(record, subset=name, source=index, role=subset.role))
        skipped += part.skipped
        sources.append(part.caption_source)
    if not any(r.role == "train" for r in records):
        raise DatasetError("no training images: every folder of this run is a regularization or validation folder; "
                           "add a folder of training images")
    return DatasetScan(Path(layout.subsets[0].image_dir).expanduser().resolve(), records, skipped,
                       ", ".join(dict.fromkeys(sources)))


def _hold_out_validation(records: List[ImageRecord], layout: Layout) -> List[ImageRecord]:
    train = [i for i, r in enumerate(records) if r.role == "train"]
    held = set(validation_indices(train, layout.validation_split, layout.validation_seed))
    if layout.validation_split and not held:
        logger.warning("validation_split %g holds out no image: the run has only %d training image(s)",
                       layout.validation_split, len(train))
    return [replace(r, role="val") if i in held else r for i, r in enumerate(records)]


def _balance_regularization(records: List[ImageRecord], layout: Layout) -> List[ImageRecord]:
    out = list(records)
    unused = 0
    for group in range(len(layout.groups)):
        mine = [i for i, r in enumerate(records) if layout.subsets[r.source].group == group]
        train = sum(records[i].repeats for i in mine if records[i].role == "train")
        reg = [i for i in mine if records[i].role == "reg"]
        if reg and not train:
            raise DatasetError(f"dataset {group + 1} has regularization images but no training images; a "
                               "regularization folder belongs with the training folder it balances")
        for i, repeats in zip(reg, balanced_reg_repeats(train, [records[i].repeats for i in reg])):
            out[i] = replace(records[i], repeats=repeats)
            unused += repeats == 0
    if unused:
        logger.info("%d regularization image(s) unused: each epoch takes as many regularization images as training "
                    "images (kohya's rule), in folder order", unused)
    return [r for r in out if not (r.role == "reg" and r.repeats == 0)]


def _bucket(record: ImageRecord, group: Group) -> Size:
    if not group.enable_bucket:
        return square_bucket(group.resolution)
    choices = make_buckets(group.resolution, group.min_bucket_reso, group.max_bucket_reso, group.bucket_reso_steps)
    return assign_bucket(record.width, record.height, choices, group.bucket_no_upscale, group.bucket_reso_steps)


def _mask_sources(scan: DatasetScan, layout: Layout) -> Optional[List[Optional[Tuple[Path, bool]]]]:
    if not any(s.mask for s in layout.subsets):
        return None
    out: List[Optional[Tuple[Path, bool]]] = []
    folders: Dict[int, Dict[Path, Optional[Path]]] = {}
    for record in scan.records:
        subset = layout.subsets[record.source]
        if not subset.mask:
            out.append(None)
        elif subset.mask == "alpha":
            out.append((record.path, True))
        else:
            if record.source not in folders:
                root = Path(subset.image_dir).expanduser().resolve()
                images = [r.path for r in scan.records if r.source == record.source]
                folders[record.source] = find_mask_files(images, root, subset.mask)
            found = folders[record.source][record.path]
            out.append(None if found is None else (found, False))
    return out


class EpochOrder:
    """Which records form micro-batch ``m``; a function of (seed, epoch) only, so resumes agree."""

    def __init__(self, data: PreparedData, batch_size: int, seed: int, processes: int = 1):
        self.data, self.seed = data, seed
        groups = data.layout.groups if data.layout else ()
        self.batch_sizes = [g.batch_size * processes for g in groups] or [batch_size]
        self.groups = [data.group_of(i) for i in range(len(data.scan.records))]
        self._epoch: Optional[int] = None
        self._batches: List[List[int]] = []

    def micro_batch(self, micro_step: int) -> List[int]:
        epoch, position = divmod(micro_step, self.data.plan.batches_per_epoch)
        if epoch != self._epoch:
            self._batches = epoch_batches(self.data.buckets, self.data.repeats(), self.batch_sizes, self.seed, epoch,
                                          self.groups)
            self._epoch = epoch
        return self._batches[position]


def caption_rng(seed: int, micro_step: int) -> random.Random:
    return random.Random(f"{seed}:{micro_step}:caption")


def captions_vary(config: TrainConfig, data: Optional[PreparedData] = None) -> bool:
    """True when a record's caption differs from step to step (then text embeddings are not cached)."""
    subsets = data.layout.subsets if data is not None and data.layout else ()
    if subsets:
        return any(s.shuffle_caption or s.caption_dropout_rate > 0 for s in subsets)
    return config.shuffle_caption or config.caption_dropout_rate > 0


def caption_for(config: TrainConfig, raw: str, rng: random.Random, subset: Optional[Subset] = None) -> str:
    """The prompt of one step for a caption: with the options of the image's folder, else the config's."""
    options = subset if subset is not None else config
    return build_caption(raw, trigger_word=options.trigger_word, prefix=options.caption_prefix,
                         suffix=getattr(options, "caption_suffix", ""), shuffle=options.shuffle_caption,
                         keep_tokens=options.keep_tokens, dropout_rate=options.caption_dropout_rate, rng=rng)


def load_pixels(data: PreparedData, indices: Sequence[int], flips: Sequence[bool]) -> torch.Tensor:
    tensors = []
    for i, flip in zip(indices, flips):
        record = data.scan.records[i]
        try:
            image = load_image(record.path)  # decoded at the scan too; the file may have changed since
        except DatasetError as exc:
            raise DatasetError(f"{exc}; remove or replace this image and start again") from None
        tensors.append(image_to_tensor(image, data.buckets[i], flip=flip))
    return torch.stack(tensors)


MAX_ENCODE_PIXELS = 384 * 384  # pixels per VAE encode batch when caching latents


class LatentCache:
    """Latents (and loss masks) of every record, and of its mirror image where it trains mirrored, encoded once, in
    bucket batches: in memory, or with ``disk`` in files that later runs reuse (memory then stays flat)."""

    def __init__(self, backbone, data: PreparedData, config: TrainConfig, batch_size: int = 4,
                 processes: Processes = SINGLE, disk: Optional[DiskCache] = None):
        self.backbone, self.data, self.disk = backbone, data, disk
        by_bucket: Dict[Size, List[int]] = {}
        for i, bucket in enumerate(data.buckets):
            by_bucket.setdefault(bucket, []).append(i)
        chunks = []
        for (width, height), indices in by_bucket.items():
            # The VAE encoder's activations grow with the pixels: at 512 px and above one image at a time (as kohya),
            # or a batch of 4 would be the run's peak memory.
            size = max(1, min(batch_size, MAX_ENCODE_PIXELS // (width * height)))
            for start in range(0, len(indices), size):
                for flip in (False, True):
                    chunk = [i for i in indices[start:start + size] if flip in data.flips_of(i, config)]
                    if chunk:
                        chunks.append((chunk, flip))
        mine: Dict[Tuple[int, bool], Dict[str, torch.Tensor]] = {}
        self.encoded_here = 0
        for chunk, flip in processes.mine(chunks):  # data-parallel: each process encodes a part, then all share
            todo = [i for i in chunk if disk is None or disk.get(self._key(i, flip)) is None]
            for i, entry in zip(todo, self._encode(todo, flip)):
                if disk is not None:
                    disk.put(self._key(i, flip), entry)
                else:
                    mine[(i, flip)] = entry if not processes.parallel else {k: v.cpu() for k, v in entry.items()}
            self.encoded_here += len(todo)
        shared = processes.gather(mine)  # with a disk cache: nothing to share, but every process waits for the files
        device = backbone.device
        self.entries = {k: {n: v.to(device) for n, v in e.items()} for k, e in shared.items()} \
            if processes.parallel else shared

    def _encode(self, indices: List[int], flip: bool) -> List[Dict[str, torch.Tensor]]:
        if not indices:
            return []
        backbone = self.backbone
        pixels = load_pixels(self.data, indices, [flip] * len(indices))
        with torch.no_grad():
            encoded = backbone.encode_images(pixels.to(backbone.device, _vae_dtype(backbone)))
        out = []
        for i, latent in zip(indices, encoded):
            entry = {"latent": latent.float()}
            mask = self.data.mask(i, flip)
            if mask is not None:
                entry["mask"] = mask.to(latent.device)
            out.append(entry)
        return out

    def _key(self, index: int, flip: bool) -> dict:
        source = self.data.masks[index] if self.data.masks else None
        size = self.data.train_size(index, flip)
        return image_key(self.data.scan.records[index].path, bucket=list(size), crop=list(size.crop_top_left),
                         flip=flip, mask=None if source is None else [file_stamp(source[0]), source[1]])

    def _entry(self, index: int, flip: bool) -> Dict[str, torch.Tensor]:
        if self.disk is None:
            return self.entries[(index, flip)]
        entry = self.disk.get(self._key(index, flip))
        if entry is None:  # removed since the run started: encode it again
            entry = self._encode([index], flip)[0]
            self.disk.put(self._key(index, flip), entry)
        return {k: v.to(self.backbone.device) for k, v in entry.items()}

    def batch_with_masks(self, indices: Sequence[int], flips: Sequence[bool]):
        """(latents, masks or None) of the items."""
        entries = [self._entry(i, f) for i, f in zip(indices, flips)]
        latents = torch.stack([e["latent"] for e in entries])
        return latents, stack_masks([e.get("mask") for e in entries], latents)


def vae_fingerprint(backbone) -> str:
    """What identifies the model's image encoder for the disk cache (see ``disk_cache.fingerprint``)."""
    ramp = torch.linspace(-1, 1, 64)
    probe = torch.stack([ramp[None, :].expand(64, 64), ramp[:, None].expand(64, 64), ramp.flip(0)[None, :]
                         .expand(64, 64)])[None]
    return fingerprint(lambda: backbone.encode_images(probe.to(backbone.device, _vae_dtype(backbone))))


def _vae_dtype(backbone) -> torch.dtype:
    return getattr(backbone, "vae_dtype", backbone.dtype)
