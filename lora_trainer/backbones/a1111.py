"""The model AUTOMATIC1111 has loaded (``shared.sd_model``), trained in place through its own methods.

Nothing here imports the WebUI: the glue in ``scripts/`` hands over the model object and, where needed, the
WebUI's ``networks`` module and a renderer. SD1/SD2 are ldm ``LatentDiffusion`` objects (SD2 768-v with
``parameterization == "v"``), SDXL an sgm ``DiffusionEngine`` (webui_internals.md §2.1). Text-encoder LoRA works on
every family's encoders: HF CLIP as it is, open_clip (SD2's, SDXL's second) with its fused attention split into
q/k/v/out while training (open_clip_text.py). The WebUI's own ``get_learned_conditioning``, ``encode_first_stage``
and ``apply_model`` do the work, so clip skip, emphasis and long prompts behave as in txt2img; SDXL calls sgm's
conditioner itself, to give it each image's original size and crop.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, ContextManager, Dict, Iterator, Optional, Sequence

import torch
from torch import nn

from ..errors import ModelError
from .base import FrozenModels, Size, UnsupportedFamily
from .checkpointing import checkpointed, native_checkpointing_off
from .open_clip_text import OpenClipText
from .original_unet import (
    SamplingFallback,
    first_float_param,
    hf_clip_targets,
    refuse_low_bit,
    sgm_size_batch,
    unet_blocks,
    unet_lora_targets,
)

logger = logging.getLogger("lora_trainer")

_UNSET = object()


@contextlib.contextmanager
def _trainable(embedders) -> Iterator[None]:
    """sgm's ``is_trainable`` set on ``embedders`` (so its conditioner lets gradients through), then put back."""
    before = [getattr(e, "is_trainable", _UNSET) for e in embedders]  # sgm: a property; A1111's wrappers: a value
    try:
        for embedder in embedders:
            embedder.is_trainable = True
        yield
    finally:
        for embedder, value in zip(embedders, before):
            if value is _UNSET:
                embedder.__dict__.pop("is_trainable", None)
            else:
                embedder.is_trainable = value


def detect_family(sd_model) -> str:
    if getattr(sd_model, "is_sd3", False):
        raise UnsupportedFamily("SD3")
    if getattr(sd_model, "is_sdxl", False) or hasattr(sd_model, "conditioner"):
        return "sdxl"
    cond = sd_model.cond_stage_model
    if getattr(sd_model, "is_sd2", False) or hasattr(getattr(cond, "wrapped", cond), "model"):
        return "sd2"
    return "sd1"


def unmerge_webui_loras(sd_model: nn.Module, networks) -> int:
    """Undo LoRAs A1111 merged into the weights (it merges in place and restores lazily, §3.4).

    With ``loaded_networks`` empty and every backup restored, the weights are the checkpoint's again
    and the next generation re-merges whatever its prompt asks for. Returns the layers restored.
    """
    if networks is None:
        return 0
    networks.loaded_networks.clear()
    restored = 0
    with torch.no_grad():
        for module in sd_model.modules():
            if (getattr(module, "network_weights_backup", None) is not None
                    or getattr(module, "network_bias_backup", None) is not None):
                networks.network_restore_weights_from_backup(module)
                networks.network_reset_cached_weight(module)
                restored += 1
    if restored:
        logger.info("restored %d layers that had a LoRA merged in", restored)
    return restored


