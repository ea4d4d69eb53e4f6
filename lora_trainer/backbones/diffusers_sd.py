"""The SD1 / SD2 backbone over diffusers / transformers components (standalone mode, demo and tests).

SD2 is SD1's layout with an OpenCLIP-H text encoder (converted to transformers' CLIPTextModel: 23 layers, the
penultimate of the original 24, which is what SD2 conditions on) and, for the 768-v models, v-prediction.
SDXL adds a second text encoder and size conditioning: ``diffusers_sdxl.DiffusersSDXLBackbone``.

diffusers and transformers are imported inside the methods that need them, so importing this module is light.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch
from torch import nn

from ..errors import ConfigError
from .base import Conditioning, FrozenModels, Size

log = logging.getLogger("lora_trainer")

# kohya sd-scripts (networks/lora.py): which blocks hold the layers that LoRA adapts.
UNET_ATTENTION_BLOCKS = ("Transformer2DModel",)
UNET_CONV_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TEXT_ENCODER_BLOCKS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")

_MISSING = object()


def text_model_of(text_encoder: nn.Module) -> nn.Module:
    """The module holding ``embeddings``/``encoder``/``final_layer_norm``.

    transformers < 5.6 wraps them in ``CLIPTextModel.text_model``; from 5.6 on ``CLIPTextModel`` holds them itself.
    """
    return getattr(text_encoder, "text_model", text_encoder)


def te_module_path(name: str) -> str:
    """A text-encoder module path as in the original checkpoints (``text_model.encoder.layers.0...``)."""
    return name if name.startswith("text_model.") else "text_model." + name


def _move(module: nn.Module, device: Optional[torch.device], dtype: Optional[torch.dtype]) -> None:
    """``module.to(device, dtype)`` only where something changes (diffusers warns on every ``to(dtype)``)."""
    want = torch.device(device) if device is not None else None
    for p in module.parameters():
        if (want is not None and p.device != want and not (want.index is None and p.device.type == want.type)) or (
                dtype is not None and p.is_floating_point() and p.dtype != dtype):
            module.to(device=device, dtype=dtype)
            return


def kohya_name(prefix: str, module_path: str) -> str:
    return prefix + module_path.replace(".", "_")


def _target_layers(root: nn.Module, block_classes: Sequence[str], conv3x3: bool) -> Iterator[tuple]:
    """(path, layer) for every Linear / 1x1 Conv2d (and 3x3 Conv2d if ``conv3x3``) inside blocks of these classes."""
    for block_path, block in root.named_modules():
        if type(block).__name__ not in block_classes:
            continue
        for child_path, child in block.named_modules():
            if isinstance(child, nn.Linear):
                pass
            elif isinstance(child, nn.Conv2d):
                if tuple(child.kernel_size) != (1, 1) and not conv3x3:
                    continue
            else:
                continue
            yield (f"{block_path}.{child_path}" if block_path else child_path), child


class DiffusersSDBackbone:
    """SD1 and SD2 on diffusers' UNet2DConditionModel / AutoencoderKL and transformers' CLIPTextModel.

    The backbone does not copy the modules: ``generate`` builds its pipeline from the very same objects,
    so an attached LoRA (which replaces ``forward`` of the target layers) shows up in the samples.
    """

    def __init__(self, unet: nn.Module, vae: nn.Module, text_encoder: nn.Module, tokenizer: Any,
                 noise_scheduler_config: Dict[str, Any], family: str = "sd1", prediction_type: str = "epsilon",
                 model_name: str = "", model_hash: Optional[str] = None, device: Optional[torch.device] = None,
                 dtype: Optional[torch.dtype] = None, clip_skip: int = 1):
        from diffusers import DDPMScheduler

        if family not in ("sd1", "sd2", "sdxl"):
            raise ConfigError(f"family {family!r}: use 'sd1', 'sd2' or 'sdxl'")
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ConfigError(f"prediction_type {prediction_type!r}: use 'epsilon' or 'v_prediction'")
        if clip_skip < 1:
            raise ConfigError(f"clip_skip {clip_skip}: must be 1 (last layer) or more")
        n_layers = len(text_model_of(text_encoder).encoder.layers)
        if clip_skip > n_layers:
            raise ConfigError(f"clip_skip {clip_skip}: the text encoder has only {n_layers} layers")
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.noise_scheduler_config = {**noise_scheduler_config, "prediction_type": prediction_type}
        self.family = family
        self.prediction_type = prediction_type
        self.model_name = model_name
        self.model_hash = model_hash
        self.clip_skip = clip_skip
        for module in self.models():
            _move(module, device, self._dtype_of(module, dtype))
        first = next(unet.parameters())
        self.device = torch.device(device) if device is not None else first.device
        self.dtype = dtype if dtype is not None else first.dtype
        self.vae_dtype = next(vae.parameters()).dtype
        scheduler = DDPMScheduler.from_config(self.noise_scheduler_config)
        self.alphas_cumprod = scheduler.alphas_cumprod.detach().to("cpu", torch.float32).clone()

    def models(self) -> List[nn.Module]:
        """Every module of the model, UNet first."""
        return [self.unet, self.vae, self.text_encoder]

    def _dtype_of(self, module: nn.Module, dtype: Optional[torch.dtype]) -> Optional[torch.dtype]:
        return dtype

    # ---- encoding -------------------------------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] -> scaled latents.

        Uses the MEAN of the VAE's latent distribution, not a sample (kohya samples): cached latents are then
        deterministic and the same whatever the RNG state; the VAE's std is tiny for SD, so training barely differs.
        """
        param = next(self.vae.parameters())
        dist = self.vae.encode(pixels.to(param.device, param.dtype)).latent_dist
        latents = dist.mean
        shift = getattr(self.vae.config, "shift_factor", None)
        if shift:
            latents = latents - shift
        return latents * self.vae.config.scaling_factor

    def tokenize(self, prompts: Sequence[str], tokenizer: Any = None) -> torch.Tensor:
        tokenizer = tokenizer or self.tokenizer
        return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids

    def encode_prompts(self, prompts: Sequence[str], sizes: Optional[Sequence[Size]] = None) -> Conditioning:
        """Prompts -> [B, 77, dim] (A1111/kohya clip skip: layer -clip_skip, then the final layer norm).

        Not wrapped in no_grad: gradients flow when a text-encoder LoRA trains; the caller decides.
        """
        input_ids = self.tokenize(prompts).to(next(self.text_encoder.parameters()).device)
        if self.clip_skip == 1:
            return self.text_encoder(input_ids).last_hidden_state
        out = self.text_encoder(input_ids, output_hidden_states=True)
        return text_model_of(self.text_encoder).final_layer_norm(out.hidden_states[-self.clip_skip])

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        if isinstance(cond, dict):
            raise TypeError("the SD1/SD2 backbone takes a conditioning tensor, not a dict")
        return self.unet(noisy_latents.to(self.device, self.dtype), timesteps.to(self.device),
                         encoder_hidden_states=cond.to(self.device, self.dtype)).sample

    # ---- LoRA targets ----------------------------------------------------------------------------------------
    def lora_targets(self, conv: bool = False, text_encoder: bool = False) -> Dict[str, nn.Module]:
        """kohya sd-scripts names for SD1/SD2: ``lora_unet_<diffusers path>``, ``lora_te_text_model_<path>``.

        Text-encoder names always carry ``text_model_``, whatever the installed transformers lays the module out as.
        """
        targets: Dict[str, nn.Module] = {}

        def add(name: str, layer: nn.Module) -> None:
            if name in targets and targets[name] is not layer:
                raise RuntimeError(f"two layers map to the LoRA name {name}")
            targets[name] = layer

        blocks = UNET_ATTENTION_BLOCKS + (UNET_CONV_BLOCKS if conv else ())
        for path, layer in _target_layers(self.unet, blocks, conv3x3=conv):
            add(kohya_name("lora_unet_", self.unet_lora_path(path)), layer)
        if text_encoder:
            for prefix, encoder in self.text_encoders():
                for path, layer in _target_layers(encoder, TEXT_ENCODER_BLOCKS, conv3x3=False):
                    add(kohya_name(prefix, te_module_path(path)), layer)
        return targets

    def unet_lora_path(self, path: str) -> str:
        """The module path a UNet layer's kohya name is built from: SD1/SD2 use the diffusers path itself."""
        return path

    def text_encoders(self) -> List[tuple]:
        """(kohya prefix, text encoder) pairs."""
        return [("lora_te_", self.text_encoder)]

    # ---- borrowing -------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def borrow(self, gradient_checkpointing: bool = False) -> Iterator[DiffusersSDBackbone]:
        """Freeze UNet, VAE and text encoder(s); on exit restore requires_grad, train/eval and checkpointing flags."""
        saved_gc = [(m, m.gradient_checkpointing, m.__dict__.get("_gradient_checkpointing_func", _MISSING))
                    for m in self.unet.modules() if hasattr(m, "gradient_checkpointing")]
        frozen = FrozenModels(*self.models())
        with frozen:
            try:
                if gradient_checkpointing:
                    self.unet.enable_gradient_checkpointing()
                yield self
            finally:
                for module, flag, func in saved_gc:
                    module.gradient_checkpointing = flag
                    if func is _MISSING:
                        module.__dict__.pop("_gradient_checkpointing_func", None)
                    else:
                        module._gradient_checkpointing_func = func
                moved = frozen.changed_placement()
                if moved:
                    log.warning("the model's placement changed while borrowed: %s", "; ".join(moved[:5]))

    # ---- sampling --------------------------------------------------------------------------------------------
    def ddim_scheduler(self):
        """DDIM with the model's schedule and prediction type. clip_sample is not a key of every scheduler's config
        and DDIM defaults it to True: SD latents must not clip."""
        from diffusers import DDIMScheduler

        return DDIMScheduler.from_config(self.noise_scheduler_config, prediction_type=self.prediction_type,
                                         clip_sample=False)

    def generate(self, prompts: Sequence[str], negative_prompt: str, seed: int, steps: int,
                 guidance_scale: float, size: Size) -> List[PIL.Image.Image]:  # noqa: F821
        """DDIM (eta 0, SD's original sampler) on prompts encoded exactly as in training (same clip skip)."""
        from diffusers import StableDiffusionPipeline

        width, height = self.check_sample_size(size)
        prompts = list(prompts)
        pipe = StableDiffusionPipeline(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                                       unet=self.unet, scheduler=self.ddim_scheduler(), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        with self.eval_mode(), torch.no_grad():
            cond = self.encode_prompts(prompts)
            uncond = self.encode_prompts([negative_prompt or ""] * len(prompts))
            generator = torch.Generator(device="cpu").manual_seed(int(seed))
            result = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=int(steps),
                          guidance_scale=float(guidance_scale), width=width, height=height,
                          generator=generator, output_type="pil")
        return list(result.images)

    def check_sample_size(self, size: Size) -> tuple:
        width, height = int(size[0]), int(size[1])
        factor = self.vae_scale_factor
        if width <= 0 or height <= 0 or width % factor or height % factor:
            raise ConfigError(f"sample size {width}x{height}: width and height must be positive multiples of {factor}")
        return width, height

    @contextlib.contextmanager
    def eval_mode(self) -> Iterator[None]:
        """Every module in eval mode for the duration; the train/eval flags are put back afterwards."""
        modules = self.models()
        modes = [[m.training for m in module.modules()] for module in modules]
        try:
            for module in modules:
                module.eval()
            yield
        finally:
            for module, flags in zip(modules, modes):
                for sub, flag in zip(module.modules(), flags):
                    sub.training = flag
