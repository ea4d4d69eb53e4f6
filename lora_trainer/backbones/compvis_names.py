"""Layer names of the original (compvis / ldm / sgm) UNet, and their kohya LoRA names.

kohya sd-scripts names SD1/SD2 LoRA layers after the *diffusers* module path
(``lora_unet_down_blocks_0_attentions_0_...``) but SDXL layers after the *original* path
(``lora_unet_input_blocks_4_1_...``). The WebUI's model is in the original layout, so for SD1/SD2
we translate. The translation only renames; which blocks exist is read from the model itself.
"""

from __future__ import annotations

import re
from typing import Optional

_RESNET_PARTS = {"in_layers.2": "conv1", "out_layers.3": "conv2", "emb_layers.1": "time_emb_proj",
                 "skip_connection": "conv_shortcut"}
_TOP_LEVEL = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
              "input_blocks.0.0": "conv_in", "out.2": "conv_out", "label_emb.0.0": "add_embedding.linear_1",
              "label_emb.0.2": "add_embedding.linear_2"}


def _resnet_inner(rest: str) -> str:
    for old, new in _RESNET_PARTS.items():
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


def compvis_to_diffusers(path: str, num_res_blocks: int, block_kinds: dict) -> Optional[str]:
    """Diffusers module path for an original UNet module path, e.g. ``input_blocks.1.1.proj_in`` ->
    ``down_blocks.0.attentions.0.proj_in``.

    ``block_kinds`` maps ``"input_blocks.1.1"``-style prefixes to "resnet", "attention", "downsample" or "upsample"
    (class names differ between ldm, sgm and Forge, so the caller classifies them). Returns None for a path
    with no diffusers counterpart.
    """
    for old, new in _TOP_LEVEL.items():
        if path == old or path.startswith(old + "."):
            return new + path[len(old):]
    match = re.match(r"^(input_blocks|output_blocks|middle_block)\.(\d+)(?:\.(\d+))?(?:\.(.*))?$", path)
    if not match:
        return None
    group, index, sub, rest = match.group(1), int(match.group(2)), match.group(3), match.group(4) or ""
    if group == "middle_block":
        kind = block_kinds.get(f"middle_block.{index}")
        if kind == "attention":
            return _join("mid_block.attentions.0", rest)
        if kind == "resnet":
            return _join(f"mid_block.resnets.{index // 2}", _resnet_inner(rest))
        return None
    prefix = f"{group}.{index}.{sub}"
    kind = block_kinds.get(prefix)
    per_level = num_res_blocks + 1
    if group == "input_blocks":
        level, j = divmod(index - 1, per_level)
        if kind == "downsample":
            return _join(f"down_blocks.{level}.downsamplers.0", rest.replace("op", "conv", 1))
        target = "resnets" if kind == "resnet" else "attentions"
        inner = _resnet_inner(rest) if kind == "resnet" else rest
        return _join(f"down_blocks.{level}.{target}.{j}", inner) if kind in ("resnet", "attention") else None
    level, j = divmod(index, per_level)
    if kind == "upsample":
        return _join(f"up_blocks.{level}.upsamplers.0", rest)
    if kind == "resnet":
        return _join(f"up_blocks.{level}.resnets.{j}", _resnet_inner(rest))
    if kind == "attention":
        return _join(f"up_blocks.{level}.attentions.{j}", rest)
    return None


def _join(head: str, rest: str) -> str:
    return f"{head}.{rest}" if rest else head
