"""A small Forge (``lllyasviel/stable-diffusion-webui-forge``) model object, rebuilt from webui_internals.md §2.3/§3.5.

Forge's backend is not on PyPI, so this reproduces the interface the trainer touches, with the weights of
the tiny test checkpoint:
- ``sd_model.forge_objects.unet`` is a patcher whose ``.model`` (KModel) has ``diffusion_model`` (the real ldm
  UNetModel from stable-diffusion-sdkit, original layout), ``predictor`` (``alphas_cumprod``,
  ``prediction_type``) and ``storage_dtype`` / ``computation_dtype``;
- every ``nn.Linear`` is swapped for ``ForgeLinear``, a plain Module with ``weight``/``bias`` and a manual
  cast, as ``using_forge_operations()`` builds them;
- every parameter is an inference tensor (Forge loads under ``torch.inference_mode``) with
  ``requires_grad=True``, and so are the results of ``get_learned_conditioning`` and ``encode_first_stage``;
- the transformer blocks add to the residual in place (``x += n``), as Forge's ``BasicTransformerBlock`` does;
- the text encoder's embeddings are stored in another dtype and cast to fp32 by every ``get_learned_conditioning``,
  which replaces their Parameters with new inference tensors the first time (Forge's classic text engine on the
  CPU, where the text encoder is fp16);
- ``patch_lora`` replaces Parameter objects by merged ones and keeps the originals, as ``LoraLoader.refresh``
  does; ``refresh_loras()`` with no patches puts the originals back.
SD2 (``sd20.StableDiffusion2``) too, from a checkpoint whose yaml names open_clip: the text encoder is ``clip_h``
(HF, as Forge converts it), the predictor says ``v_prediction`` when the yaml has ``parameterization: "v"``. The
stand-in's ``clip_h`` holds the layers SD2 conditions on (the diffusers conversion, 23 of 24 in the real model)
and conditions on its last hidden state, where Forge keeps all 24 and skips the last.
Not reproduced: the memory manager's partial loading, text-processing engines, samplers.
"""

from __future__ import annotations

import types
from pathlib import Path

import torch
from torch import nn


class ForgeLinear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.parameters_manual_cast = True

    def forward(self, x):
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, self.weight.to(x.dtype), bias)


def _swap_linears(root: nn.Module) -> None:
    for name, child in list(root.named_children()):
        if isinstance(child, nn.Linear):
            setattr(root, name, ForgeLinear(child))
        else:
            _swap_linears(child)


def _to_inference(root: nn.Module) -> None:
    """Forge loads state dicts under inference mode into modules built normally: each Parameter holds an inference
    tensor and keeps torch's default ``requires_grad=True`` (the real Forge: 286 UNet and 198 CLIP tensors)."""
    with torch.inference_mode():
        for module in root.modules():
            for name, p in list(module._parameters.items()):
                if p is not None:
                    module._parameters[name] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)


def _forward_adding_in_place(self, x, context=None):
    """Forge's ``backend/nn/unet.py`` ``BasicTransformerBlock._forward`` in short: the residual adds are in place
    (``x += n``), after ``norm1``/``norm2`` have kept ``x`` for the backward pass. ldm's own block adds out of
    place, so without this the stand-in trained where the real Forge failed ("modified by an inplace operation")."""
    n = self.attn1(self.norm1(x), context=context if self.disable_self_attn else None)
    x += n
    n = self.attn2(self.norm2(x), context=context)
    x += n
    x_skip = x
    x = self.ff(self.norm3(x))
    x += x_skip
    return x


def _forge_transformer_blocks(unet: nn.Module) -> None:
    for module in unet.modules():
        if type(module).__name__ == "BasicTransformerBlock":
            module._forward = types.MethodType(_forward_adding_in_place, module)


class Patcher:
    def __init__(self, model):
        self.model = model
        self.backup = {}

    def patch_lora(self, module: nn.Module, delta: torch.Tensor) -> None:
        """LoraLoader.refresh: a new Parameter object holding weight + delta; the original kept aside."""
        self.backup.setdefault(id(module), (module, module.weight))
        with torch.inference_mode():
            module.weight = nn.Parameter(module.weight + delta, requires_grad=False)

    def refresh_loras(self):
        for module, original in self.backup.values():
            module.weight = original
        self.backup.clear()


def guessed_config(name: str, in_channels: int = 4):
    """Forge's ``sd_model.model_config``: huggingface_guess's model class (SD15, SD20, SDXL, Flux, ...) for the
    state dict, by the class's name, with its ``inpaint_model()`` rule."""
    config = type(name, (), {"inpaint_model": lambda self: in_channels > 4})()
    config.unet_config = {"in_channels": in_channels}
    return config


def engine_flags(model, guess: str) -> None:
    """What ``ForgeDiffusionEngine.__init__`` sets: every ``is_*`` False, then the engine's own flag True (Forge
    never sets ``is_flux``), ``model_config`` and ``is_inpaint``."""
    model.model_config = guessed_config(guess)
    model.is_inpaint = model.model_config.inpaint_model()
    model.is_sd1 = model.is_sd2 = model.is_sdxl = model.is_sd3 = False
    flag = {"SD15": "is_sd1", "SD20": "is_sd2", "SDXL": "is_sdxl", "SD3": "is_sd3"}.get(guess)
    if flag:
        setattr(model, flag, True)


