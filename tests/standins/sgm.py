"""A small SDXL model object as A1111 1.10 holds it (sgm ``DiffusionEngine`` + ``sd_models_xl.extend_sdxl``).

sgm (Stability's generative-models) is not on PyPI, so this rebuilds the interface from webui_internals.md §2.1:
- ``model.diffusion_model``: the original-layout UNet. We use ldm's real ``UNetModel`` (same block classes and
  names as sgm's) with sgm's ``label_emb`` (``Sequential(Sequential(Linear, SiLU, Linear))``) for the
  ``vector`` conditioning;
- ``conditioner``: sgm's ``GeneralConditioner`` interface: ``conditioner(batch)`` with a dict, each embedder reading
  ``batch[embedder.input_key]`` (under ``torch.no_grad()`` unless ``embedder.is_trainable``): on ``"txt"`` an HF
  CLIP (``FrozenCLIPEmbedder``, penultimate hidden states) and ``FrozenOpenCLIPEmbedder2`` on open_clip's real
  ``TextTransformer`` (fused ``nn.MultiheadAttention``, sequence-first as with A1111's open_clip 2.20: penultimate
  hidden states, and the last layer's pooled and projected output), then ``ConcatTimestepEmbedderND``-like size
  embedders on ``original_size_as_tuple``, ``crop_coords_top_left``, ``target_size_as_tuple`` (ldm's real
  ``timestep_embedding``, 8 wide per number instead of 256); 3-D outputs concatenate into ``crossattn``, 2-D ones
  into ``vector``: ``{"crossattn": [B, 77, d0 + d1], "vector": [B, pooled + 6 * 8]}``;
- ``get_learned_conditioning(batch)`` builds that dict as A1111's ``sd_models_xl.get_learned_conditioning`` does:
  one ``width``/``height`` per call from ``SdConditioning`` (default 1024), the crop from the settings (0, 0);
- ``apply_model(x, t, cond)`` -> ``diffusion_model(x, timesteps=t, context=crossattn, y=vector)``;
- ``encode_first_stage`` returns the already scaled latent and ``get_first_stage_encoding`` is the identity.
Not reproduced: aesthetic/refiner conditioning, A1111's prompt hijack (emphasis, long prompts).
"""

from __future__ import annotations

import contextlib
import types

import torch
from torch import nn


class SdConditioning(list):
    """A1111's prompt_parser.SdConditioning: prompts plus the image size they are for."""

    def __init__(self, prompts, width=1024, height=1024):
        super().__init__(prompts)
        self.width, self.height = width, height


class Embedder(nn.Module):
    input_key = "txt"

    def __init__(self, transformer, tokenizer):
        super().__init__()
        self.wrapped = nn.Module()
        self.wrapped.transformer = transformer
        self.tokenizer = tokenizer

    def forward(self, prompts):
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids
        out = self.wrapped.transformer(ids, output_hidden_states=True)
        return out.hidden_states[-2]


class OpenCLIPEmbedder2(nn.Module):
    """sgm's FrozenOpenCLIPEmbedder2 (layer "penultimate", legacy=False, always_return_pooled=True)."""
    input_key = "txt"

    def __init__(self, text_model):
        super().__init__()
        self.model = text_model

    def forward(self, prompts):
        import open_clip

        tokens = open_clip.tokenize(list(prompts))
        x = self.model.token_embedding(tokens) + self.model.positional_embedding
        x = x.permute(1, 0, 2)  # NLD -> LND
        blocks = self.model.transformer.resblocks
        for i, block in enumerate(blocks):
            if i == len(blocks) - 1:
                penultimate = x.permute(1, 0, 2)
            x = block(x, attn_mask=self.model.attn_mask)
        last = self.model.ln_final(x.permute(1, 0, 2))
        pooled = last[torch.arange(last.shape[0]), tokens.argmax(dim=-1)] @ self.model.text_projection
        return penultimate, pooled


