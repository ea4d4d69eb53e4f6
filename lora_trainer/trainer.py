"""The training loop. It reads top to bottom: set up, (resume), loop, checkpoint, sample, finish.

It talks to the model only through the backbone protocol, so the same loop trains a checkpoint
loaded from disk, a tiny test model or the WebUI's live model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from .backbones.base import Backbone, TrainSize
from .config import TrainConfig
from .diffusion import (
    add_noise,
    debiased_weights,
    diffusion_loss,
    huber_threshold,
    min_snr_weights,
    noise_generator,
    perturbed,
    sample_noise,
    sample_timesteps,
    training_target,
    zero_terminal_snr,
)
from .disk_cache import DiskCache, fingerprint
from .distributed import SINGLE, Processes
from .events import EventBus, Finished, Phase, SampleSaved, Started, StopRequest
from .files import write_atomic
from .loop_base import LoopBase
from .lora_check import check_trained_lora, check_weights
from .lora_file import read_lora_file, save_lora_file
from .masks import stack_masks
from .metadata import RunFacts, lora_metadata, new_session_id, sidecar_json
from .network import LoraNetwork
from .optim import build_lr_scheduler, build_optimizer
from .run_folder import RunFolder
from .training_data import (
    EpochOrder,
    LatentCache,
    PreparedData,
    caption_for,
    caption_rng,
    captions_vary,
    load_pixels,
    vae_fingerprint,
)

logger = logging.getLogger("lora_trainer")

AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class TrainResult:
    run_dir: Path
    lora_path: Optional[Path]
    steps: int
    stopped: bool
    loss_before: Optional[float] = None  # on a fixed evaluation batch, LoRA at weight 0
    loss_after: Optional[float] = None  # the same batch, LoRA at weight 1


CONV_NETWORKS = ("locon", "loha", "lokr")  # the network types that also adapt the conv layers
# final_check -> (images, timesteps) of the fixed batch, each run without and with the LoRA
CHECK_BATCH = {"quick": (2, (250, 750)), "full": (4, (100, 400, 700, 900))}
# quick sizes itself to the run: a sample through the UNet without backward costs about a third of a batch-1 step,
# so n samples with and without the LoRA cost ~2n/3 steps; n = 3% of the images trained keeps that near 2% of the
# training time (at most the 4 of the grid; a run too short to pay for one sample gets the weights check only).
QUICK_CHECK_SHARE = 0.03


def _datasets_metadata(data: PreparedData) -> Optional[list]:
    """kohya's ``ss_datasets``: each dataset group with its subsets (only for runs of several folders)."""
    layout = data.layout
    if layout is None or len(layout.subsets) == 1:
        return None
    out = []
    for g, group in enumerate(layout.groups):
        subsets = []
        for index, subset in enumerate(layout.subsets):
            if subset.group != g:
                continue
            records = [r for r in data.scan.records if r.source == index]
            subsets.append({"image_dir": Path(subset.image_dir).name, "img_count": len(records),
                            "num_repeats": subset.repeats, "is_reg": subset.role == "reg",
                            "is_validation": subset.role == "val", "class_tokens": subset.class_tokens or None,
                            "flip_aug": subset.flip_aug, "shuffle_caption": subset.shuffle_caption,
                            "keep_tokens": subset.keep_tokens, "caption_prefix": subset.caption_prefix or None,
                            "caption_suffix": subset.caption_suffix or None, "alpha_mask": subset.mask == "alpha"})
        out.append({"is_dreambooth": True, "batch_size_per_device": group.batch_size,
                    "resolution": [group.resolution, group.resolution], "enable_bucket": group.enable_bucket,
                    "min_bucket_reso": group.min_bucket_reso, "max_bucket_reso": group.max_bucket_reso,
                    "num_train_images": sum(r.repeats for r in data.scan.records
                                            if r.role == "train" and layout.subsets[r.source].group == g),
                    "num_reg_images": sum(1 for r in data.scan.records
                                          if r.role == "reg" and layout.subsets[r.source].group == g),
                    "subsets": subsets})
    return out


