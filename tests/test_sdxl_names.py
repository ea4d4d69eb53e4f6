"""kohya's SDXL names: diffusers UNet paths -> original (sgm) paths, the inverse of compvis_names."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lora_trainer.backbones.compvis_names import compvis_to_diffusers
from lora_trainer.backbones.sdxl_names import compvis_block_kinds, diffusers_to_compvis, unet_layout

# Names in kohya sd-scripts' SDXL LoRA files (sdxl_original_unet module paths).
GOLDEN_SDXL = [
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
    "lora_unet_input_blocks_4_1_proj_in",
    "lora_unet_input_blocks_8_1_transformer_blocks_9_ff_net_2",
    "lora_unet_middle_block_1_transformer_blocks_9_attn2_to_out_0",
    "lora_unet_output_blocks_0_1_proj_out",
    "lora_unet_output_blocks_5_1_transformer_blocks_1_attn2_to_v",
    "lora_unet_output_blocks_3_1_transformer_blocks_1_ff_net_0_proj",
]
GOLDEN_SDXL_CONV = [
    "lora_unet_input_blocks_1_0_in_layers_2",
    "lora_unet_input_blocks_1_0_emb_layers_1",
    "lora_unet_input_blocks_3_0_op",
    "lora_unet_input_blocks_4_0_skip_connection",
    "lora_unet_middle_block_2_out_layers_3",
    "lora_unet_output_blocks_2_2_conv",
    "lora_unet_output_blocks_5_2_conv",
    "lora_unet_output_blocks_8_0_skip_connection",
]


@pytest.fixture(scope="module")
def sdxl_meta():
    """SDXL base 1.0 as bundled, on the meta device (no memory), in the backbone."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from lora_trainer.backbones.diffusers_sdxl import DiffusersSDXLBackbone
    from lora_trainer.backbones.family_configs import BUNDLED
    from lora_trainer.backbones.tokenizer_files import clip_tokenizer_dir

    def load(part):
        return json.loads((BUNDLED / "sdxl" / part).read_text())

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(load("unet/config.json"))
        vae = AutoencoderKL.from_config(load("vae/config.json"))
        te = CLIPTextModel(CLIPTextConfig(**load("text_encoder/config.json")))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**load("text_encoder_2/config.json")))
    tok = CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir()))
    return DiffusersSDXLBackbone(unet, vae, te, te2, tok, tok, load("scheduler/scheduler_config.json"))


def _unet_paths(unet: nn.Module):
    return [path for path, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


@pytest.mark.parametrize("which", ["sdxl", "tiny_sdxl", "sd1"])
def test_round_trips_with_compvis_to_diffusers(which, sdxl_meta):
    """Every Linear/Conv2d of the UNet: diffusers -> original -> diffusers gives the path back."""
    if which == "sdxl":
        unet = sdxl_meta.unet
    else:
        from diffusers import UNet2DConditionModel

        from lora_trainer.backbones.tiny import TINY_UNET
        from lora_trainer.backbones.tiny_families import TINY_SDXL_UNET

        with torch.device("meta"):
            unet = UNet2DConditionModel(**(TINY_SDXL_UNET if which == "tiny_sdxl" else TINY_UNET))
    layers, down_attn, up_attn = unet_layout(unet.config)
    kinds = compvis_block_kinds(layers, down_attn, up_attn)
    paths = _unet_paths(unet)
    originals = {}
    for path in paths:
        original = diffusers_to_compvis(path, layers, up_attn)
        assert original is not None, path
        assert compvis_to_diffusers(original, layers, kinds) == path, (path, original)
        originals[original] = path
    assert len(originals) == len(paths)  # no two layers share an original name
    blocks = {".".join(o.split(".")[:3]) for o in originals if o.startswith(("input_blocks.", "output_blocks."))}
    assert blocks - {"input_blocks.0.0"} == {k for k in kinds if not k.startswith("middle_block")}


def test_sdxl_names_and_counts_match_kohya(sdxl_meta):
    attn = sdxl_meta.lora_targets()
    conv = sdxl_meta.lora_targets(conv=True)
    with_te = sdxl_meta.lora_targets(text_encoder=True)
    # kohya sd-scripts on SDXL: "create LoRA for U-Net: 722 modules", Text Encoder 1: 72, Text Encoder 2: 192.
    assert len(attn) == 722
    assert sum(k.startswith("lora_te1_text_model_encoder_layers_") for k in with_te) == 72
    assert sum(k.startswith("lora_te2_text_model_encoder_layers_") for k in with_te) == 192
    assert len(with_te) == 722 + 72 + 192
    assert set(GOLDEN_SDXL) <= set(attn)
    assert set(GOLDEN_SDXL_CONV) <= set(conv) - set(attn)
    assert all(k.startswith("lora_unet_") and "down_blocks" not in k and "up_blocks" not in k for k in conv)
    assert attn["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"] is \
        sdxl_meta.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    assert conv["lora_unet_output_blocks_2_2_conv"] is sdxl_meta.unet.up_blocks[0].upsamplers[0].conv
    assert "lora_te2_text_model_encoder_layers_31_mlp_fc2" in with_te
    assert not any("text_projection" in k for k in with_te)
