"""Tiny SD2 and SDXL models with random weights: offline, fast on a CPU, the same from the same seed.

They have every part their family has, only narrow (as ``tiny.build_tiny_sd1`` for SD1):

* SD2: an OpenCLIP-H-like text encoder (transformers CLIPTextModel, gelu, its tokenizer pads with "!"), a UNet with
  linear projections, and (by default) v-prediction, like SD 2.x 768-v;
* SDXL: CLIP-L-like and bigG-like text encoders (the second with its projection, of a different width, as in
  SDXL), a UNet with ``addition_embed_type="text_time"`` and 1-2 transformer layers per block.

Both can be written as diffusers folders and as ORIGINAL-format checkpoints (SD2: ``cond_stage_model.model.*`` in
open_clip's layout; SDXL: sgm's ``conditioner.embedders.{0,1}.*``), with a diffusers config folder to load them by.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Dict, Union

import torch

from .diffusers_sd import DiffusersSDBackbone, te_module_path, text_model_of
from .diffusers_sdxl import DiffusersSDXLBackbone
from .family_configs import BUNDLED, tokenizer_pads
from .tiny import TINY_UNET, TINY_VAE, unet_to_ldm, vae_to_ldm
from .tokenizer_files import TOKENIZER_FILES, clip_tokenizer_dir

Backbone = Union[DiffusersSDBackbone, DiffusersSDXLBackbone]

# transformers' CLIPTextModel with the token ids of the real SD2 / SDXL configs (eos id 2 = "argmax" pooling).
_OPEN_CLIP_IDS = dict(bos_token_id=0, eos_token_id=2, pad_token_id=1)
TINY_SD2_TEXT_ENCODER: Dict[str, Any] = dict(
    vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
    max_position_embeddings=77, hidden_act="gelu", projection_dim=32, **_OPEN_CLIP_IDS)
TINY_SD2_UNET: Dict[str, Any] = dict(TINY_UNET, use_linear_projection=True)

TINY_SDXL_TEXT_ENCODER: Dict[str, Any] = dict(
    vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32, **_OPEN_CLIP_IDS)
# A different width from encoder 1, as in SDXL (768 / 1280): diffusers tells the two apart by it.
TINY_SDXL_TEXT_ENCODER_2: Dict[str, Any] = dict(
    vocab_size=49408, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
    max_position_embeddings=77, hidden_act="gelu", projection_dim=48, **_OPEN_CLIP_IDS)
TINY_TIME_EMBED = 8
TINY_SDXL_UNET: Dict[str, Any] = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2), cross_attention_dim=32 + 48, attention_head_dim=8, norm_num_groups=32,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=TINY_TIME_EMBED,
    projection_class_embeddings_input_dim=48 + 6 * TINY_TIME_EMBED,
)
TINY_SDXL_VAE: Dict[str, Any] = dict(TINY_VAE, scaling_factor=0.13025, force_upcast=True)


def bundled_scheduler_config(name: str) -> Dict[str, Any]:
    return json.loads((BUNDLED / name / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))


def _tokenizer(pad: str):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir(pad)))


def _frozen(*modules) -> None:
    for module in modules:
        module.eval().requires_grad_(False)


def build_tiny_sd2(seed: int = 0, v_prediction: bool = True) -> DiffusersSDBackbone:
    """A tiny SD2 (768-v by default) from ``seed``; the global RNG is left as it was. Frozen, eval mode."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**TINY_SD2_UNET)
        vae = AutoencoderKL(**TINY_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_SD2_TEXT_ENCODER))
    _frozen(unet, vae, text_encoder)
    scheduler = bundled_scheduler_config("sd2-v" if v_prediction else "sd2")
    return DiffusersSDBackbone(unet, vae, text_encoder, _tokenizer(tokenizer_pads("sd2")["tokenizer"]), scheduler,
                               family="sd2", prediction_type="v_prediction" if v_prediction else "epsilon",
                               model_name=f"tiny-sd2{'-v' if v_prediction else ''}-seed{seed}")


