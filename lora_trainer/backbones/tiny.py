"""A tiny SD1-architecture model with random weights: offline, fast on a CPU, the same from the same seed.

Used by ``python -m lora_trainer demo`` and the tests. It has every part of SD1 (UNet with cross-attention,
an 8x VAE with 4 latent channels, a CLIP text encoder with the real 49408-token vocabulary), only narrow.
Besides a diffusers folder, it can be written as an ORIGINAL-format (LDM / A1111) checkpoint, with the
``<name>.yaml`` that A1111 reads beside a checkpoint and a diffusers config folder for the standalone loader.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Tuple, Union

import torch

from .diffusers_sd import DiffusersSDBackbone, te_module_path
from .family_configs import BUNDLED
from .tokenizer_files import TOKENIZER_FILES, clip_tokenizer_dir

log = logging.getLogger("lora_trainer")

TINY_UNET: Dict[str, Any] = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
)
# Four levels (three 2x downsamplings) = SD's 8x latent, which A1111 assumes.
TINY_VAE: Dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32, 64, 64), layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    sample_size=64, scaling_factor=0.18215,
)
TINY_TEXT_ENCODER: Dict[str, Any] = dict(
    vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32,
    bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
)

Source = Union[DiffusersSDBackbone, int, str, Path]


def sd1_scheduler_config() -> Dict[str, Any]:
    return json.loads((BUNDLED / "sd1" / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))


def build_tiny_sd1(seed: int = 0) -> DiffusersSDBackbone:
    """The tiny model with weights drawn from ``seed`` (the global RNG is left as it was); frozen, eval mode."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**TINY_UNET)
        vae = AutoencoderKL(**TINY_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_TEXT_ENCODER))
    for module in (unet, vae, text_encoder):
        module.eval().requires_grad_(False)
    tokenizer = CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir()))
    return DiffusersSDBackbone(unet, vae, text_encoder, tokenizer, sd1_scheduler_config(), family="sd1",
                               prediction_type="epsilon", model_name=f"tiny-sd1-seed{seed}")


def _backbone(source: Source) -> DiffusersSDBackbone:
    if isinstance(source, DiffusersSDBackbone):
        return source
    if isinstance(source, int):
        return build_tiny_sd1(source)
    from .single_file import load_backbone_from_path
    return load_backbone_from_path(str(source))


