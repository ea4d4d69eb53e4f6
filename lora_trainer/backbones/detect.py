"""Which model a checkpoint holds, from its tensor names and shapes alone (no weights loaded).

Original-layout (LDM / sgm, what A1111 loads) checkpoints tell their family by their text encoders:

* SD1.x: ``cond_stage_model.transformer.`` (OpenAI CLIP-L, 768 wide);
* SD2.x: ``cond_stage_model.model.`` (OpenCLIP ViT-H, 1024 wide); 512-base and 768-v share one layout, so
  v-prediction is read from elsewhere (a ``v_pred`` key, the ``.yaml`` beside it, or the config);
* SDXL base: ``conditioner.embedders.0.transformer.`` (CLIP-L) and ``conditioner.embedders.1.model.`` (bigG);
  the refiner has only ``conditioner.embedders.0.model.`` (bigG).

Everything else gets one line saying what it is and what can be trained.
"""

from __future__ import annotations

from typing import Dict, Tuple

from ..errors import ModelError

Shapes = Dict[str, Tuple[int, ...]]

SUPPORTED = "SD1.x, SD2.x (512 or 768-v) or SDXL base"
UNET = "model.diffusion_model."
CONV_IN = UNET + "input_blocks.0.0.weight"
FAMILY_NAMES = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}
# The token embedding of each family's (first) text encoder: present in every complete checkpoint.
TEXT_ENCODER_KEYS = {
    "sd1": "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
    "sd2": "cond_stage_model.model.token_embedding.weight",
    "sdxl": "conditioner.embedders.1.model.token_embedding.weight",
}
_IN_CHANNELS = {9: "an inpainting model (9 input channels)", 8: "an instruct-pix2pix model (8 input channels)",
                5: "a depth-to-image model (5 input channels)", 7: "the x4 upscaler (7 input channels)"}


def _reject(where: str, what: str, todo: str = f"choose an {SUPPORTED} checkpoint") -> ModelError:
    return ModelError(f"{where}: {what} — {todo}")


def _not_trainable(where: str, what: str) -> ModelError:
    return _reject(where, f"{what}, which this trainer cannot train; it trains {SUPPORTED} checkpoints",
                   "choose one of those")


def detect_family(shapes: Shapes, where: str) -> str:
    """'sd1', 'sd2' or 'sdxl' for a text-to-image checkpoint in the original layout; one ModelError line otherwise."""
    keys = list(shapes)
    if not keys:
        raise _reject(where, "holds no tensors")

    def any_prefix(*prefixes: str) -> bool:
        return any(k.startswith(prefixes) for k in keys)

    if any_prefix("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lycoris_") or any(
            ".lora_down." in k or ".lora_A." in k or ".lora.down." in k or ".hada_w1" in k for k in keys):
        raise _reject(where, "this is a LoRA file, not a base model",
                      f"choose a full {SUPPORTED} checkpoint as the base model (LoRA files go in models/Lora)")
    if any(".double_blocks." in k or k.startswith("double_blocks.") for k in keys):
        raise _not_trainable(where, "a Flux model")
    if any_prefix(UNET + "joint_blocks.", UNET + "x_embedder.", "joint_blocks.", "text_encoders.clip_g."):
        raise _not_trainable(where, "a Stable Diffusion 3 model")
    if "edm_mean" in shapes or "edm_std" in shapes:
        raise _not_trainable(where, "Playground v2.5 (an SDXL-shaped model with an EDM noise schedule)")
    if any_prefix("down_blocks.1.0.channelwise.", "clip_txt_mapper."):
        raise _not_trainable(where, "a Stable Cascade model")
    if any_prefix("conditioner.embedders."):
        family = _sdxl_kind(any_prefix, where)
    elif any_prefix("cond_stage_model.model."):
        family = "sd2"
    elif any_prefix("cond_stage_model.transformer."):
        family = "sd1"
    else:
        family = ""
    _check_unet(shapes, any_prefix, where, family)
    if not family:
        raise _reject(where, "has a UNet but no text encoder (cond_stage_model.* or conditioner.*)",
                      f"choose a complete {SUPPORTED} checkpoint (UNet, VAE and text encoder)")
    if TEXT_ENCODER_KEYS[family] not in shapes:
        raise _reject(where, f"an incomplete {FAMILY_NAMES[family]} text encoder (no {TEXT_ENCODER_KEYS[family]})",
                      f"choose a complete {FAMILY_NAMES[family]} checkpoint")
    if not any_prefix("first_stage_model."):
        raise _reject(where, "has no VAE (first_stage_model.*)", f"choose a complete {FAMILY_NAMES[family]} checkpoint")
    return family


def _sdxl_kind(any_prefix, where: str) -> str:
    if any_prefix("conditioner.embedders.1.model."):
        if not any_prefix("conditioner.embedders.0.transformer."):
            raise _reject(where, "an SDXL-like model without its CLIP-L text encoder (conditioner.embedders.0)",
                          "choose a complete SDXL base checkpoint")
        return "sdxl"
    if any_prefix("conditioner.embedders.0.model."):
        raise _not_trainable(where, "the SDXL refiner (one OpenCLIP text encoder; it only refines images)")
    raise _not_trainable(where, "an sgm model whose text encoders are neither SDXL base's nor the refiner's")


def _check_unet(shapes: Shapes, any_prefix, where: str, family: str) -> None:
    if any_prefix(UNET):
        conv_in = shapes.get(CONV_IN)
        if conv_in is None or len(conv_in) != 4:
            raise _reject(where, "the UNet has no input layer (input_blocks.0.0) — not a complete SD checkpoint")
        if conv_in[1] != 4:
            raise _not_trainable(where, _IN_CHANNELS.get(conv_in[1], f"a UNet with {conv_in[1]} input channels "
                                                                      "(text-to-image models have 4)"))
        return
    if any_prefix("encoder.conv_in.", "decoder.conv_in.", "first_stage_model."):
        raise _reject(where, "a VAE file, not a full checkpoint", f"choose a full {SUPPORTED} checkpoint")
    if any_prefix("down_blocks.", "conv_in.", "time_embedding."):
        raise _reject(where, "a diffusers UNet weights file, not a full checkpoint",
                      "give the whole diffusers folder (with model_index.json) or an original-format checkpoint")
    if family:
        raise _reject(where, "a text encoder without a UNet (no model.diffusion_model.* weights)",
                      f"choose a complete {SUPPORTED} checkpoint")
    raise _reject(where, "not a Stable Diffusion checkpoint (no model.diffusion_model.* weights)")


def check_fits_config(shapes: Shapes, where: str, family: str, text_width: int, context_dim: int,
                      text_width_2: int = 0) -> None:
    """The checkpoint's text encoder and cross-attention widths match the config it is loaded with."""
    name = FAMILY_NAMES[family]
    width = shapes[TEXT_ENCODER_KEYS[family]][-1]
    expected = text_width_2 if family == "sdxl" else text_width
    if width != expected:
        raise _reject(where, f"its text encoder is {width} wide, the {name} model config says {expected}",
                      "pass the model_config that matches this checkpoint")
    attn_k = next((v for k, v in shapes.items() if k.startswith(UNET) and k.endswith("attn2.to_k.weight")), None)
    if attn_k is not None and attn_k[-1] != context_dim:
        raise _reject(where, f"its UNet cross-attention is {attn_k[-1]} wide, the {name} model config says "
                             f"{context_dim}", "pass the model_config that matches this checkpoint")