def build_tiny_sdxl(seed: int = 0) -> DiffusersSDXLBackbone:
    """A tiny SDXL from ``seed``; the global RNG is left as it was. Frozen, eval mode."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**TINY_SDXL_UNET)
        vae = AutoencoderKL(**TINY_SDXL_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_SDXL_TEXT_ENCODER))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**TINY_SDXL_TEXT_ENCODER_2))
    _frozen(unet, vae, text_encoder, text_encoder_2)
    pads = tokenizer_pads("sdxl")
    return DiffusersSDXLBackbone(unet, vae, text_encoder, text_encoder_2, _tokenizer(pads["tokenizer"]),
                                 _tokenizer(pads["tokenizer_2"]), bundled_scheduler_config("sdxl"),
                                 model_name=f"tiny-sdxl-seed{seed}")


# ---- diffusers folders ---------------------------------------------------------------------------------------------
def _pipeline(bb: Backbone):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    if bb.family == "sdxl":
        return StableDiffusionXLPipeline(vae=bb.vae, text_encoder=bb.text_encoder, text_encoder_2=bb.text_encoder_2,
                                         tokenizer=bb.tokenizer, tokenizer_2=bb.tokenizer_2, unet=bb.unet,
                                         scheduler=EulerDiscreteScheduler.from_config(bb.noise_scheduler_config),
                                         add_watermarker=False)
    return StableDiffusionPipeline(vae=bb.vae, text_encoder=bb.text_encoder, tokenizer=bb.tokenizer, unet=bb.unet,
                                   scheduler=DDIMScheduler.from_config(bb.noise_scheduler_config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _tokenizer_folders(bb: Backbone, folder: Path) -> None:
    """vocab.json + merges.txt with the right pad token (what ``from_pretrained`` and older transformers read)."""
    for name, pad in tokenizer_pads(bb.family).items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for file in TOKENIZER_FILES:
            shutil.copyfile(clip_tokenizer_dir(pad) / file, folder / name / file)


def save_tiny_folder(bb: Backbone, folder: Union[str, Path]) -> Path:
    """A diffusers folder (model_index.json, unet/, vae/, text_encoder(s)/, tokenizer(s)/, scheduler/)."""
    folder = Path(folder)
    _pipeline(bb).save_pretrained(str(folder), safe_serialization=True)
    for name in tokenizer_pads(bb.family):
        shutil.rmtree(folder / name, ignore_errors=True)
    _tokenizer_folders(bb, folder)
    return folder


def save_config_folder(bb: Backbone, folder: Union[str, Path]) -> Path:
    """The diffusers config folder of ``bb`` without weights: what ``from_single_file(config=...)`` needs."""
    folder = Path(folder)
    pipe = _pipeline(bb)
    pipe.save_config(str(folder))
    bb.unet.save_config(str(folder / "unet"))
    bb.vae.save_config(str(folder / "vae"))
    bb.text_encoder.config.save_pretrained(str(folder / "text_encoder"))
    if bb.family == "sdxl":
        bb.text_encoder_2.config.save_pretrained(str(folder / "text_encoder_2"))
    pipe.scheduler.save_config(str(folder / "scheduler"))
    _tokenizer_folders(bb, folder)
    return folder


# ---- original-format (LDM / sgm) checkpoints --------------------------------------------------------------------
def open_clip_state_dict(text_encoder, prefix: str, extra_layer: bool = False) -> Dict[str, torch.Tensor]:
    """A transformers CLIP text model in open_clip's layout (``token_embedding``, ``transformer.resblocks.N.attn
    .in_proj_weight``, ``ln_final``, ``text_projection`` [width, dim]). ``extra_layer``: append one more resblock, as
    SD2 checkpoints hold the 24th layer its conditioning skips."""
    model = text_model_of(text_encoder)
    out = {prefix + "token_embedding.weight": model.embeddings.token_embedding.weight,
           prefix + "positional_embedding": model.embeddings.position_embedding.weight,
           prefix + "ln_final.weight": model.final_layer_norm.weight,
           prefix + "ln_final.bias": model.final_layer_norm.bias}
    layers = list(model.encoder.layers)
    for i, layer in enumerate(layers + (layers[-1:] if extra_layer else [])):
        block, attn = f"{prefix}transformer.resblocks.{i}.", layer.self_attn
        out[block + "attn.in_proj_weight"] = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
        out[block + "attn.in_proj_bias"] = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
        for ours, theirs in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                             ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
            module = layer.get_submodule(ours)
            out[block + theirs + ".weight"] = module.weight
            out[block + theirs + ".bias"] = module.bias
    projection = getattr(text_encoder, "text_projection", None)
    width = model.embeddings.token_embedding.weight.shape[1]
    out[prefix + "text_projection"] = projection.weight.T if projection is not None else torch.eye(width)
    return out


def _hf_clip_state_dict(text_encoder, prefix: str) -> Dict[str, torch.Tensor]:
    out = {prefix + te_module_path(k): v for k, v in text_encoder.state_dict().items()
           if not k.endswith("position_ids")}
    out[prefix + "text_model.embeddings.position_ids"] = torch.arange(text_encoder.config.max_position_embeddings)[None]
    return out


def to_original_state_dict(bb: Backbone) -> Dict[str, torch.Tensor]:
    """One original-format state dict (copies of the weights): ``model.diffusion_model.``, ``first_stage_model.``
    and SD2's ``cond_stage_model.model.`` or SDXL's ``conditioner.embedders.{0,1}.``."""
    sd: Dict[str, torch.Tensor] = {}
    sd.update(unet_to_ldm(bb.unet.state_dict(), bb.unet.config))
    sd.update(vae_to_ldm(bb.vae.state_dict(), bb.vae.config))
    if bb.family == "sdxl":
        sd.update(_hf_clip_state_dict(bb.text_encoder, "conditioner.embedders.0.transformer."))
        sd.update(open_clip_state_dict(bb.text_encoder_2, "conditioner.embedders.1.model."))
    elif bb.family == "sd2":
        sd.update(open_clip_state_dict(bb.text_encoder, "cond_stage_model.model.", extra_layer=True))
    else:
        sd.update(_hf_clip_state_dict(bb.text_encoder, "cond_stage_model.transformer."))
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}


def save_tiny_single_file(bb: Backbone, path: Union[str, Path]) -> Path:
    """Write an original-format ``.safetensors`` (or ``.ckpt``) and ``<stem>_config/`` beside it (pass it as
    ``model_config``). Returns the config folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = to_original_state_dict(bb)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path), metadata={"format": "pt"})
    else:
        torch.save({"state_dict": sd}, str(path))
    return save_config_folder(bb, path.with_name(path.stem + "_config"))