def _pipeline(bb: DiffusersSDBackbone):
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    return StableDiffusionPipeline(vae=bb.vae, text_encoder=bb.text_encoder, tokenizer=bb.tokenizer, unet=bb.unet,
                                   scheduler=PNDMScheduler.from_config(bb.noise_scheduler_config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def save_tiny_sd1(backbone_or_seed: Union[DiffusersSDBackbone, int], folder: Union[str, Path]) -> Path:
    """Write a diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)."""
    folder = Path(folder)
    _pipeline(_backbone(backbone_or_seed)).save_pretrained(str(folder), safe_serialization=True)
    return folder


def _copy_tokenizer(bb: DiffusersSDBackbone, folder: Path) -> None:
    """vocab.json + merges.txt (what older transformers, like A1111's 4.30, read); the tiny model's tokenizer
    is always the generated one. transformers 5 ``save_pretrained`` would write only tokenizer.json."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copyfile(clip_tokenizer_dir() / name, folder / name)


def save_config_folder(bb: DiffusersSDBackbone, folder: Union[str, Path]) -> Path:
    """The diffusers config folder of ``bb`` without weights: what ``from_single_file(config=...)`` needs."""
    folder = Path(folder)
    _pipeline(bb).save_config(str(folder))  # model_index.json
    bb.unet.save_config(str(folder / "unet"))
    bb.vae.save_config(str(folder / "vae"))
    bb.text_encoder.config.save_pretrained(str(folder / "text_encoder"))
    _copy_tokenizer(bb, folder / "tokenizer")
    from diffusers import PNDMScheduler
    PNDMScheduler.from_config(bb.noise_scheduler_config).save_config(str(folder / "scheduler"))
    return folder


def save_tiny_sd1_single_file(folder_or_seed: Source, path: Union[str, Path]) -> Path:
    """Write an original-format (LDM) checkpoint: ``.safetensors``, or ``.ckpt`` as ``{"state_dict": ...}``.

    Next to it: ``<stem>_config/`` (diffusers configs + tokenizer: pass it as ``model_config``) and
    ``<stem>.yaml`` (the LDM config A1111 reads beside a checkpoint). Returns the config folder.
    """
    path = Path(path)
    bb = _backbone(folder_or_seed)
    sd = diffusers_to_ldm(bb)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(sd, str(path), metadata={"format": "pt"})
    else:
        torch.save({"state_dict": sd}, str(path))
    config_dir = save_config_folder(bb, path.with_name(path.stem + "_config"))
    # A1111 builds the text encoder with ``CLIPTextModel.from_pretrained(version)`` (config only, weights from
    # the checkpoint) and ``CLIPTokenizer.from_pretrained(version)``: give it a folder holding both.
    _copy_tokenizer(bb, config_dir / "text_encoder")
    path.with_suffix(".yaml").write_text(ldm_yaml(bb, str((config_dir / "text_encoder").resolve())), encoding="utf-8")
    return config_dir


# ---- diffusers -> original (LDM) key names --------------------------------------------------------------------
# The inverse of diffusers' convert_ldm_*_checkpoint, derived from the config so it fits any SD1-like layout.

_UNET_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
                ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
_VAE_ATTENTION = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]


def _unet_prefixes(config: Any) -> List[Tuple[str, str]]:
    levels = len(config.block_out_channels)
    n = config.layers_per_block
    pairs = [("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2."),
             ("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2."),
             ("mid_block.resnets.0.", "middle_block.0."), ("mid_block.attentions.0.", "middle_block.1."),
             ("mid_block.resnets.1.", "middle_block.2."),
             ("add_embedding.linear_1.", "label_emb.0.0."), ("add_embedding.linear_2.", "label_emb.0.2.")]  # SDXL
    for i in range(levels):
        for j in range(n):
            pairs.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{i * (n + 1) + j + 1}.0."))
            pairs.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{i * (n + 1) + j + 1}.1."))
        if i < levels - 1:
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * (n + 1)}.0.op."))
        has_attention = "CrossAttn" in config.up_block_types[i]
        for j in range(n + 1):
            pairs.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{i * (n + 1) + j}.0."))
            pairs.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{i * (n + 1) + j}.1."))
        if i < levels - 1:
            pairs.append((f"up_blocks.{i}.upsamplers.0.",
                          f"output_blocks.{i * (n + 1) + n}.{2 if has_attention else 1}."))
    return pairs


def _replace_prefix(key: str, pairs: List[Tuple[str, str]]) -> str:
    for old, new in pairs:
        if key.startswith(old):
            return new + key[len(old):]
    raise KeyError(f"no LDM name for {key}")


def unet_to_ldm(state_dict: Dict[str, torch.Tensor], config: Any) -> Dict[str, torch.Tensor]:
    pairs = _unet_prefixes(config)
    out = {}
    for key, value in state_dict.items():
        new = key
        if ".resnets." in key:
            for old, repl in _UNET_RESNET:
                new = re.sub(rf"\.{re.escape(old)}\.", f".{repl}.", new)
        out["model.diffusion_model." + _replace_prefix(new, pairs)] = value
    return out


def vae_to_ldm(state_dict: Dict[str, torch.Tensor], config: Any) -> Dict[str, torch.Tensor]:
    levels = len(config.block_out_channels)
    pairs = [("encoder.conv_norm_out.", "encoder.norm_out."), ("decoder.conv_norm_out.", "decoder.norm_out.")]
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.mid_block.resnets.{k}.", f"{part}.mid.block_{k + 1}.") for k in range(2)]
        pairs.append((f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1."))
    for i in range(levels):
        pairs.append((f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block."))
        pairs.append((f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."))
        pairs.append((f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{levels - 1 - i}.block."))
        pairs.append((f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{levels - 1 - i}.upsample."))
    out = {}
    for key, value in state_dict.items():
        new = key.replace(".conv_shortcut.", ".nin_shortcut.")
        if ".attentions." in key:
            for old, repl in _VAE_ATTENTION:
                new = new.replace(f".{old}.", f".{repl}.")
            if value.ndim == 2:  # diffusers Linear -> LDM 1x1 conv
                value = value[:, :, None, None]
        if any(new.startswith(old) for old, _ in pairs):
            new = _replace_prefix(new, pairs)
        out["first_stage_model." + new] = value.contiguous()
    return out


def text_encoder_to_ldm(state_dict: Dict[str, torch.Tensor], max_positions: int = 77) -> Dict[str, torch.Tensor]:
    out = {"cond_stage_model.transformer." + te_module_path(k): v for k, v in state_dict.items()
           if not k.endswith("position_ids")}
    # Original checkpoints carry this buffer (transformers < 4.31 saved it).
    out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(max_positions)[None]
    return out


def diffusers_to_ldm(bb: DiffusersSDBackbone) -> Dict[str, torch.Tensor]:
    """One original-format state dict (copies of the weights) from the backbone's modules."""
    sd: Dict[str, torch.Tensor] = {}
    sd.update(unet_to_ldm(bb.unet.state_dict(), bb.unet.config))
    sd.update(vae_to_ldm(bb.vae.state_dict(), bb.vae.config))
    sd.update(text_encoder_to_ldm(bb.text_encoder.state_dict(), bb.text_encoder.config.max_position_embeddings))
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}


def ldm_unet_params(config: Any) -> Dict[str, Any]:
    """ldm ``UNetModel`` arguments equal to a diffusers UNet2DConditionModel config (SD1 layout)."""
    base = config.block_out_channels[0]
    heads = config.attention_head_dim
    return dict(
        image_size=32, in_channels=config.in_channels, out_channels=config.out_channels, model_channels=base,
        attention_resolutions=[2 ** i for i, t in enumerate(config.down_block_types) if "CrossAttn" in t],
        num_res_blocks=config.layers_per_block, channel_mult=[c // base for c in config.block_out_channels],
        num_heads=heads if isinstance(heads, int) else heads[0], use_spatial_transformer=True,
        transformer_depth=1, context_dim=config.cross_attention_dim, use_checkpoint=False, legacy=False,
        use_linear_in_transformer=bool(config.use_linear_projection),
    )


def ldm_vae_params(config: Any) -> Dict[str, Any]:
    base = config.block_out_channels[0]
    return dict(double_z=True, z_channels=config.latent_channels, resolution=256, in_channels=config.in_channels,
                out_ch=config.out_channels, ch=base, ch_mult=[c // base for c in config.block_out_channels],
                num_res_blocks=config.layers_per_block, attn_resolutions=[], dropout=0.0)


def ldm_yaml(bb: DiffusersSDBackbone, clip_version: str) -> str:
    """A1111's ``<checkpoint>.yaml``: v1-inference.yaml with this model's sizes."""
    import yaml

    s = bb.noise_scheduler_config
    config = {"model": {
        "base_learning_rate": 1.0e-04,
        "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
        "params": {
            "linear_start": s["beta_start"], "linear_end": s["beta_end"], "num_timesteps_cond": 1,
            "log_every_t": 200, "timesteps": s["num_train_timesteps"], "first_stage_key": "jpg",
            "cond_stage_key": "txt", "image_size": bb.unet.config.sample_size, "channels": bb.unet.config.in_channels,
            "cond_stage_trainable": False, "conditioning_key": "crossattn", "monitor": "val/loss_simple_ema",
            "scale_factor": bb.vae.config.scaling_factor, "use_ema": False,
            **({"parameterization": "v"} if bb.prediction_type == "v_prediction" else {}),
            "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                            "params": ldm_unet_params(bb.unet.config)},
            "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
                "embed_dim": bb.vae.config.latent_channels, "monitor": "val/rec_loss",
                "ddconfig": ldm_vae_params(bb.vae.config), "lossconfig": {"target": "torch.nn.Identity"}}},
            "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
                                  "params": {"version": clip_version}},
        },
    }}
    return yaml.safe_dump(config, sort_keys=False)