class ForgeVAE:
    """``forge_objects.vae`` as far as encoding goes: Forge's VAE *samples* the posterior at every encode (the global
    RNG) unless ``patcher.model_options["model_vae_regulation"]`` maps the posterior to a tensor (the real Forge: a
    cache that was never reused, latents that differed from run to run)."""

    def __init__(self, vae):
        self.first_stage_model = vae
        self.patcher = types.SimpleNamespace(model_options={})

    def encode_posterior(self, x):
        posterior = self.first_stage_model.encode(x).latent_dist
        regulation = self.patcher.model_options.get("model_vae_regulation")
        return regulation(posterior) if regulation is not None else posterior.sample()


class ForgeObjects:
    def __init__(self, unet, clip, vae):
        self.unet, self.clip, self.vae, self.clipvision = unet, clip, vae, None

    def shallow_copy(self):
        return ForgeObjects(self.unet, self.clip, self.vae)


class ForgeModel:
    """The attributes of ``ForgeDiffusionEngine`` (sd15.StableDiffusion) that the trainer uses."""

    def __init__(self, unet_patcher, clip, vae, tokenizer, is_sd2: bool = False):
        self.forge_objects = ForgeObjects(unet_patcher, clip, ForgeVAE(vae))
        self.forge_objects_original = self.forge_objects.shallow_copy()
        self.current_lora_hash = "[['x.safetensors', 1.0, 1.0, False]]"
        engine_flags(self, "SD20" if is_sd2 else "SD15")
        self.first_stage_model = self.cond_stage_model = None  # as in Forge: no .model, no ldm parts
        self.sd_checkpoint_info = types.SimpleNamespace(name="tiny.safetensors", model_name="tiny", shorthash="abcd")
        self.tokenizer, self.vae = tokenizer, vae

    @torch.inference_mode()
    def get_learned_conditioning(self, prompts):
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids
        encoder = self.forge_objects.clip.cond_stage_model["clip_h" if self.is_sd2 else "clip_l"]
        # classic_engine.encode_with_transformers: the embeddings cast to float32 at every encode; the first cast of
        # the fp16 CPU text encoder makes new Parameter objects, inference tensors (the real Forge, UI mode).
        embeddings = _embeddings(encoder.transformer)
        embeddings.position_embedding = embeddings.position_embedding.to(dtype=torch.float32)
        embeddings.token_embedding = embeddings.token_embedding.to(dtype=torch.float32)
        return encoder.transformer(ids).last_hidden_state

    @torch.inference_mode()
    def encode_first_stage(self, x):
        return self.forge_objects.vae.encode_posterior(x) * 0.18215

    @torch.inference_mode()
    def decode_first_stage(self, z):
        return self.vae.decode(z / 0.18215).sample


def _embeddings(clip_text_model):
    """``text_model.embeddings`` (transformers 4, as in Forge) or ``embeddings`` (transformers 5)."""
    return getattr(clip_text_model, "text_model", clip_text_model).embeddings


def load_forge_model(tiny_files: dict):
    """The tiny test checkpoint (SD1, or SD2 when its yaml names open_clip) as Forge would hold it."""
    from diffusers import AutoencoderKL
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    from omegaconf import OmegaConf
    from safetensors.torch import load_file
    from transformers import CLIPTextModel, CLIPTokenizer

    checkpoint = Path(tiny_files["safetensors"])
    config = OmegaConf.load(str(checkpoint.with_suffix(".yaml")))
    unet = UNetModel(**OmegaConf.to_container(config.model.params.unet_config.params))
    prefix = "model.diffusion_model."
    unet.load_state_dict({k[len(prefix):]: v for k, v in load_file(str(checkpoint)).items() if k.startswith(prefix)})
    unet.eval()
    _forge_transformer_blocks(unet)
    _swap_linears(unet)
    _to_inference(unet)
    folder = Path(tiny_files["folder"])
    text = CLIPTextModel.from_pretrained(str(folder / "text_encoder")).eval()
    _to_inference(text)
    # Forge keeps the text encoder in fp16 on the CPU, and its embeddings become fp32 when first used. Stored here in
    # float64, so that first cast makes new Parameters just the same, without fp16's rounding (the tests compare the
    # text encoder with diffusers').
    with torch.inference_mode():
        for name in ("token_embedding", "position_embedding"):
            setattr(_embeddings(text), name, getattr(_embeddings(text), name).to(torch.float64))
    is_sd2 = config.model.params.cond_stage_config.target.endswith("FrozenOpenCLIPEmbedder")
    integrated = nn.Module()
    integrated.transformer = text
    joint = nn.ModuleDict({"clip_h" if is_sd2 else "clip_l": integrated})
    clip = types.SimpleNamespace(cond_stage_model=joint, patcher=Patcher(joint))
    vae = AutoencoderKL.from_pretrained(str(folder / "vae")).eval()
    kmodel = nn.Module()
    kmodel.diffusion_model = unet
    v_prediction = config.model.params.get("parameterization", "eps") == "v"
    kmodel.predictor = types.SimpleNamespace(
        alphas_cumprod=_schedule(config), prediction_type="v_prediction" if v_prediction else "epsilon")
    kmodel.storage_dtype = kmodel.computation_dtype = torch.float32
    tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
    return ForgeModel(Patcher(kmodel), clip, vae, tokenizer, is_sd2)


def _schedule(config) -> torch.Tensor:
    params = config.model.params
    betas = torch.linspace(params.linear_start ** 0.5, params.linear_end ** 0.5, params.timesteps,
                           dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0).float()

