"""The SDXL backbone over diffusers / transformers components (standalone mode and tests).

SDXL is conditioned the way it was trained (and the way diffusers' and A1111's pipelines run it):

* two text encoders, CLIP-L (``text_encoder``) and OpenCLIP-bigG (``text_encoder_2``, with its projection);
  the cross-attention context is their PENULTIMATE hidden states side by side (768 + 1280 = 2048 wide), and
  the pooled, projected output of encoder 2 feeds the UNet's ``add_embedding``;
* six size numbers per image (``add_time_ids``): its original size, where it was cropped, and the size it
  is trained at (the bucket). The training loop hands them over as ``base.TrainSize`` values.

kohya names SDXL UNet LoRA layers after the ORIGINAL module paths (``sdxl_names``) and the two text encoders
``lora_te1_`` / ``lora_te2_``.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

from .base import Conditioning, Size, sdxl_time_ids
from .diffusers_sd import DiffusersSDBackbone
from .sdxl_names import diffusers_to_compvis, unet_layout

log = logging.getLogger("lora_trainer")


class DiffusersSDXLBackbone(DiffusersSDBackbone):
    """SDXL base on diffusers' UNet2DConditionModel (``addition_embed_type="text_time"``) and two CLIP encoders."""

    def __init__(self, unet: nn.Module, vae: nn.Module, text_encoder: nn.Module, text_encoder_2: nn.Module,
                 tokenizer: Any, tokenizer_2: Any, noise_scheduler_config: Dict[str, Any],
                 prediction_type: str = "epsilon", model_name: str = "", model_hash: Optional[str] = None,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None, clip_skip: int = 1):
        self.text_encoder_2 = text_encoder_2
        self.tokenizer_2 = tokenizer_2
        if clip_skip != 1:
            log.warning("clip_skip %d is ignored for SDXL: it always uses the penultimate layer of both text "
                        "encoders, as it was trained (and as A1111 runs it)", clip_skip)
        super().__init__(unet, vae, text_encoder, tokenizer, noise_scheduler_config, family="sdxl",
                         prediction_type=prediction_type, model_name=model_name, model_hash=model_hash,
                         device=device, dtype=dtype, clip_skip=1)
        self._layout = unet_layout(unet.config)

    def models(self) -> List[nn.Module]:
        return [self.unet, self.vae, self.text_encoder, self.text_encoder_2]

    def _dtype_of(self, module: nn.Module, dtype: Optional[torch.dtype]) -> Optional[torch.dtype]:
        # SDXL's VAE overflows in fp16 (its config says force_upcast): keep it in fp32 then, as diffusers does.
        if module is self.vae and dtype == torch.float16 and getattr(module.config, "force_upcast", True):
            return torch.float32
        return dtype

    @property
    def default_size(self) -> Size:
        side = int(self.unet.config.sample_size) * self.vae_scale_factor
        return side, side

    # ---- conditioning ----------------------------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str], sizes: Optional[Sequence[Size]] = None) -> Conditioning:
        """{"crossattn": [B, 77, d1 + d2], "text_embeds": [B, pooled], "time_ids": [B, 6]}.

        ``sizes``: each item's ``TrainSize`` (or a plain bucket size: then original = target, no crop); None
        means the model's native size. Not wrapped in no_grad: gradients flow when a text-encoder LoRA trains.
        """
        prompts = list(prompts)
        device = next(self.text_encoder.parameters()).device
        out_1 = self.text_encoder(self.tokenize(prompts, self.tokenizer).to(device), output_hidden_states=True)
        device_2 = next(self.text_encoder_2.parameters()).device
        out_2 = self.text_encoder_2(self.tokenize(prompts, self.tokenizer_2).to(device_2), output_hidden_states=True)
        context = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2].to(device)], dim=-1)
        sizes = list(sizes) if sizes else [self.default_size] * len(prompts)
        if len(sizes) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(sizes)} sizes")
        time_ids = torch.tensor([sdxl_time_ids(s) for s in sizes], dtype=torch.float32, device=device)
        return {"crossattn": context, "text_embeds": out_2.text_embeds.to(device), "time_ids": time_ids}

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        if not isinstance(cond, dict):
            raise TypeError("the SDXL backbone takes the conditioning dict of its encode_prompts")
        added = {"text_embeds": cond["text_embeds"].to(self.device, self.dtype),
                 "time_ids": cond["time_ids"].to(self.device, self.dtype)}
        return self.unet(noisy_latents.to(self.device, self.dtype), timesteps.to(self.device),
                         encoder_hidden_states=cond["crossattn"].to(self.device, self.dtype),
                         added_cond_kwargs=added).sample

    # ---- LoRA names ------------------------------------------------------------------------------------------
    def unet_lora_path(self, path: str) -> str:
        layers_per_block, _, up_has_attention = self._layout
        original = diffusers_to_compvis(path, layers_per_block, up_has_attention)
        if original is None:
            raise RuntimeError(f"no original (sgm) module path for the SDXL UNet layer {path}")
        return original

    def text_encoders(self) -> List[tuple]:
        return [("lora_te1_", self.text_encoder), ("lora_te2_", self.text_encoder_2)]

    # ---- sampling --------------------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str], negative_prompt: str, seed: int, steps: int,
                 guidance_scale: float, size: Size) -> List[PIL.Image.Image]:  # noqa: F821
        """DDIM (eta 0) through diffusers' SDXL pipeline on our own conditioning; the VAE decodes in its dtype."""
        from diffusers import StableDiffusionXLPipeline
        from PIL import Image

        width, height = self.check_sample_size(size)
        prompts = list(prompts)
        pipe = StableDiffusionXLPipeline(vae=self.vae, text_encoder=self.text_encoder,
                                         text_encoder_2=self.text_encoder_2, tokenizer=self.tokenizer,
                                         tokenizer_2=self.tokenizer_2, unet=self.unet, scheduler=self.ddim_scheduler(),
                                         add_watermarker=False)
        pipe.set_progress_bar_config(disable=True)
        sizes = [(width, height)] * len(prompts)
        with self.eval_mode(), torch.no_grad():
            cond = self.encode_prompts(prompts, sizes)
            uncond = self.encode_prompts([negative_prompt or ""] * len(prompts), sizes)
            generator = torch.Generator(device="cpu").manual_seed(int(seed))
            latents = pipe(prompt_embeds=cond["crossattn"].to(self.dtype),
                           pooled_prompt_embeds=cond["text_embeds"].to(self.dtype),
                           negative_prompt_embeds=uncond["crossattn"].to(self.dtype),
                           negative_pooled_prompt_embeds=uncond["text_embeds"].to(self.dtype),
                           num_inference_steps=int(steps), guidance_scale=float(guidance_scale), width=width,
                           height=height, generator=generator, output_type="latent").images
            pixels = self.vae.decode(latents.to(self.vae_dtype) / self.vae.config.scaling_factor).sample
        pixels = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
        return [Image.fromarray(p.numpy()) for p in pixels]
