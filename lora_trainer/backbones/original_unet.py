"""What the WebUI backbones share: a UNet in the original (compvis) layout, as ldm, sgm and Forge build it.

It finds the LoRA layers and names them as kohya does for the family, switches gradient
checkpointing on safely, and renders samples with the fallback sampler when the host brings none.
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from ..errors import ModelError
from .base import Size, sdxl_time_ids
from .compvis_names import compvis_to_diffusers

logger = logging.getLogger("lora_trainer")

BLOCK_KINDS = {"ResBlock": "resnet", "SpatialTransformer": "attention", "Downsample": "downsample",
               "Upsample": "upsample"}
FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


def is_linear_like(layer: nn.Module) -> bool:
    """nn.Linear, or a layer that behaves like one (Forge builds its own Linear class, §2.3)."""
    if isinstance(layer, nn.Linear):
        return True
    weight = getattr(layer, "weight", None)
    return (isinstance(weight, torch.Tensor) and weight.dim() == 2 and hasattr(layer, "in_features")
            and hasattr(layer, "out_features"))


def block_kinds(unet: nn.Module) -> Dict[str, str]:
    """``"input_blocks.1.1"``-style paths of the UNet's blocks -> resnet / attention / downsample / upsample."""
    kinds = {}
    for group in ("input_blocks", "output_blocks"):
        for i, sequential in enumerate(getattr(unet, group)):
            for j, child in enumerate(sequential):
                kind = BLOCK_KINDS.get(type(child).__name__)
                if kind:
                    kinds[f"{group}.{i}.{j}"] = kind
    for i, child in enumerate(unet.middle_block):
        kind = BLOCK_KINDS.get(type(child).__name__)
        if kind:
            kinds[f"middle_block.{i}"] = kind
    return kinds


def count_res_blocks(unet: nn.Module) -> int:
    """Res blocks per level: input blocks before the first downsample, minus the stem."""
    for i, block in enumerate(unet.input_blocks):
        if any(type(child).__name__ == "Downsample" for child in block):
            return i - 1
    return max(1, len(unet.input_blocks) - 1)


def unet_lora_targets(unet: nn.Module, family: str, conv: bool) -> Dict[str, nn.Module]:
    """kohya names -> layers: diffusers-path names for SD1/SD2, original-path names for SDXL."""
    kinds = block_kinds(unet)
    res_blocks = count_res_blocks(unet)
    wanted = {"attention"} | ({"resnet", "downsample", "upsample"} if conv else set())
    targets: Dict[str, nn.Module] = {}
    for block_path, kind in kinds.items():
        if kind not in wanted:
            continue
        for sub_path, layer in unet.get_submodule(block_path).named_modules():
            if isinstance(layer, nn.Conv2d):
                if kind == "attention" and tuple(layer.kernel_size) != (1, 1):
                    continue
            elif not is_linear_like(layer):
                continue
            path = f"{block_path}.{sub_path}" if sub_path else block_path
            name = path if family == "sdxl" else compvis_to_diffusers(path, res_blocks, kinds)
            if name is not None:
                targets["lora_unet_" + name.replace(".", "_")] = layer
    return targets


def hf_clip_targets(transformer: nn.Module, prefix: str) -> Dict[str, nn.Module]:
    """Attention and MLP layers of an HF CLIP text model, named ``<prefix>text_model_encoder_layers_N_...``."""
    from .diffusers_sd import te_module_path

    return {prefix + te_module_path(path).replace(".", "_"): layer
            for path, layer in transformer.named_modules()
            if is_linear_like(layer) and (".self_attn." in path or ".mlp." in path)}


def sgm_size_batch(prompts: Sequence[str], sizes: Optional[Sequence[Size]], device) -> Dict[str, object]:
    """The batch sgm's ``GeneralConditioner`` reads (what A1111's ``get_learned_conditioning`` builds, but with
    each item's own original size, crop and target size instead of one size per call). Sizes are float32, as
    SDXL's reference embeds them."""
    rows = torch.tensor([sdxl_time_ids(s) for s in _sizes_for(prompts, sizes)], dtype=torch.float32, device=device)
    return {"txt": list(prompts), "original_size_as_tuple": rows[:, 0:2], "crop_coords_top_left": rows[:, 2:4],
            "target_size_as_tuple": rows[:, 4:6]}


def with_item_sizes(cond: Dict[str, torch.Tensor], sizes: Optional[Sequence[Size]], count: int,
                    embed: Callable[[torch.Tensor], torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Forge's SDXL conditioning with each item's six size numbers: its ``vector`` is [pooled | six embeddings of
    original h, w, crop top, left, target h, w] (``embed``: the model's own ``Timestep``), so the six embeddings
    made for one size per call are replaced by each item's own."""
    rows = [[embed(torch.tensor([float(v)])).reshape(-1) for v in sdxl_time_ids(s)]
            for s in _sizes_for(range(count), sizes)]
    flat = torch.stack([torch.cat(row) for row in rows])
    vector = cond["vector"]
    return dict(cond, vector=torch.cat([vector[:, :-flat.shape[1]], flat.to(vector)], dim=1))


def _sizes_for(items: Sequence, sizes: Optional[Sequence[Size]]) -> List[Size]:
    return list(sizes) if sizes else [(1024, 1024)] * len(items)


def unet_blocks(unet: nn.Module) -> List[nn.Module]:
    return list(unet.input_blocks) + [unet.middle_block] + list(unet.output_blocks)


def refuse_low_bit(unet: nn.Module, where: str) -> None:
    if any(p.dtype in FP8_DTYPES for p in unet.parameters()):
        raise ModelError(f"the UNet is stored in fp8 ({where}); turn that off and reload the checkpoint to train")


class SamplingFallback:
    """``generate`` through the host's renderer, else the plain DDIM sampler over this backbone."""

    render = None

    def generate(self, prompts: Sequence[str], negative_prompt: str, seed: int, steps: int,
                 guidance_scale: float, size: Size) -> List[PIL.Image.Image]:  # noqa: F821
        if self.render is not None:
            return self.render(prompts, negative_prompt, seed, steps, guidance_scale, size)
        from ..sampling import ddim_sample

        return ddim_sample(self, prompts, negative_prompt, seed, steps, guidance_scale, size)


def first_float_param(module: nn.Module) -> Optional[torch.Tensor]:
    return next((p for p in module.parameters() if p.is_floating_point()), None)
