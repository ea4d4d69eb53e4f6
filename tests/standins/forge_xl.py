"""Forge's SDXL model object (``backend/diffusion_engine/sdxl.py:StableDiffusionXL``), rebuilt from
webui_internals.md §2.3 on top of the SD1 Forge stand-in (tests/standins/forge.py) and the sgm one (sgm.py):

- ``forge_objects.unet.model.diffusion_model``: ldm's real ``UNetModel`` with sgm's ``label_emb`` for the
  ``vector`` conditioning (built as in sgm.py), every ``nn.Linear`` swapped for ``ForgeLinear``, every parameter an
  inference tensor;
- ``forge_objects.clip.cond_stage_model``: a ``JointTextEncoder``-like ModuleDict with ``clip_l`` and ``clip_g``, each
  an ``IntegratedCLIP``-like module holding an HF ``CLIPTextModel`` at ``.transformer`` (Forge's CLIP-G is HF too);
  ``clip_g`` also holds the ``text_projection`` for the pooled output. Their Linear layers are ForgeLinear as well
  (``using_forge_operations`` covers HF CLIP);
- ``embedder``: Forge's ``Timestep`` module (ldm's real ``timestep_embedding``; 8 wide here, 256 in Forge);
- ``get_learned_conditioning(prompt)`` is ``@torch.inference_mode()`` and, as Forge's, reads
  ``getattr(prompt, 'width', 1024)`` / ``height`` for the size conditioning and returns ``{"crossattn", "vector"}``
  (penultimate hidden states of both encoders; pooled CLIP-G output + ``embedder`` of each of height, width,
  crop top/left (0, 0), target height/width);
- ``encode_first_stage`` returns the scaled latent under inference mode.
Not reproduced: the text-processing engines (emphasis, long prompts, clip skip), the memory manager.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from standins.forge import (
    ForgeObjects,
    ForgeVAE,
    Patcher,
    _forge_transformer_blocks,
    _swap_linears,
    _to_inference,
    engine_flags,
)
from standins.sgm import SdConditioning, build_sdxl_like

__all__ = ["ForgeXLModel", "SdConditioning", "load_forge_xl_model"]

TIME_EMBED = 8  # Forge: Timestep(256); the tiny UNet's label_emb takes pooled + 6 x 8


class Timestep(nn.Module):
    """Forge's ``backend/nn/unet.py:Timestep``."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t):
        from ldm.modules.diffusionmodules.util import timestep_embedding

        return timestep_embedding(t, self.dim)


class ForgeXLModel:
    """The attributes of Forge's ``StableDiffusionXL`` the trainer uses."""

    def __init__(self, unet_patcher, clip, vae, tokenizer, scale_factor: float):
        self.forge_objects = ForgeObjects(unet_patcher, clip, ForgeVAE(vae))
        self.forge_objects_original = self.forge_objects.shallow_copy()
        self.current_lora_hash = "[['x.safetensors', 1.0, 1.0, False]]"
        engine_flags(self, "SDXL")
        self.first_stage_model = self.cond_stage_model = None  # as in Forge: no .model, no ldm parts
        self.sd_checkpoint_info = types.SimpleNamespace(name="tiny-xl.safetensors", model_name="tiny-xl",
                                                        shorthash="beef")
        self.tokenizer, self.vae, self.scale_factor = tokenizer, vae, scale_factor
        self.sizes_seen = []
        self.embedder = Timestep(TIME_EMBED)

    @torch.inference_mode()
    def get_learned_conditioning(self, prompt):
        encoders = self.forge_objects.clip.cond_stage_model
        ids = self.tokenizer(list(prompt), padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids
        out_l = encoders.clip_l.transformer(ids, output_hidden_states=True)
        out_g = encoders.clip_g.transformer(ids, output_hidden_states=True)
        pooled = out_g.pooler_output @ encoders.clip_g.text_projection
        width = getattr(prompt, "width", 1024) or 1024
        height = getattr(prompt, "height", 1024) or 1024
        self.sizes_seen.append((width, height))
        numbers = [height, width, 0, 0, height, width]  # original, crop top/left, target (Forge: target = original)
        flat = torch.cat([self.embedder(torch.Tensor([n])) for n in numbers], dim=1)
        return {"crossattn": torch.cat([out_l.hidden_states[-2], out_g.hidden_states[-2]], dim=2),
                "vector": torch.cat([pooled, flat.repeat(pooled.shape[0], 1).to(pooled)], dim=1)}

    @torch.inference_mode()
    def encode_first_stage(self, x):
        return self.forge_objects.vae.encode_posterior(x) * self.scale_factor

    @torch.inference_mode()
    def decode_first_stage(self, z):
        return self.vae.decode(z / self.scale_factor).sample


def _integrated_clip(transformer: nn.Module, projection_dim: int = 0) -> nn.Module:
    module = nn.Module()
    module.transformer = transformer
    if projection_dim:
        width = transformer.config.hidden_size
        module.text_projection = nn.Parameter(torch.randn(width, projection_dim) / width ** 0.5)
    return module


def load_forge_xl_model(tiny_files: dict, seed: int = 0) -> ForgeXLModel:
    """A tiny SDXL as Forge would hold it (the UNet, VAE and CLIP-L of sgm.build_sdxl_like(tiny_files, seed))."""
    from transformers import CLIPTextConfig, CLIPTextModel

    sgm_model = build_sdxl_like(tiny_files, seed)
    unet = sgm_model.model.diffusion_model
    first = sgm_model.conditioner.embedders[0].wrapped.transformer
    torch.manual_seed(seed + 1)  # Forge's CLIP-G is an HF CLIPTextModel (A1111's is open_clip)
    second = CLIPTextModel(CLIPTextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, vocab_size=49408, max_position_embeddings=77))
    joint = nn.ModuleDict({"clip_l": _integrated_clip(first),
                           "clip_g": _integrated_clip(second, second.config.hidden_size)})
    _forge_transformer_blocks(unet)
    for module in (unet, joint):
        module.eval()
        _swap_linears(module)
        _to_inference(module)
    kmodel = nn.Module()
    kmodel.diffusion_model = unet
    kmodel.predictor = types.SimpleNamespace(alphas_cumprod=sgm_model.alphas_cumprod.clone(),
                                             prediction_type="epsilon")
    kmodel.storage_dtype = kmodel.computation_dtype = torch.float32
    clip = types.SimpleNamespace(cond_stage_model=joint, patcher=Patcher(joint))
    tokenizer = sgm_model.conditioner.embedders[0].tokenizer
    return ForgeXLModel(Patcher(kmodel), clip, sgm_model.first_stage_model, tokenizer, sgm_model.scale_factor)
