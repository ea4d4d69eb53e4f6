"""The backbone protocol: where the base model comes from, seen by the one training loop.

A backbone wraps a model someone else owns (a checkpoint we loaded, or the WebUI's live model).
The loop only calls the methods below; it never touches a diffusers or ldm class itself.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Protocol, Sequence, Tuple, Union

import torch
from torch import nn

from ..errors import ModelError

SUPPORTED = "training supports SD1, SD2 and SDXL checkpoints in this version"  # said when refusing any other family


class UnsupportedFamily(ModelError):
    """The loaded model is a family training does not support; ``name`` says which (the Model box shows it)."""

    def __init__(self, name: str, detail: str = ""):
        self.name = name
        super().__init__(f"the loaded checkpoint is {name}; {SUPPORTED}{detail}")

# SD1/SD2: a tensor [B, 77*k, dim]. SDXL: a dict of tensors, whose keys only the backbone reads
# (sgm: {"crossattn": [B, 77*k, 2048], "vector": [B, 2816]}; diffusers: crossattn, text_embeds, time_ids).
Conditioning = Union[torch.Tensor, Dict[str, torch.Tensor]]
Size = Tuple[int, int]  # (width, height) in pixels


class TrainSize(tuple):
    """A bucket size ``(width, height)`` that also says where its pixels came from.

    It IS the plain ``(width, height)`` tuple, so a backbone that wants only the bucket size reads it as
    before. SDXL is conditioned on more (its ``add_time_ids``): ``original_size``, the image's
    ``(width, height)`` before resizing, and ``crop_top_left``, the ``(top, left)`` of the crop in the
    resized image. Equality and hashing see only the bucket; use ``key()`` to tell two apart.
    """

    original_size: Size
    crop_top_left: Tuple[int, int]

    def __new__(cls, target: Sequence[int], original_size: Optional[Sequence[int]] = None,
                crop_top_left: Sequence[int] = (0, 0)) -> TrainSize:
        self = super().__new__(cls, (int(target[0]), int(target[1])))
        self.original_size = tuple(int(v) for v in (original_size or target))
        self.crop_top_left = (int(crop_top_left[0]), int(crop_top_left[1]))
        return self

    def __getnewargs__(self) -> tuple:
        return (tuple(self), self.original_size, self.crop_top_left)

    def key(self) -> tuple:
        return tuple(self), self.original_size, self.crop_top_left


def sdxl_time_ids(size: Sequence[int]) -> Tuple[int, int, int, int, int, int]:
    """SDXL's six size numbers for a ``Size`` or ``TrainSize``, in its order:
    original (height, width), crop (top, left), target (height, width). A plain size is its own original, uncropped."""
    width, height = int(size[0]), int(size[1])
    original = getattr(size, "original_size", (width, height))
    top, left = getattr(size, "crop_top_left", (0, 0))
    return original[1], original[0], top, left, height, width


class Backbone(Protocol):
    family: str  # "sd1" | "sd2" | "sdxl"
    prediction_type: str  # "epsilon" | "v_prediction"
    alphas_cumprod: torch.Tensor  # [1000] float32 on the CPU
    device: torch.device  # where the UNet computes
    dtype: torch.dtype  # the UNet's compute dtype
    model_name: str  # shown in metadata (ss_sd_model_name)
    model_hash: Optional[str]  # ss_sd_model_hash, when known

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1], [B, 3, H, W] -> scaled latents [B, 4, H/8, W/8] (no grad)."""

    def encode_prompts(self, prompts: Sequence[str], sizes: Optional[Sequence[Size]] = None) -> Conditioning:
        """Prompts -> conditioning; gradients flow only when a text-encoder LoRA is attached and training.

        ``sizes`` holds each item's bucket ``(width, height)``; the training loop passes ``TrainSize`` values,
        which also carry the original size and crop (SDXL backbones read them, the others ignore them).
        """

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The UNet's output (epsilon or v) for integer timesteps in [0, 1000)."""

    def lora_targets(self, conv: bool = False, text_encoder: bool = False) -> Dict[str, nn.Module]:
        """kohya module name -> Linear/Conv2d layer to adapt.

        Without ``conv``: Linear and 1x1 Conv layers of the UNet's attention blocks (kohya's LoRA-LierLa).
        With ``conv``: also the layers of resnet, down- and up-sample blocks (LoCon / LoRA-C3Lier).
        With ``text_encoder``: also the attention and MLP layers of each text encoder.
        """

    def borrow(self, gradient_checkpointing: bool = False) -> contextlib.AbstractContextManager:
        """Freeze the model for training and give it back exactly as it was on exit (also on error)."""

    def generate(self, prompts: Sequence[str], negative_prompt: str, seed: int, steps: int,
                 guidance_scale: float, size: Size) -> List[PIL.Image.Image]:  # noqa: F821
        """Render images with whatever LoRA is attached right now."""


@dataclass
class _ModuleState:
    training: List[bool]  # every submodule, in modules() order
    requires_grad: Dict[str, bool]  # by parameter name, tied names included
    devices: List[torch.device]
    dtypes: List[torch.dtype]


class FrozenModels:
    """Records train/eval mode, requires_grad, devices and dtypes of modules and restores them.

    ``with FrozenModels(unet, vae): ...`` freezes every parameter for the duration; the LoRA
    parameters live in their own module, outside these trees, so they are unaffected.
    """

    def __init__(self, *modules: nn.Module):
        self.modules = [m for m in modules if m is not None]
        self.saved: List[_ModuleState] = []

    def __enter__(self) -> FrozenModels:
        self.saved = []
        for module in self.modules:
            params = list(module.parameters())
            self.saved.append(_ModuleState(
                training=[m.training for m in module.modules()],
                requires_grad={n: p.requires_grad for n, p in module.named_parameters(remove_duplicate=False)},
                devices=[p.device for p in params],
                dtypes=[p.dtype for p in params],
            ))
            module.requires_grad_(False)
        return self

    def __exit__(self, *exc_info) -> None:
        for module, state in zip(self.modules, self.saved):
            for sub, flag in zip(module.modules(), state.training):
                sub.training = flag
            # By name: a WebUI may have swapped Parameter objects meanwhile (Forge's memory manager and LoRA
            # loader put its own back, as inference tensors, whose flag can only be set in inference mode).
            for name, p in module.named_parameters(remove_duplicate=False):
                flag = state.requires_grad.get(name)
                if flag is not None and p.requires_grad != flag:
                    with torch.inference_mode(p.is_inference()):
                        p.requires_grad_(flag)

    def changed_placement(self) -> List[str]:
        """Descriptions of parameters whose device or dtype differ from when we entered (should be none)."""
        out = []
        for module, state in zip(self.modules, self.saved):
            for i, p in enumerate(module.parameters()):
                if p.device != state.devices[i] or p.dtype != state.dtypes[i]:
                    out.append(f"{type(module).__name__} param {i}: {state.devices[i]}/{state.dtypes[i]} -> "
                               f"{p.device}/{p.dtype}")
        return out


@contextlib.contextmanager
def nothing() -> Iterator[None]:
    yield
