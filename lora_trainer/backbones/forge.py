"""Forge's loaded model (``shared.sd_model``, a ``ForgeDiffusionEngine``), trained in place.

Forge differs from A1111 in ways that matter for training (webui_internals.md §2.3, §3.5):
- the UNet is ``forge_objects.unet.model.diffusion_model`` (original layout) and ``KModel.apply_model``
  takes sigmas, so we call the UNet module itself with integer timesteps;
- its parameters, conds and latents are *inference tensors* (built under ``torch.inference_mode``),
  which autograd refuses to save: each is replaced, one at a time, by an ordinary tensor with the same
  values (memory-neutral; Forge runs ordinary tensors just as well);
- its Linear layers are Forge's own class (LoRA attaches to them through ``network.lycoris_view``);
- LoRAs are patched in by replacing Parameter objects and cached by file name; ``refresh_loras()``
  on the original patchers undoes that;
- low-bit storage (fp8, nf4, gguf) cannot be trained;
- its transformer blocks add to the residual in place (``x += n``) after a LayerNorm has kept ``x`` for the
  backward pass: while training, those norms get a copy of their input (``norm_inputs_copied``);
- ``get_learned_conditioning`` runs under ``@torch.inference_mode()``: when a text-encoder LoRA trains, the
  undecorated function (``__wrapped__``) is called so that gradients reach it;
- its text encoders are all HF CLIP (``clip_l`` SD1/SDXL, ``clip_h`` SD2, ``clip_g`` SDXL), so kohya's
  ``lora_te_`` / ``lora_te1_`` / ``lora_te2_`` names apply to each; SDXL's size conditioning is read from the
  prompt object (``width``/``height``), so prompts are encoded one call per bucket size.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, Dict, Iterator, Optional, Sequence

import torch
from torch import nn

from ..errors import ModelError
from .base import FrozenModels, Size, UnsupportedFamily
from .checkpointing import checkpointed, native_checkpointing_off, norm_inputs_copied
from .original_unet import (
    SamplingFallback,
    hf_clip_targets,
    unet_blocks,
    unet_lora_targets,
    with_item_sizes,
)

logger = logging.getLogger("lora_trainer")

TRAINABLE_STORAGE = (torch.float32, torch.float16, torch.bfloat16)
# JointTextEncoder entry -> kohya prefix, per family (webui_internals.md §3.5: te/te1 for clip_l or clip_h, te2 for G)
TE_PREFIXES = {"sd1": {"clip_l": "lora_te_"}, "sd2": {"clip_h": "lora_te_"},
               "sdxl": {"clip_l": "lora_te1_", "clip_g": "lora_te2_"}}


# huggingface_guess's model classes (Forge's sd_model.model_config) that train, exactly these: subclasses such as SSD1B
# or InstructPix2Pix load through the same engines but are other architectures.
TRAINABLE_GUESSES = {"SD15": "sd1", "SD20": "sd2", "SDXL": "sdxl"}
GUESS_NAMES = {"Flux": "Flux.1-dev", "FluxSchnell": "Flux.1-schnell", "SD3": "SD3", "SDXLRefiner": "an SDXL refiner",
               "SSD1B": "SSD-1B", "Segmind_Vega": "Segmind Vega", "KOALA_700M": "KOALA-700M", "KOALA_1B": "KOALA-1B",
               "SD15_instructpix2pix": "SD1 InstructPix2Pix", "SDXL_instructpix2pix": "SDXL InstructPix2Pix",
               "SD21UnclipL": "SD2.1 unCLIP", "SD21UnclipH": "SD2.1 unCLIP", "AuraFlow": "AuraFlow",
               "HunyuanDiT": "Hunyuan-DiT", "HunyuanDiT1": "Hunyuan-DiT 1.1"}


def forge_family(sd_model) -> str:
    """"sd1", "sd2" or "sdxl" for the model Forge loaded, from what Forge itself sets: the family huggingface_guess
    found (``model_config``), the engine's ``is_sd1/is_sd2/is_sdxl`` flags and ``is_inpaint``; anything else raises
    ModelError naming what is loaded. (Forge never sets ``is_flux``: a Flux engine just has every flag False.)"""
    guess = type(getattr(sd_model, "model_config", None)).__name__
    family = TRAINABLE_GUESSES.get(guess)
    flags = {"sd1": "is_sd1", "sd2": "is_sd2", "sdxl": "is_sdxl"}
    if family is None or not getattr(sd_model, flags[family], False):
        name = GUESS_NAMES.get(guess) or (guess if guess != "NoneType" else type(sd_model).__name__)
        raise UnsupportedFamily(name)
    if getattr(sd_model, "is_inpaint", False):
        raise UnsupportedFamily(f"an inpainting {family.upper()} model", ", not inpainting ones")
    return family


def _clone(value):
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value.clone() if isinstance(value, torch.Tensor) else value


def undo_forge_loras(sd_model) -> None:
    """Give every patcher its original Parameters back and forget the applied LoRA set (§3.5)."""
    original = getattr(sd_model, "forge_objects_original", None)
    if original is None:
        return
    original.unet.refresh_loras()
    clip_patcher = getattr(original.clip, "patcher", None)
    if clip_patcher is not None:
        clip_patcher.refresh_loras()
    sd_model.forge_objects = original.shallow_copy()
    sd_model.current_lora_hash = str([])


def make_params_trainable_inputs(root: nn.Module) -> int:
    """Replace inference-mode parameters and buffers by ordinary tensors with the same values (and the same
    ``requires_grad``: Forge's Parameters keep torch's default True, and a run gives back the flags it found)."""
    replaced = 0
    copies: Dict[int, nn.Parameter] = {}  # one copy per Parameter, so tied weights stay tied
    for module in root.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.is_inference():
                if id(param) not in copies:
                    copies[id(param)] = nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad)
                    replaced += 1
                module._parameters[name] = copies[id(param)]
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.is_inference():
                module._buffers[name] = buffer.clone()
                replaced += 1
    return replaced


class ForgeBackbone(SamplingFallback):
    def __init__(self, sd_model, device: Optional[torch.device] = None,
                 load_model_gpu: Optional[Callable[[object], None]] = None, render=None):
        self.family = forge_family(sd_model)  # before anything touches the model
        self.sd_model = sd_model
        kmodel = sd_model.forge_objects.unet.model
        storage = getattr(kmodel, "storage_dtype", None)
        if storage is not None and storage not in TRAINABLE_STORAGE:
            raise ModelError(f"the UNet is stored as {storage} (Diffusion in Low Bits); set it to "
                             "'Automatic' (fp16/bf16) and reload the checkpoint to train")
        predictor = kmodel.predictor
        self.prediction_type = "v_prediction" if predictor.prediction_type == "v_prediction" else "epsilon"
        self.alphas_cumprod = predictor.alphas_cumprod.detach().float().cpu().clone()
        self.dtype = getattr(kmodel, "computation_dtype", None) or next(kmodel.parameters()).dtype
        self.device = torch.device(device) if device is not None else next(kmodel.parameters()).device
        self.vae_dtype = self.dtype
        info = getattr(sd_model, "sd_checkpoint_info", None)
        self.model_name = getattr(info, "model_name", None) or getattr(info, "name", None) or "forge-model"
        self.model_hash = getattr(sd_model, "sd_model_hash", None) or getattr(info, "shorthash", None)
        self.load_model_gpu, self.render = load_model_gpu, render

    @property
    def unet(self) -> nn.Module:
        return self.sd_model.forge_objects.unet.model.diffusion_model

    def _text_encoders(self) -> Dict[str, nn.Module]:
        return dict(self.sd_model.forge_objects.clip.cond_stage_model.named_children())

    # -- the protocol ------------------------------------------------------------------------------
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        # Forge's VAE samples its posterior at every encode, from the global RNG: latents would differ from run to
        # run (no resume could be bit-identical, no disk cache reused). Its own hook, the VAE regulation, takes the
        # posterior's mean instead, as the A1111 backbone does; set for this call only.
        options = getattr(getattr(getattr(self.sd_model.forge_objects, "vae", None), "patcher", None),
                          "model_options", None)
        if not isinstance(options, dict):
            return self.sd_model.encode_first_stage(pixels.to(self.device)).clone()
        missing = object()
        before = options.get("model_vae_regulation", missing)
        options["model_vae_regulation"] = _posterior_mean
        try:
            latents = self.sd_model.encode_first_stage(pixels.to(self.device))  # scaled, an inference tensor
        finally:
            if before is missing:
                options.pop("model_vae_regulation", None)
            else:
                options["model_vae_regulation"] = before
        return latents.clone()

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self.sd_model.decode_first_stage(latents.to(self.device)).clone()

    def encode_prompts(self, prompts: Sequence[str], sizes: Optional[Sequence[Size]] = None):
        cond = self._learned_conditioning(list(prompts))
        embed = getattr(self.sd_model, "embedder", None)  # Forge's StableDiffusionXL: Timestep(256)
        if self.family != "sdxl" or embed is None:
            return cond
        return with_item_sizes(cond, sizes, len(prompts), embed)  # each image's own original size, crop, target

    def _learned_conditioning(self, prompts):
        encode = self.sd_model.get_learned_conditioning
        # Step around its @torch.inference_mode(), with or without gradients: a text-encoder LoRA needs them, and
        # under inference mode Forge's text engine re-creates the embedding Parameters as inference tensors (the
        # check before the first step did that, and they stayed in the WebUI's model).
        inner = getattr(encode, "__wrapped__", None)
        if inner is not None:
            return inner(self.sd_model, prompts)
        return _clone(encode(prompts))  # inference tensors -> ordinary ones

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond) -> torch.Tensor:
        if isinstance(cond, dict):
            return self.unet(noisy_latents, timesteps.to(self.device), context=cond["crossattn"], y=cond["vector"])
        return self.unet(noisy_latents, timesteps.to(self.device), context=cond)

    def lora_targets(self, conv: bool = False, text_encoder: bool = False) -> Dict[str, nn.Module]:
        targets = unet_lora_targets(self.unet, self.family, conv)
        if text_encoder:
            prefixes = TE_PREFIXES[self.family]
            for key, encoder in self._text_encoders().items():
                if key not in prefixes or not hasattr(encoder, "transformer"):
                    raise ModelError(f"text-encoder LoRA is not supported for Forge's {key} on {self.family.upper()} "
                                     "yet; set train_text_encoder: false")
                targets.update(hf_clip_targets(encoder.transformer, prefixes[key]))
        return targets

    @contextlib.contextmanager
    def borrow(self, gradient_checkpointing: bool = False) -> Iterator[None]:
        undo_forge_loras(self.sd_model)
        unet_patcher = self.sd_model.forge_objects.unet
        if self.load_model_gpu is not None:
            self.load_model_gpu(unet_patcher)
        text = list(self._text_encoders().values())
        replaced = sum(make_params_trainable_inputs(m) for m in [self.unet, *text])
        if replaced:
            logger.info("made %d inference-mode tensors trainable inputs (same values)", replaced)
        blocks = unet_blocks(self.unet) if gradient_checkpointing else []
        with FrozenModels(self.unet, *text), native_checkpointing_off(self.unet), checkpointed(blocks), \
                norm_inputs_copied(self.unet):
            yield


def _posterior_mean(posterior):
    return posterior.mode()
