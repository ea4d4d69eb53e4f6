"""The diffusion training objective in plain torch.

diffusers has the same maths in its schedulers, but the engine must run inside A1111, whose
pinned environment cannot import current diffusers; these few lines depend only on the
backbone's ``alphas_cumprod``.
"""

from __future__ import annotations

import hashlib
from typing import Optional

import torch


def noise_generator(seed: int, micro_step: int) -> torch.Generator:
    """A generator that depends only on (seed, micro_step): a resumed run draws the same noise. torch's CPU
    generator keeps only the low 32 bits of a seed, so the pair is hashed into 32 bits (``seed * 2**32 + step``
    would make every seed draw the same noise)."""
    digest = hashlib.blake2b(f"{seed}/{micro_step}".encode(), digest_size=8).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest, "little") & 0xFFFFFFFF)


def sample_noise(latents: torch.Tensor, generator: torch.Generator, noise_offset: float = 0.0,
                 multires_iterations: int = 0, multires_discount: float = 0.3) -> torch.Tensor:
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
    if noise_offset:
        # Offset noise: a per-channel constant lets the model shift overall brightness.
        offset = torch.randn(latents.shape[0], latents.shape[1], 1, 1, generator=generator)
        noise = noise + noise_offset * offset
    if multires_iterations:
        noise = pyramid_noise(noise, generator, multires_iterations, multires_discount)
    return noise.to(latents.device)


def pyramid_noise(noise: torch.Tensor, generator: torch.Generator, iterations: int,
                  discount: float) -> torch.Tensor:
    """Multi-resolution noise (as kohya's ``multires_noise_iterations``): noise drawn at sizes shrinking by a
    random factor of 2-4 per level, upsampled and added with weight ``discount ** level``, then rescaled to unit
    standard deviation. Low frequencies get noise too, which helps the model learn overall tone and composition."""
    import torch.nn.functional as F

    batch, channels, height, width = noise.shape
    for level in range(iterations):
        ratio = (2.0 + 2.0 * float(torch.rand((), generator=generator))) ** level
        small_h, small_w = max(1, int(height / ratio)), max(1, int(width / ratio))
        coarse = torch.randn(batch, channels, small_h, small_w, generator=generator, dtype=noise.dtype)
        noise = noise + F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False) \
            * discount ** level
        if small_h == 1 or small_w == 1:
            break
    return noise / noise.std()


def perturbed(noise: torch.Tensor, generator: torch.Generator, gamma: float) -> torch.Tensor:
    """Input perturbation (Ning et al. 2023, kohya's ``ip_noise_gamma``): the noise the model's input is made
    with, ``noise + gamma * extra``; the training target keeps the plain ``noise``."""
    if not gamma:
        return noise
    return noise + gamma * torch.randn(noise.shape, generator=generator, dtype=noise.dtype).to(noise.device)


def sample_timesteps(batch: int, generator: torch.Generator, num_timesteps: int = 1000) -> torch.Tensor:
    return torch.randint(0, num_timesteps, (batch,), generator=generator, dtype=torch.long)


def _broadcast(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.device, torch.float32).reshape(-1, *([1] * (like.ndim - 1)))


def add_noise(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
              alphas_cumprod: torch.Tensor) -> torch.Tensor:
    a = alphas_cumprod[timesteps.cpu()]
    return _broadcast(a.sqrt(), latents) * latents + _broadcast((1 - a).sqrt(), latents) * noise


def training_target(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                    alphas_cumprod: torch.Tensor, prediction_type: str) -> torch.Tensor:
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        a = alphas_cumprod[timesteps.cpu()]
        return _broadcast(a.sqrt(), latents) * noise - _broadcast((1 - a).sqrt(), latents) * latents
    raise ValueError(f"unknown prediction type {prediction_type!r}")


def min_snr_weights(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float,
                    prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023): min(SNR, gamma) / SNR, or / (SNR + 1) for v."""
    a = alphas_cumprod[timesteps.cpu()].float()
    snr = a / (1 - a)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr


def diffusion_loss(prediction: torch.Tensor, target: torch.Tensor,
                   weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean squared error per sample, optionally weighted, averaged over the batch (in fp32)."""
    per_sample = (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    if weights is not None:
        per_sample = per_sample * weights.to(per_sample.device)
    return per_sample.mean()