class A1111Backbone(SamplingFallback):
    def __init__(self, sd_model, device: Optional[torch.device] = None, networks=None, render=None,
                 lowvram: bool = False):
        if lowvram:
            raise ModelError("the WebUI runs with --lowvram, which moves every UNet block to the CPU between "
                             "layers; training needs --medvram or no flag. Restart the WebUI without --lowvram")
        self.sd_model = sd_model
        self.unet: nn.Module = sd_model.model.diffusion_model
        self.family = detect_family(sd_model)
        refuse_low_bit(self.unet, "Settings > Optimizations > FP8 weight")
        # SD2 768-v: ldm's LatentDiffusion reads ``parameterization: "v"`` from the checkpoint's yaml (§2.1)
        self.prediction_type = "v_prediction" if getattr(sd_model, "parameterization", "eps") == "v" else "epsilon"
        schedule = getattr(sd_model, "alphas_cumprod_original", None)
        self.alphas_cumprod = (schedule if schedule is not None else sd_model.alphas_cumprod).detach().float().cpu()
        weight = first_float_param(self.unet)
        self.device = torch.device(device) if device is not None else weight.device
        self.dtype = weight.dtype
        self.vae_dtype = first_float_param(sd_model.first_stage_model).dtype
        info = getattr(sd_model, "sd_checkpoint_info", None)
        self.model_name = getattr(info, "model_name", None) or getattr(info, "name", None) or "webui-model"
        self.model_hash = getattr(sd_model, "sd_model_hash", None) or getattr(info, "shorthash", None)
        self.networks, self.render = networks, render
        self._open_clip: Dict[str, OpenClipText] = {}  # kohya prefix -> its open_clip encoder's LoRA layers
        self._while_borrowed: Dict[str, Callable[[], ContextManager]] = {}
        self._borrowed: Optional[contextlib.ExitStack] = None

    # -- the protocol ------------------------------------------------------------------------------
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), _posterior_mean(self.sd_model):
            encoded = self.sd_model.encode_first_stage(pixels.to(self.device, self.vae_dtype))
            if not isinstance(encoded, torch.Tensor):  # ldm returns the posterior: its mean keeps latents deterministic
                return encoded.mode() * self.sd_model.scale_factor
            return self.sd_model.get_first_stage_encoding(encoded)  # sgm: already scaled

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.sd_model.decode_first_stage(latents.to(self.device, self.vae_dtype))

    def encode_prompts(self, prompts: Sequence[str], sizes: Optional[Sequence[Size]] = None):
        conditioner = getattr(self.sd_model, "conditioner", None)
        if self.family != "sdxl" or conditioner is None:
            return self.sd_model.get_learned_conditioning(list(prompts))
        # sgm's conditioner, called as A1111's get_learned_conditioning calls it, but with each image's own
        # original size, crop and target size (A1111 passes one size per call and the crop from its settings).
        return conditioner(sgm_size_batch(prompts, sizes, self.device))

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond) -> torch.Tensor:
        return self.sd_model.apply_model(noisy_latents, timesteps.to(self.device), cond)

    def lora_targets(self, conv: bool = False, text_encoder: bool = False) -> Dict[str, nn.Module]:
        targets = unet_lora_targets(self.unet, self.family, conv)
        if text_encoder:
            targets.update(self._text_encoder_targets())
        return targets

    @contextlib.contextmanager
    def borrow(self, gradient_checkpointing: bool = False) -> Iterator[None]:
        unmerge_webui_loras(self.sd_model, self.networks)
        blocks = unet_blocks(self.unet) if gradient_checkpointing else []
        with FrozenModels(self.sd_model), native_checkpointing_off(self.sd_model), checkpointed(blocks), \
                contextlib.ExitStack() as borrowed:
            for part in self._while_borrowed.values():  # asked for by text-encoder LoRA layers made before
                borrowed.enter_context(part())
            self._borrowed = borrowed
            try:
                yield
            finally:
                self._borrowed = None

    # -- helpers -----------------------------------------------------------------------------------
    def _open_clip_text(self, prefix: str, resblocks, layers: int) -> OpenClipText:
        """One OpenClipText per encoder, its attention split while the model is borrowed."""
        if prefix not in self._open_clip:
            self._open_clip[prefix] = OpenClipText(resblocks, prefix, layers)
            self._while_borrowing(prefix, self._open_clip[prefix].split_attention)
        return self._open_clip[prefix]

    def _while_borrowing(self, key: str, part: Callable[[], ContextManager]) -> None:
        """Hold ``part()`` while the model is borrowed: from now if it is, else from the next borrow."""
        if key not in self._while_borrowed:
            self._while_borrowed[key] = part
            if self._borrowed is not None:
                self._borrowed.enter_context(part())

    def _text_encoder_targets(self) -> Dict[str, nn.Module]:
        if self.family == "sdxl":  # sgm's FrozenCLIPEmbedder (HF) and FrozenOpenCLIPEmbedder2 (open_clip)
            embedders = list(self.sd_model.conditioner.embedders[:2])
            first, second = (getattr(e, "wrapped", e) for e in embedders)  # A1111's prompt hijack wraps them
            targets = hf_clip_targets(first.transformer, "lora_te1_")
            resblocks = second.model.transformer.resblocks  # all layers: the last one makes the pooled output
            targets.update(self._open_clip_text("lora_te2_", resblocks, len(resblocks)).targets())
            # sgm's conditioner runs frozen embedders under no_grad; trainable ones with gradients
            self._while_borrowing("trainable embedders", lambda: _trainable(embedders))
            return targets
        cond = self.sd_model.cond_stage_model
        if self.family == "sd2":  # ldm's FrozenOpenCLIPEmbedder (A1111 wraps it: .wrapped); "penultimate" skips one
            embedder = getattr(cond, "wrapped", cond)
            resblocks = embedder.model.transformer.resblocks
            return self._open_clip_text("lora_te_", resblocks, len(resblocks) - embedder.layer_idx).targets()
        transformer = getattr(getattr(cond, "wrapped", cond), "transformer", None)
        if transformer is None:
            raise ModelError("this text encoder layout is not supported for text-encoder LoRA yet")
        return hf_clip_targets(transformer, "lora_te_")


@contextlib.contextmanager
def _posterior_mean(sd_model) -> Iterator[None]:
    """sgm (A1111's SDXL) samples the VAE posterior in ``encode_first_stage`` (its DiagonalGaussianRegularizer,
    ``sample=True``), from the global RNG: latents would differ from run to run. For this call, the regularizer
    returns the posterior's mode (its mean), as ldm's path does below."""
    regularization = getattr(getattr(sd_model, "first_stage_model", None), "regularization", None)
    if not isinstance(getattr(regularization, "sample", None), bool):
        yield
        return
    before = regularization.sample
    regularization.sample = False
    try:
        yield
    finally:
        regularization.sample = before
