"""The model AUTOMATIC1111 has loaded (``shared.sd_model``), trained in place through its own methods.

Nothing here imports the WebUI: the glue in ``scripts/`` hands over the model object and, where
needed, the WebUI's ``networks`` module and a renderer. SD1/SD2 are ldm ``LatentDiffusion``
objects, SDXL an sgm ``DiffusionEngine`` (webui_internals.md §2.1); the WebUI's own
``get_learned_conditioning``, ``encode_first_stage`` and ``apply_model`` do the work, so clip skip,
emphasis and long prompts behave as in txt2img.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch
from torch import nn

from ..errors import ModelError
from .base import FrozenModels, Size
from .checkpointing import checkpointed, native_checkpointing_off
from .compvis_names import compvis_to_diffusers
from .diffusers_sd import te_module_path

logger = logging.getLogger("lora_trainer")

_BLOCK_KINDS = {"ResBlock": "resnet", "SpatialTransformer": "attention", "Downsample": "downsample",
                "Upsample": "upsample"}
_FP8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))

Renderer = Callable[[Sequence[str], str, int, int, float, Size], List["PIL.Image.Image"]]  # noqa: F821


def detect_family(sd_model) -> str:
    if getattr(sd_model, "is_sdxl", False) or hasattr(sd_model, "conditioner"):
        return "sdxl"
    if getattr(sd_model, "is_sd3", False):
        raise ModelError("the loaded checkpoint is SD3; training supports SD1, SD2 and SDXL checkpoints")
    cond = sd_model.cond_stage_model
    if getattr(sd_model, "is_sd2", False) or hasattr(getattr(cond, "wrapped", cond), "model"):
        return "sd2"
    return "sd1"


def unmerge_webui_loras(sd_model: nn.Module, networks) -> int:
    """Undo LoRAs A1111 merged into the weights (it merges in place and restores lazily, §3.4).

    With ``loaded_networks`` empty and every backup restored, the weights are the checkpoint's again
    and the next generation re-merges whatever its prompt asks for. Returns the layers restored.
    """
    if networks is None:
        return 0
    networks.loaded_networks.clear()
    restored = 0
    with torch.no_grad():
        for module in sd_model.modules():
            if (getattr(module, "network_weights_backup", None) is not None
                    or getattr(module, "network_bias_backup", None) is not None):
                networks.network_restore_weights_from_backup(module)
                networks.network_reset_cached_weight(module)
                restored += 1
    if restored:
        logger.info("restored %d layers that had a LoRA merged in", restored)
    return restored


class A1111Backbone:
    def __init__(self, sd_model, device: Optional[torch.device] = None, networks=None,
                 render: Optional[Renderer] = None, lowvram: bool = False):
        if lowvram:
            raise ModelError("the WebUI runs with --lowvram, which moves every UNet block to the CPU between "
                             "layers; training needs --medvram or no flag. Restart the WebUI without --lowvram")
        self.sd_model = sd_model
        self.unet: nn.Module = sd_model.model.diffusion_model
        self.family = detect_family(sd_model)
        if self.family != "sd1":
            raise ModelError(f"the loaded checkpoint is {self.family.upper()}; training on the WebUI's model "
                             "supports SD1 so far. Load an SD1.x checkpoint")
        floating = [p for p in self.unet.parameters() if p.is_floating_point()]
        if any(p.dtype in _FP8 for p in floating):
            raise ModelError("the UNet is stored in fp8 (Settings > Optimizations > FP8 weight); turn it off "
                             "and reload the checkpoint to train")
        self.prediction_type = "v_prediction" if getattr(sd_model, "parameterization", "eps") == "v" else "epsilon"
        schedule = getattr(sd_model, "alphas_cumprod_original", None)
        self.alphas_cumprod = (schedule if schedule is not None else sd_model.alphas_cumprod).detach().float().cpu()
        self.device = torch.device(device) if device is not None else floating[0].device
        self.dtype = floating[0].dtype
        self.vae_dtype = next(sd_model.first_stage_model.parameters()).dtype
        info = getattr(sd_model, "sd_checkpoint_info", None)
        self.model_name = getattr(info, "model_name", None) or getattr(info, "name", None) or "webui-model"
        self.model_hash = getattr(sd_model, "sd_model_hash", None) or getattr(info, "shorthash", None)
        self.networks = networks
        self.render = render
        self._num_res_blocks = _count_res_blocks(self.unet)

    # -- the protocol ------------------------------------------------------------------------------
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            encoded = self.sd_model.encode_first_stage(pixels.to(self.device, self.vae_dtype))
            if hasattr(encoded, "mode"):  # ldm returns the posterior: take its mean, so latents are deterministic
                return encoded.mode() * self.sd_model.scale_factor
            return self.sd_model.get_first_stage_encoding(encoded)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.sd_model.decode_first_stage(latents.to(self.device, self.vae_dtype))

    def encode_prompts(self, prompts: Sequence[str], sizes: Optional[Sequence[Size]] = None):
        return self.sd_model.get_learned_conditioning(list(prompts))

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond) -> torch.Tensor:
        return self.sd_model.apply_model(noisy_latents, timesteps.to(self.device), cond)

    def lora_targets(self, conv: bool = False, text_encoder: bool = False) -> Dict[str, nn.Module]:
        kinds = self._block_kinds()
        wanted = {"attention"} | ({"resnet", "downsample", "upsample"} if conv else set())
        targets: Dict[str, nn.Module] = {}
        for block_path, kind in kinds.items():
            if kind not in wanted:
                continue
            block = self.unet.get_submodule(block_path)
            for sub_path, layer in block.named_modules():
                if not isinstance(layer, (nn.Linear, nn.Conv2d)):
                    continue
                if kind == "attention" and isinstance(layer, nn.Conv2d) and tuple(layer.kernel_size) != (1, 1):
                    continue
                path = f"{block_path}.{sub_path}" if sub_path else block_path
                name = compvis_to_diffusers(path, self._num_res_blocks, kinds)
                if name is None:
                    continue
                targets["lora_unet_" + name.replace(".", "_")] = layer
        if text_encoder:
            targets.update(self._text_encoder_targets())
        return targets

    @contextlib.contextmanager
    def borrow(self, gradient_checkpointing: bool = False) -> Iterator[None]:
        unmerge_webui_loras(self.sd_model, self.networks)
        blocks = self._unet_blocks() if gradient_checkpointing else []
        with FrozenModels(self.sd_model), native_checkpointing_off(self.sd_model), checkpointed(blocks):
            yield

    def generate(self, prompts: Sequence[str], negative_prompt: str, seed: int, steps: int,
                 guidance_scale: float, size: Size):
        if self.render is not None:
            return self.render(prompts, negative_prompt, seed, steps, guidance_scale, size)
        from ..sampling import ddim_sample

        return ddim_sample(self, prompts, negative_prompt, seed, steps, guidance_scale, size)

    # -- helpers -----------------------------------------------------------------------------------
    def _block_kinds(self) -> Dict[str, str]:
        kinds = {}
        for group in ("input_blocks", "output_blocks"):
            for i, sequential in enumerate(getattr(self.unet, group)):
                for j, child in enumerate(sequential):
                    kind = _BLOCK_KINDS.get(type(child).__name__)
                    if kind:
                        kinds[f"{group}.{i}.{j}"] = kind
        for i, child in enumerate(self.unet.middle_block):
            kind = _BLOCK_KINDS.get(type(child).__name__)
            if kind:
                kinds[f"middle_block.{i}"] = kind
        return kinds

    def _unet_blocks(self) -> List[nn.Module]:
        return list(self.unet.input_blocks) + [self.unet.middle_block] + list(self.unet.output_blocks)

    def _text_encoder_targets(self) -> Dict[str, nn.Module]:
        cond = self.sd_model.cond_stage_model
        transformer = getattr(getattr(cond, "wrapped", cond), "transformer", None)
        if transformer is None:
            raise ModelError("this text encoder layout is not supported for text-encoder LoRA yet")
        targets = {}
        for path, layer in transformer.named_modules():
            if isinstance(layer, nn.Linear) and (".self_attn." in path or ".mlp." in path):
                targets["lora_te_" + te_module_path(path).replace(".", "_")] = layer
        return targets


def _count_res_blocks(unet: nn.Module) -> int:
    """Res blocks per level: input blocks before the first downsample, minus the stem."""
    for i, block in enumerate(unet.input_blocks):
        if any(type(child).__name__ == "Downsample" for child in block):
            return i - 1
    return max(1, len(unet.input_blocks) - 1)