def build_network(config: TrainConfig, backbone: Backbone) -> LoraNetwork:
    targets = backbone.lora_targets(conv=config.network in CONV_NETWORKS, text_encoder=config.train_text_encoder)
    network = LoraNetwork(targets, config.lora_rank, config.lora_alpha, config.conv_rank, config.conv_alpha,
                          seed=config.seed, algorithm=config.network, lokr_factor=config.lokr_factor,
                          dropouts=(config.network_dropout, config.rank_dropout, config.module_dropout))
    if config.init_lora:
        tensors, _ = read_lora_file(Path(config.init_lora))
        network.load_kohya_state_dict(tensors, source=config.init_lora)
        logger.info("starting from the weights of %s", config.init_lora)
    # Dropout only inside a training micro-step (``_Loop.dropout_active``); samples and checks see every layer.
    return network.to(backbone.device, torch.float32).eval()


def train(config: TrainConfig, backbone: Backbone, data: PreparedData, run: RunFolder,
          events: Optional[EventBus] = None, stop: Optional[StopRequest] = None,
          resume: bool = False, processes: Processes = SINGLE) -> TrainResult:
    """Train a LoRA on ``backbone`` and write it into ``run``; the base model is given back untouched."""
    layout = data.layout
    if layout is not None and layout.from_kohya_config and layout.groups[0].resolution != config.resolution:
        # kohya's dataset config wins over the run's resolution: samples, checks and metadata use its first dataset's
        config = config.replace(resolution=layout.groups[0].resolution)
    with backbone.borrow(gradient_checkpointing=config.gradient_checkpointing):
        network = build_network(config, backbone)
        with network.attached_to_model():
            loop = _Loop(config, backbone, data, run, network, events or EventBus(), stop or StopRequest(),
                         processes)
            return loop.run(resume)


class _TextConditioning:
    """Text conditioning per caption (SDXL: per caption and size): computed once when neither the captions nor the
    text encoder change, else every step; with a text-encoder LoRA training, with gradients."""

    def __init__(self, backbone: Backbone, cache: bool, grad: bool = False, processes: Processes = SINGLE,
                 disk: Optional[DiskCache] = None):
        self.backbone, self.cache, self.grad, self.processes = backbone, cache, grad, processes
        self.by_size = getattr(backbone, "family", "") == "sdxl"  # SDXL's time ids depend on each image's size
        self.store: Dict[tuple, object] = {}
        self.disk = disk if cache else None  # with a disk cache, ``store`` only records which keys are on disk

    def _key(self, caption: str, size: Tuple[int, int]) -> tuple:
        if not self.by_size:
            return (caption,)
        return caption, (size.key() if isinstance(size, TrainSize) else tuple(size))

    def fill(self, pairs: Sequence[Tuple[str, Tuple[int, int]]], chunk: int = 16) -> None:
        todo: Dict[tuple, Tuple[str, Tuple[int, int]]] = {}
        for caption, size in pairs:
            key = self._key(caption, size)
            if key in self.store:
                continue
            if self.disk is not None and self.disk.path({"text": repr(key)}).is_file():
                self.store[key] = None  # on disk already (an earlier run)
                continue
            todo.setdefault(key, (caption, size))
        items = sorted(todo.items(), key=lambda item: repr(item[0]))
        parts = [items[start:start + chunk] for start in range(0, len(items), chunk)]
        mine: Dict[tuple, object] = {}
        for part in self.processes.mine(parts):  # data-parallel: each process encodes a part, then all share
            with torch.no_grad():
                encoded = self.backbone.encode_prompts([c for _, (c, _) in part], [s for _, (_, s) in part])
            for j, (key, _) in enumerate(part):
                mine[key] = _select(encoded, j)
                if self.disk is not None:
                    self.disk.put({"text": repr(key)}, _as_tensors(mine[key]))
                    mine[key] = None
        if self.processes.parallel and self.disk is not None:
            mine = {k: None for k in self.processes.gather(mine)}  # the files are written: everyone may read them
        elif self.processes.parallel:
            device = self.backbone.device
            shared = self.processes.gather({k: _to(v, torch.device("cpu")) for k, v in mine.items()})
            mine = {k: _to(v, device) for k, v in shared.items()}
        self.store.update(mine)

    def _stored(self, key: tuple):
        if key not in self.store:
            return None
        if self.disk is None:
            return self.store[key]
        tensors = self.disk.get({"text": repr(key)})
        if tensors is None:  # removed since it was written: encode it again
            self.store.pop(key)
            self.fill([(key[0], TrainSize(*key[1]) if len(key) > 1 else (64, 64))])
            tensors = self.disk.get({"text": repr(key)})
        return _from_tensors(tensors, self.backbone.device)

    def cached(self, caption: str, size: Tuple[int, int]):
        """A one-item batch of a caption's stored conditioning, or None when it is not stored."""
        item = self._stored(self._key(caption, size)) if self.cache else None
        return None if item is None else _stack([item])

    def batch(self, captions: Sequence[str], sizes: Sequence[Tuple[int, int]]):
        if not self.cache:
            with torch.set_grad_enabled(self.grad and torch.is_grad_enabled()):
                return self.backbone.encode_prompts(list(captions), list(sizes))
        return _stack([self._stored(self._key(c, s)) for c, s in zip(captions, sizes)])