def tiny_open_clip_text(width: int = 64, output_dim: int = 64) -> nn.Module:
    """open_clip's own text tower, two layers, built sequence-first as open_clip 2.20 (A1111's pin) builds it."""
    from open_clip.transformer import TextTransformer

    model = TextTransformer(width=width, heads=4, layers=2, mlp_ratio=2.0, output_dim=output_dim)
    model.transformer.batch_first = False
    for block in model.transformer.resblocks:
        block.attn.batch_first = False
    return model


class SizeEmbedder(nn.Module):
    """sgm's ConcatTimestepEmbedderND: each of the numbers [B, 2] embedded, then concatenated [B, 2 * outdim]."""

    def __init__(self, input_key: str, outdim: int = 8):
        super().__init__()
        self.input_key, self.outdim = input_key, outdim

    def forward(self, values):
        from ldm.modules.diffusionmodules.util import timestep_embedding

        return timestep_embedding(values.reshape(-1), self.outdim).reshape(values.shape[0], -1)


class Conditioner(nn.Module):
    def __init__(self, embedders):
        super().__init__()
        self.embedders = nn.ModuleList(embedders)
        self.sizes_seen = []  # (width, height) of each item's target size, per call

    def forward(self, batch, force_zero_embeddings=None):
        out = {"crossattn": [], "vector": []}
        for embedder in self.embedders:
            with contextlib.nullcontext() if getattr(embedder, "is_trainable", False) else torch.no_grad():
                outputs = embedder(batch[embedder.input_key])
            for emb in outputs if isinstance(outputs, tuple) else (outputs,):
                out["crossattn" if emb.dim() == 3 else "vector"].append(emb)
        self.sizes_seen += [(int(w), int(h)) for h, w in batch["target_size_as_tuple"].tolist()]
        return {key: torch.cat(parts, dim=-1) for key, parts in out.items()}


class DiffusionEngine(nn.Module):
    def __init__(self, unet, conditioner, vae, alphas_cumprod):
        super().__init__()
        self.model = nn.Module()
        self.model.diffusion_model = unet
        self.conditioner = conditioner
        self.first_stage_model = vae
        vae.regularization = types.SimpleNamespace(sample=True)  # sgm's DiagonalGaussianRegularizer(sample=True)
        self.scale_factor = 0.13025
        self.register_buffer("alphas_cumprod", alphas_cumprod)
        self.is_sdxl, self.is_sd1, self.is_sd2 = True, False, False
        self.sd_checkpoint_info = types.SimpleNamespace(name="tiny-xl.safetensors", model_name="tiny-xl")
        self.sd_model_hash = "feedbeef"
        self.parameterization = "eps"

    def get_learned_conditioning(self, batch):
        width, height = getattr(batch, "width", 1024) or 1024, getattr(batch, "height", 1024) or 1024
        size = torch.tensor([[height, width]], dtype=torch.float32).repeat(len(batch), 1)
        return self.conditioner({"txt": batch, "original_size_as_tuple": size,
                                 "crop_coords_top_left": torch.zeros(len(batch), 2), "target_size_as_tuple": size})

    def apply_model(self, x, t, cond):
        return self.model.diffusion_model(x, timesteps=t, context=cond["crossattn"], y=cond["vector"])

    @torch.no_grad()
    def encode_first_stage(self, x):
        # sgm's AutoencodingEngine: its DiagonalGaussianRegularizer samples the posterior unless ``sample`` is False
        posterior = self.first_stage_model.encode(x).latent_dist
        z = posterior.sample() if self.first_stage_model.regularization.sample else posterior.mode()
        return self.scale_factor * z

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
    config = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            vocab_size=49408, max_position_embeddings=77)
    encoders = [Embedder(CLIPTextModel(config), tokenizer), OpenCLIPEmbedder2(tiny_open_clip_text())]
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
    sizes = [SizeEmbedder(key) for key in ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")]
    model = DiffusionEngine(unet, Conditioner(encoders + sizes), vae, torch.cumprod(1 - betas, 0).float())
    return model.eval()
