"""A small SDXL model object as A1111 1.10 holds it (sgm ``DiffusionEngine`` + ``sd_models_xl.extend_sdxl``).

sgm (Stability's generative-models) is not on PyPI, so this rebuilds the interface from webui_internals.md §2.1:
- ``model.diffusion_model``: the original-layout UNet. We use ldm's real ``UNetModel`` (same block classes and
  names as sgm's) with sgm's ``label_emb`` (``Sequential(Sequential(Linear, SiLU, Linear))``) for the
  ``vector`` conditioning;
- ``conditioner.embedders[0/1]``: two text encoders; ``get_learned_conditioning(batch)`` reads the
  ``width``/``height`` of A1111's ``SdConditioning`` (a list of prompts) for the size conditioning and returns
  ``{"crossattn": [B, 77, d0 + d1], "vector": [B, pooled + 6 * 8]}``, as ``sd_models_xl.get_learned_conditioning``;
- ``apply_model(x, t, cond)`` -> ``diffusion_model(x, timesteps=t, context=crossattn, y=vector)``;
- ``encode_first_stage`` returns the already scaled latent and ``get_first_stage_encoding`` is the identity.
Not reproduced: open_clip for the second encoder (an HF CLIP stands in), aesthetic/refiner conditioning.
"""

from __future__ import annotations

import math
import types

import torch
from torch import nn


class SdConditioning(list):
    """A1111's prompt_parser.SdConditioning: prompts plus the image size they are for."""

    def __init__(self, prompts, width=1024, height=1024):
        super().__init__(prompts)
        self.width, self.height = width, height


def fourier(values: torch.Tensor, dim: int = 8) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = values.float()[:, :, None] * freqs[None, None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).flatten(1)


class Embedder(nn.Module):
    def __init__(self, transformer, tokenizer):
        super().__init__()
        self.wrapped = nn.Module()
        self.wrapped.transformer = transformer
        self.tokenizer = tokenizer

    def forward(self, prompts):
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids
        out = self.wrapped.transformer(ids, output_hidden_states=True)
        return out.hidden_states[-2], out.pooler_output


class Conditioner(nn.Module):
    def __init__(self, embedders):
        super().__init__()
        self.embedders = nn.ModuleList(embedders)
        self.sizes_seen = []

    def forward(self, batch):
        h0, _ = self.embedders[0](batch)
        h1, pooled = self.embedders[1](batch)
        self.sizes_seen.append((batch.width, batch.height))
        n = len(batch)
        size = torch.tensor([[batch.height, batch.width]] * n)
        vector = torch.cat([pooled, fourier(size), fourier(torch.zeros(n, 2)), fourier(size)], dim=1)
        return {"crossattn": torch.cat([h0, h1], dim=-1), "vector": vector}


class DiffusionEngine(nn.Module):
    def __init__(self, unet, conditioner, vae, alphas_cumprod):
        super().__init__()
        self.model = nn.Module()
        self.model.diffusion_model = unet
        self.conditioner = conditioner
        self.first_stage_model = vae
        self.scale_factor = 0.13025
        self.register_buffer("alphas_cumprod", alphas_cumprod)
        self.is_sdxl, self.is_sd1, self.is_sd2 = True, False, False
        self.sd_checkpoint_info = types.SimpleNamespace(name="tiny-xl.safetensors", model_name="tiny-xl")
        self.sd_model_hash = "feedbeef"
        self.parameterization = "eps"

    def get_learned_conditioning(self, batch):
        if not hasattr(batch, "width"):
            batch = SdConditioning(batch)
        return self.conditioner(batch)

    def apply_model(self, x, t, cond):
        return self.model.diffusion_model(x, timesteps=t, context=cond["crossattn"], y=cond["vector"])

    @torch.no_grad()
    def encode_first_stage(self, x):
        return self.scale_factor * self.first_stage_model.encode(x).latent_dist.mean

    def get_first_stage_encoding(self, z):
        return z

    @torch.no_grad()
    def decode_first_stage(self, z):
        return self.first_stage_model.decode(z / self.scale_factor).sample


def build_sdxl_like(tiny_files: dict, seed: int = 0) -> DiffusionEngine:
    from diffusers import AutoencoderKL
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = tiny_files["folder"]
    tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
    torch.manual_seed(seed)
    encoders = []
    for hidden in (32, 64):
        config = CLIPTextConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                                num_attention_heads=4, vocab_size=49408, max_position_embeddings=77)
        encoders.append(Embedder(CLIPTextModel(config), tokenizer))
    adm = 64 + 6 * 8
    unet = UNetModel(image_size=32, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[2],
                     num_res_blocks=2, channel_mult=[1, 2], num_head_channels=8, use_spatial_transformer=True,
                     transformer_depth=1, context_dim=96, use_linear_in_transformer=True, legacy=False)
    time_dim = 32 * 4
    unet.num_classes = "sequential"  # sgm's vector conditioning
    unet.label_emb = nn.Sequential(nn.Sequential(nn.Linear(adm, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim)))
    with torch.no_grad():  # ldm zero-initialises out/proj_out layers; a trained model has no such zeros
        for param in unet.parameters():
            if not param.any():
                param.normal_(0, 0.02)
    vae = AutoencoderKL.from_pretrained(str(folder / "vae"))
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    model = DiffusionEngine(unet, Conditioner(encoders), vae, torch.cumprod(1 - betas, 0).float())
    return model.eval()