def _select(cond, index: int):
    if isinstance(cond, dict):
        return {k: v[index].detach() for k, v in cond.items()}
    return cond[index].detach()


def _as_tensors(cond) -> Dict[str, torch.Tensor]:
    return dict(cond) if isinstance(cond, dict) else {"": cond}


def _from_tensors(tensors: Dict[str, torch.Tensor], device: torch.device):
    moved = {k: v.to(device) for k, v in tensors.items()}
    return moved[""] if set(moved) == {""} else moved


def _stack(items: List):
    if isinstance(items[0], dict):
        return {k: torch.stack([item[k] for item in items]) for k in items[0]}
    return torch.stack(items)


def _to(cond, dtype_or_device):
    """Conditioning (a tensor, or SDXL's dict of tensors) in another dtype or on another device."""
    if isinstance(cond, dict):
        return {k: v.to(dtype_or_device) for k, v in cond.items()}
    return cond.to(dtype_or_device)


class _Loop(LoopBase):
    STATE_KEY = "network"

    def __init__(self, config: TrainConfig, backbone: Backbone, data: PreparedData, run: RunFolder,
                 network: LoraNetwork, events: EventBus, stop: StopRequest, processes: Processes = SINGLE):
        super().__init__(config, data.plan, run, events, stop, processes)
        self.backbone, self.data, self.network = backbone, data, network
        self.order = EpochOrder(data, data.plan.global_batch, config.seed, processes.world)
        text_lr = config.learning_rate if config.text_encoder_lr is None else config.text_encoder_lr
        self.optimizer = build_optimizer(network.parameter_groups(config.learning_rate, text_lr), config.optimizer,
                                         config.learning_rate, config.weight_decay)
        self.scheduler = build_lr_scheduler(self.optimizer, config.lr_scheduler, config.lr_warmup_steps,
                                            self.plan.total_steps, config.lr_scheduler_num_cycles)
        self.facts = RunFacts(
            name=run.name, family=backbone.family, prediction_type=backbone.prediction_type,
            model_name=backbone.model_name, model_hash=backbone.model_hash,
            num_images=data.scan.num_images(), num_samples=data.scan.num_samples(),
            batches_per_epoch=self.plan.batches_per_epoch, total_steps=self.plan.total_steps,
            tag_frequency=data.scan.tag_frequency(), dataset_dirs=data.scan.dataset_dirs(),
            bucket_counts=data.bucket_counts(), started_at=time.time(), session_id=new_session_id(),
            processes=processes.world, num_reg_images=len(data.scan.of_role("reg")),
            reg_dataset_dirs=data.scan.dataset_dirs("reg"), num_validation_images=len(data.scan.of_role("val")),
            datasets=_datasets_metadata(data), masked_loss=data.masks is not None)
        self.latents: Optional[LatentCache] = None
        self.text = _TextConditioning(backbone, cache=not (captions_vary(config, data) or config.train_text_encoder),
                                      grad=config.train_text_encoder, processes=processes)
        # The schedule the loss sees: the model's, or rescaled to a zero terminal SNR.
        self.alphas_cumprod = backbone.alphas_cumprod
        if config.zero_terminal_snr:
            self.alphas_cumprod = zero_terminal_snr(backbone.alphas_cumprod)
            if backbone.prediction_type == "epsilon":
                logger.warning("zero_terminal_snr with an epsilon-prediction model: at the last timestep the input is "
                               "pure noise and the target is that noise; it is meant for v-prediction models")
        self.validation = data.indices("val")
        if config.network == "dora" and config.train_text_encoder and backbone.family in ("sd2", "sdxl"):
            logger.warning("A1111 applies LoRA to the OpenCLIP text encoder of SD2/SDXL through its fused attention "
                           "weights, where its DoRA merge does not fit; the text-encoder part of this DoRA works in "
                           "Forge, ComfyUI and diffusers")
        if backbone.family == "sdxl" and config.resolution < 1024:
            logger.warning("SDXL was trained at 1024 px; resolution %d trains it below its native size (set "
                           "resolution: 1024, see configs/presets/sdxl_12gb.yaml)", config.resolution)

    # -- phases ----------------------------------------------------------------------------------
    def run(self, resume: bool) -> TrainResult:
        start_step = self._resume() if resume else 0
        self._prepare_caches()
        self._measure_without_lora((self.plan.total_steps - start_step) * self.plan.global_batch)
        self.events.emit(Started(self.run_folder.path, self.plan.total_steps, start_step,
                                 self.data.scan.num_images()))
        step = self._train_steps(start_step)
        stopped = step < self.plan.total_steps
        if not self.processes.is_main:  # the main process checks and writes the result
            return TrainResult(self.run_folder.path, None, step, stopped)
        if stopped and not self.stop.save:
            self.run_folder.write_chart()
            self.events.emit(Finished(self.run_folder.path, None, step, stopped=True))
            return TrainResult(self.run_folder.path, None, step, True)
        loss_before, loss_after = self._check_losses()
        lora_path = self._finish(step)
        self.events.emit(Finished(self.run_folder.path, lora_path, step, stopped=stopped))
        return TrainResult(self.run_folder.path, lora_path, step, stopped, loss_before, loss_after)

    def _prepare_caches(self) -> None:
        started, config = time.perf_counter(), self.config
        if config.cache_latents:
            disk = None
            if config.cache_latents_to_disk:
                disk = DiskCache(self._cache_dir(), "latents", vae_fingerprint(self.backbone))
            self.latents = LatentCache(self.backbone, self.data, config, processes=self.processes, disk=disk)
            if disk is not None:
                logger.info("latent cache %s: %d reused, %d encoded", disk.folder, disk.hits, self.latents.encoded_here)
            elif self.processes.parallel:
                logger.info("latents: %d of %d encoded in this process, the rest by the other %d",
                            self.latents.encoded_here, len(self.latents.entries), self.processes.world - 1)
        elif config.cache_latents_to_disk:
            logger.warning("cache_latents_to_disk has no effect with cache_latents off")
        if self.text.cache:
            if config.cache_text_encoder_outputs_to_disk:
                self.text.disk = DiskCache(self._cache_dir(), "text", self._text_fingerprint())
            rng = caption_rng(config.seed, 0)
            pairs = [(caption_for(config, r.caption, rng, self.data.subset(i)), self.data.train_size(i, flip))
                     for i, r in enumerate(self.data.scan.records) for flip in self.data.flips_of(i, config)]
            self.text.fill(pairs)
        elif config.cache_text_encoder_outputs_to_disk:
            logger.warning("cache_text_encoder_outputs_to_disk has no effect when captions change between steps "
                           "(shuffle_caption, caption_dropout_rate) or the text encoder trains")
        logger.info("caches ready in %.1f s", time.perf_counter() - started)

    def _cache_dir(self) -> Path:
        return Path(self.config.cache_dir or Path(self.config.output_dir) / ".cache").expanduser()

    def _text_fingerprint(self) -> str:
        probe = [TrainSize((512, 512), (512, 512), (0, 0))]
        return fingerprint(lambda: self.backbone.encode_prompts(["lora_trainer cache probe"], probe)) + \
            f"-clip_skip{self.config.clip_skip}"

    def _trainable(self) -> Dict[str, torch.nn.Parameter]:
        return dict(self.network.named_parameters())

    def _after_step(self, step: int) -> None:
        if (self.processes.is_main and self.config.sample_every_n_steps and step % self.config.sample_every_n_steps == 0
                and step < self.plan.total_steps):
            self._render_samples(step)

    def _step_metrics(self, step: int) -> Dict[str, float]:
        """The validation loss, at the steps it is due (with a validation set)."""
        if not self.validation or not self.processes.is_main:
            return {}
        every = self.config.validate_every_n_steps
        due = step % every == 0 if every else self.plan.epoch_of_step(step) != self.plan.epoch_of_step(step + 1)
        if not (due or step == self.plan.total_steps):
            return {}
        started = time.perf_counter()
        loss = self._validation_loss()
        logger.info("step %d: validation loss %.5f (%d images, %.1f s)", step, loss, len(self.validation),
                    time.perf_counter() - started)
        return {"val_loss": loss}

    def _batch_latents(self, indices: Sequence[int], flips: Sequence[bool]):
        """(latents, loss masks or None) of the items, from the cache or encoded now."""
        backbone = self.backbone
        if self.latents is not None:
            return self.latents.batch_with_masks(indices, flips)
        with torch.no_grad():
            pixels = load_pixels(self.data, indices, flips).to(backbone.device, backbone.dtype)
            latents = backbone.encode_images(pixels).float()
        return latents, stack_masks([self.data.mask(i, f) for i, f in zip(indices, flips)], latents)

    def _micro_step(self, micro_step: int) -> float:
        """Forward and backward of this process's share of micro-batch ``micro_step``; returns its part of the
        micro-batch's mean loss (the whole mean in one process). Every random draw is made for the whole micro-batch
        and then sliced, so N processes compute what one process would."""
        config, data = self.config, self.data
        indices = self.order.micro_batch(micro_step)
        rng = caption_rng(config.seed, micro_step)
        captions = [caption_for(config, data.scan.records[i].caption, rng, data.subset(i)) for i in indices]
        flips = [len(data.flips_of(i, config)) > 1 and rng.random() < 0.5 for i in indices]
        sizes = [data.train_size(i, flip) for i, flip in zip(indices, flips)]
        share = self.processes.share(len(indices))
        if share.start == share.stop:  # a short last batch can leave a process nothing; it still joins the sum
            return 0.0
        latents, masks = self._batch_latents(indices[share], flips[share])
        item_weights = torch.tensor([data.loss_weight(i, config.prior_loss_weight) for i in indices[share]])
        whole = latents.new_empty((len(indices), *latents.shape[1:]), device="cpu")  # the micro-batch's shape
        generator = noise_generator(config.seed, micro_step)
        noise = sample_noise(whole, generator, config.noise_offset, config.multires_noise_iterations,
                             config.multires_noise_discount)
        timesteps = sample_timesteps(len(indices), generator, min_timestep=config.min_timestep,
                                     max_timestep=config.max_timestep)
        input_noise = perturbed(noise, generator, config.ip_noise_gamma)
        noise, timesteps, input_noise = (t[share].to(latents.device) for t in (noise, timesteps, input_noise))
        weight = (share.stop - share.start) / len(indices)  # this process's part of the micro-batch's mean
        with self.dropout_active(micro_step):
            # A training text-encoder LoRA runs in the same mixed precision as the UNet; frozen encodings do not
            # change.
            with self._autocast(enabled=config.train_text_encoder):
                cond = self.text.batch(captions[share], sizes[share])
            loss = self._loss(latents, noise, timesteps, cond, input_noise=input_noise, mask=masks,
                              item_weights=item_weights)
            self._check_finite(loss, micro_step)
            (loss * weight / self.plan.accumulation).backward()  # weight is 1.0 in one process: no change
        return float(loss.detach()) * weight

    def _optimizer_step(self, step: int) -> None:
        super()._optimizer_step(step)
        if self.config.scale_weight_norms:
            scaled, mean = self.network.apply_max_norm(self.config.scale_weight_norms)
            if scaled:
                logger.debug("step %d: %d layers scaled to norm %g (mean norm %.4f)", step + 1, scaled,
                             self.config.scale_weight_norms, mean)

    @contextlib.contextmanager
    def dropout_active(self, micro_step: int) -> Iterator[None]:
        """The LoRA layers in training mode, so their dropout acts, drawing from a random stream that depends only
        on (seed, micro_step), so a resumed run drops the same units; back to eval mode afterwards."""
        config = self.config
        if not (config.network_dropout or config.rank_dropout or config.module_dropout):
            yield
            return
        device = self.backbone.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(noise_generator(config.seed, micro_step).initial_seed() ^ 0x5EED)
            self.network.train()
            try:
                yield
            finally:
                self.network.eval()

    def _loss(self, latents, noise, timesteps, cond, weights_enabled: bool = True,
              input_noise: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
              item_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The batch's mean loss: ``loss_type`` per element, ``mask`` per pixel, and per sample the regularization
        weight (``item_weights``) and, with ``weights_enabled``, the Min-SNR and debiased-estimation weights."""
        backbone, config = self.backbone, self.config
        ac = self.alphas_cumprod
        noisy = add_noise(latents, noise if input_noise is None else input_noise, timesteps, ac)
        target = training_target(latents, noise, timesteps, ac, backbone.prediction_type)
        with self._autocast():
            prediction = backbone.predict(noisy.to(backbone.dtype), timesteps.to(backbone.device),
                                          _to(cond, backbone.dtype))
        weights = item_weights if item_weights is not None and bool((item_weights != 1).any()) else None
        if config.min_snr_gamma and weights_enabled:
            snr = min_snr_weights(timesteps, ac, config.min_snr_gamma, backbone.prediction_type)
            weights = snr if weights is None else weights * snr
        if config.debiased_estimation_loss and weights_enabled:
            debiased = debiased_weights(timesteps, ac, backbone.prediction_type)
            weights = debiased if weights is None else weights * debiased
        threshold = None
        if config.loss_type in ("huber", "smooth_l1"):
            threshold = huber_threshold(timesteps, ac, config.huber_c, config.huber_schedule)
        return diffusion_loss(prediction, target, weights, config.loss_type, threshold, mask)

    def _autocast(self, enabled: bool = True):
        dtype = AUTOCAST.get(self.config.mixed_precision)
        return torch.autocast(device_type=self.backbone.device.type, dtype=dtype or torch.float32,
                              enabled=enabled and dtype is not None)

    # -- saving ----------------------------------------------------------------------------------
    def _precision(self) -> str:
        if self.config.save_precision != "auto":
            return self.config.save_precision
        return "fp32" if self.config.mixed_precision == "no" else self.config.mixed_precision

    def _metadata(self, step: int) -> Dict[str, str]:
        rank, alpha = self.network.rank_summary()
        return lora_metadata(self.config, self.facts, step, self.plan.epoch_of_step(step), rank, alpha,
                             self.config.conv_rank, self.config.conv_alpha)

    def _write_checkpoint_files(self, folder: Path, step: int) -> None:
        name = f"{self.run_folder.name}-step{step:06d}.safetensors"
        save_lora_file(folder / name, self.network.kohya_state_dict(), self._metadata(step), self._precision())

    def _render_samples(self, step: int) -> List[Path]:
        config = self.config
        first = self.data.indices("train")[0]
        prompts = list(config.sample_prompts) or [caption_for(config, self.data.scan.records[first].caption,
                                                              caption_rng(config.seed, 0), self.data.subset(first))]
        images = self.backbone.generate(prompts, config.sample_negative_prompt, config.sample_seed,
                                        config.sample_steps, config.sample_guidance_scale,
                                        (config.resolution, config.resolution))
        paths = []
        for i, image in enumerate(images):
            path = self.run_folder.samples_dir / f"step{step:06d}-{i}.png"
            write_atomic(path, lambda tmp, image=image: image.save(tmp, format="PNG"))
            paths.append(path)
        self.events.emit(SampleSaved(step, paths))
        return paths

    def _finish(self, step: int) -> Path:
        run, config = self.run_folder, self.config
        self.events.emit(Phase("saving", 0, 1))
        self._ensure_final_checkpoint(step)
        save_lora_file(run.lora_path, self.network.kohya_state_dict(), self._metadata(step), self._precision())
        run.write_sidecar(sidecar_json(config, self.facts))
        if config.sample_at_end:
            self.events.emit(Phase("rendering samples", 0, 1))
            samples = self._render_samples(step)
            buffer = io.BytesIO()
            from PIL import Image

            with Image.open(samples[0]) as first:
                first.save(buffer, format="PNG")
            run.write_preview(buffer.getvalue())
        if config.final_check == "full":
            self.events.emit(Phase("checking the LoRA: strength sweep", 0, 1))
            self.lora_check = check_trained_lora(self.network, self.backbone, config, run.path,
                                                 self.data.scan.records[self.data.indices("train")[0]].caption)
        elif config.final_check == "quick":
            self.lora_check = check_weights(self.network, config.preferred_weight, run.path, self.fixed_batch_losses)
        run.write_chart()
        logger.info("saved %s", run.lora_path)
        return run.lora_path

    # -- evaluation ------------------------------------------------------------------------------
    def _conditioning(self, index: int, rng) -> object:
        """Record ``index``'s conditioning with its plain caption (no shuffle or dropout): what training stored, else
        encoded now."""
        subset, config = self.data.subset(index), self.config
        options = {"caption_dropout_rate": 0.0, "shuffle_caption": False}
        plain_subset = dataclasses.replace(subset, **options) if subset is not None else None
        plain_config = config if subset is not None else config.replace(**options)
        caption = caption_for(plain_config, self.data.scan.records[index].caption, rng, plain_subset)
        size = self.data.train_size(index)
        cond = self.text.cached(caption, size)
        return cond if cond is not None else self.backbone.encode_prompts([caption], [size])

    def _validation_loss(self) -> float:
        """Mean loss over the validation images, each at the same 4 timesteps with the same noise every time (drawn
        from validation_seed), so the curve moves only with the LoRA. No Min-SNR or debiased weights: the plain
        ``loss_type`` loss, masked like training."""
        config = self.config
        seed = config.seed if config.validation_seed is None else config.validation_seed
        span = config.max_timestep - config.min_timestep
        timesteps = torch.tensor([config.min_timestep + span * (2 * k + 1) // 8 for k in range(4)])
        rng = caption_rng(seed, -2)
        total = 0.0
        with torch.no_grad():
            for n, i in enumerate(self.validation):
                latent, mask = self._batch_latents([i], [False])
                cond = self._conditioning(i, rng)
                batch = len(timesteps)
                noise = sample_noise(latent.expand(batch, *latent.shape[1:]), noise_generator(seed, -1 - n))
                cond_batch = {k: v.expand(batch, *v.shape[1:]) for k, v in cond.items()} if isinstance(cond, dict) \
                    else cond.expand(batch, *cond.shape[1:])
                total += float(self._loss(latent.expand(batch, *latent.shape[1:]), noise, timesteps, cond_batch,
                                          weights_enabled=False,
                                          mask=None if mask is None else mask.expand(batch, *mask.shape[1:])))
        return total / len(self.validation)

    def _check_pairs(self, images_trained: int) -> List[Tuple[int, int]]:
        """The (record, timestep) pairs of the fixed batch: full, every pair of its grid; quick, the grid's first
        pairs (alternating images and timesteps), as many as the run's length pays for (``QUICK_CHECK_SHARE``)."""
        count, timesteps = CHECK_BATCH[self.config.final_check]
        records = self.data.indices("train")[:count]
        if self.config.final_check == "full":
            return [(i, t) for i in records for t in timesteps]
        grid = [(records[k % len(records)], timesteps[(k + k // 2) % len(timesteps)]) for k in range(4)]
        grid = list(dict.fromkeys(grid))  # one image: its two timesteps once each
        return grid[:min(len(grid), int(QUICK_CHECK_SHARE * images_trained))]

    def _measure_without_lora(self, images_planned: int) -> None:
        """The check's loss without the LoRA is the base model's: it does not depend on training, so it is measured
        before the first step, and only the loss with the LoRA is left for after the last one."""
        self.check_pairs: List[Tuple[int, int]] = []
        self.loss_without_lora = math.nan
        if self.config.final_check == "off" or not self.processes.is_main:
            return
        started = time.perf_counter()
        self.check_pairs = self._check_pairs(images_planned)
        if not self.check_pairs:
            logger.info("final_check quick: %d images to train pay for no loss sample (one costs about a third of a "
                        "step); the LoRA's weights are checked after the last step", images_planned)
            return
        self.loss_without_lora = self._fixed_batch_loss(0.0, self.check_pairs)
        logger.info("fixed-batch loss without the LoRA %.5f (%d samples, %.1f s)", self.loss_without_lora,
                    len(self.check_pairs), time.perf_counter() - started)

    def _check_losses(self) -> Tuple[Optional[float], Optional[float]]:
        """The fixed-batch loss without (measured before the first step) and with the LoRA, sized by
        ``final_check`` and the run's length."""
        self.fixed_batch_losses: Dict[str, float] = {}
        if self.config.final_check == "off" or not self.check_pairs:
            return None, None
        pairs = self.check_pairs
        total, started = len(pairs), time.perf_counter()
        done = [0]

        def one_pass() -> None:
            done[0] += 1
            self.events.emit(Phase("checking the LoRA", done[0], total))

        self.events.emit(Phase("checking the LoRA", 0, total))
        before = self.loss_without_lora
        after = self._fixed_batch_loss(1.0, pairs, one_pass)
        self.fixed_batch_losses = {"without_lora": before, "with_lora": after}
        if not (math.isfinite(before) and math.isfinite(after)):
            logger.warning("the does-it-work check's loss is not finite (without the LoRA %s, with it %s): the model's "
                           "output on the check's images is NaN or infinite; the LoRA file is saved all the same",
                           before, after)
        logger.info("fixed-batch loss without the LoRA %.5f, with it %.5f (%d samples, %.1f s after the last step)",
                    before, after, total, time.perf_counter() - started)
        return before, after

    def _fixed_batch_loss(self, multiplier: float, pairs: Sequence[Tuple[int, int]],
                          on_pass: Callable[[], None] = lambda: None) -> float:
        """Mean loss over a fixed set of (image, timestep, noise), to compare with and without the LoRA. The pairs
        of one bucket go through the UNet as one batch: on a CPU at small sizes, one call of 4 costs little more
        than one call of 1."""
        config = self.config
        rng = caption_rng(config.seed, -1)
        generator = noise_generator(config.seed, 2**31 - 1)
        groups: Dict[tuple, list] = {}
        with torch.no_grad(), self.network.multiplier(multiplier):
            for i, t in pairs:  # noise drawn in a fixed order, whatever the grouping
                latent = self._batch_latents([i], [False])[0]
                cond = self._conditioning(i, rng)
                groups.setdefault(tuple(latent.shape), []).append((latent, sample_noise(latent, generator), t, cond))
            total, count = 0.0, 0
            for items in groups.values():
                latents = torch.cat([item[0] for item in items])
                noise = torch.cat([item[1] for item in items])
                t_batch = torch.tensor([item[2] for item in items], dtype=torch.long)
                cond = _stack([_select(item[3], 0) for item in items])
                total += float(self._loss(latents, noise, t_batch, cond, weights_enabled=False)) * len(items)
                count += len(items)
                for _ in items:
                    on_pass()
        return total / count if count else math.nan
