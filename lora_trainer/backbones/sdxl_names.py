"""Original (sgm) UNet module paths for diffusers UNet paths: the names kohya gives SDXL LoRA layers.

kohya sd-scripts names SDXL UNet layers after the ORIGINAL module path
(``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``), while a diffusers UNet calls the same
layer ``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``. This is the inverse of
``compvis_names.compvis_to_diffusers``; both derive the block numbering from the layout
(``layers_per_block`` and which up levels have attention), so they fit any SDXL-like UNet.
"""

from __future__ import annotations

import re
from typing import Dict, Optional, Sequence

_RESNET_PARTS = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                 "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_TOP_LEVEL = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
              "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
              "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)(?:\.(.*))?$")
_MID = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)(?:\.(.*))?$")


def _join(head: str, rest: str) -> str:
    return f"{head}.{rest}" if rest else head


def _resnet_inner(rest: str) -> str:
    for new, old in _RESNET_PARTS.items():
        if rest == new or rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


def diffusers_to_compvis(path: str, layers_per_block: int, up_has_attention: Sequence[bool]) -> Optional[str]:
    """The original path of a diffusers UNet module path, e.g. ``down_blocks.1.attentions.0.proj_in`` ->
    ``input_blocks.4.1.proj_in`` (with 2 layers per block). ``up_has_attention[i]``: whether ``up_blocks.i`` is a
    cross-attention block (its upsampler then sits at index 2 of its last output block, else at 1).
    None for a path with no original counterpart."""
    for new, old in _TOP_LEVEL.items():
        if path == new or path.startswith(new + "."):
            return old + path[len(new):]
    per_level = layers_per_block + 1
    match = _MID.match(path)
    if match:
        kind, index, rest = match.group(1), int(match.group(2)), match.group(3) or ""
        if kind == "attentions":
            return _join("middle_block.1", rest)
        return _join(f"middle_block.{2 * index}", _resnet_inner(rest))
    match = _BLOCK.match(path)
    if not match:
        return None
    group, level, kind, j, rest = (match.group(1), int(match.group(2)), match.group(3), int(match.group(4)),
                                   match.group(5) or "")
    if group == "down_blocks":
        if kind == "downsamplers":
            return _join(f"input_blocks.{(level + 1) * per_level}.0", _rename_first(rest, "conv", "op"))
        block = f"input_blocks.{level * per_level + j + 1}"
    else:
        if kind == "upsamplers":
            return _join(f"output_blocks.{level * per_level + layers_per_block}."
                         f"{2 if up_has_attention[level] else 1}", rest)
        block = f"output_blocks.{level * per_level + j}"
    if kind == "resnets":
        return _join(f"{block}.0", _resnet_inner(rest))
    if kind == "attentions":
        return _join(f"{block}.1", rest)
    return None


def _rename_first(rest: str, old: str, new: str) -> str:
    return new + rest[len(old):] if rest == old or rest.startswith(old + ".") else rest


def compvis_block_kinds(layers_per_block: int, down_has_attention: Sequence[bool],
                        up_has_attention: Sequence[bool]) -> Dict[str, str]:
    """What an original UNet with this layout holds at each ``input_blocks.i.j``-style prefix (resnet, attention,
    downsample, upsample): the ``block_kinds`` that ``compvis_to_diffusers`` reads from a live model."""
    kinds: Dict[str, str] = {}
    levels, per_level = len(down_has_attention), layers_per_block + 1
    for level in range(levels):
        for j in range(layers_per_block):
            index = level * per_level + j + 1
            kinds[f"input_blocks.{index}.0"] = "resnet"
            if down_has_attention[level]:
                kinds[f"input_blocks.{index}.1"] = "attention"
        if level < levels - 1:
            kinds[f"input_blocks.{(level + 1) * per_level}.0"] = "downsample"
    kinds.update({"middle_block.0": "resnet", "middle_block.1": "attention", "middle_block.2": "resnet"})
    for level in range(levels):
        for j in range(per_level):
            index = level * per_level + j
            kinds[f"output_blocks.{index}.0"] = "resnet"
            if up_has_attention[level]:
                kinds[f"output_blocks.{index}.1"] = "attention"
        if level < levels - 1:
            kinds[f"output_blocks.{level * per_level + layers_per_block}.{2 if up_has_attention[level] else 1}"] = \
                "upsample"
    return kinds


def unet_layout(config) -> tuple:
    """(layers_per_block, down_has_attention, up_has_attention) of a diffusers ``UNet2DConditionModel`` config."""
    return (int(config.layers_per_block), [("CrossAttn" in t) for t in config.down_block_types],
            [("CrossAttn" in t) for t in config.up_block_types])
