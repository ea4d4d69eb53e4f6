"""The diffusion training objective in plain torch.

diffusers has the same maths in its schedulers, but the engine must run inside A1111, whose
pinned environment cannot import current diffusers; these few lines depend only on the
backbone's ``alphas_cumprod``.
"""

from __future__ import annotations

import hashlib
import math
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


def sample_timesteps(batch: int, generator: torch.Generator, num_timesteps: int = 1000, min_timestep: int = 0,
                     max_timestep: Optional[int] = None) -> torch.Tensor:
    """Uniform timesteps in [min_timestep, max_timestep) (kohya's --min_timestep / --max_timestep)."""
    high = num_timesteps if max_timestep is None else max_timestep
    return torch.randint(min_timestep, high, (batch,), generator=generator, dtype=torch.long)


def zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The schedule rescaled so the last timestep is pure noise (Lin et al. 2023, "Common Diffusion Noise Schedules
    and Sample Steps are Flawed", algorithm 1): sqrt(alpha_bar) shifted to end at 0 and scaled to keep its start."""
    root = alphas_cumprod.double().sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    return (root ** 2).to(alphas_cumprod.dtype)


def signal_to_noise(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    a = alphas_cumprod[timesteps.cpu()].float()
    return a / (1 - a).clamp(min=1e-12)


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
    """Min-SNR-gamma loss weights (Hang et al. 2023): min(SNR, gamma) / SNR, or / (SNR + 1) for v. With a zero
    terminal SNR the last timestep's SNR is 0; its epsilon weight is then taken as 1 (the limit), not 0/0."""
    a = alphas_cumprod[timesteps.cpu()].float()
    snr = a / (1 - a)
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return torch.where(snr > 0, clipped / snr.clamp(min=1e-12), torch.ones_like(snr))


def debiased_weights(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Debiased estimation (Yu et al. 2024, kohya's --debiased_estimation_loss): 1/sqrt(SNR), or 1/(SNR + 1) for
    v-prediction, with SNR capped at 1000 as kohya does (t = 0 would be almost infinite)."""
    snr = signal_to_noise(timesteps, alphas_cumprod).clamp(max=1000.0)
    if prediction_type == "v_prediction":
        return 1.0 / (snr + 1.0)
    return 1.0 / snr.clamp(min=1e-6).sqrt()  # a zero terminal SNR would divide by 0


def huber_threshold(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, huber_c: float, schedule: str,
                    num_timesteps: int = 1000) -> torch.Tensor:
    """Per-sample threshold of the huber/smooth_l1 losses (kohya's huber_schedule): constant; exponential, from 1 at
    t = 0 down to huber_c at the last step; snr, large where the noise is small: (1 - c) / (1 + sigma)^2 + c."""
    t = timesteps.cpu()
    if schedule == "constant":
        return torch.full((len(t),), float(huber_c))
    if schedule == "exponential":
        alpha = -math.log(huber_c) / num_timesteps
        return torch.exp(-alpha * t.float())
    if schedule == "snr":
        a = alphas_cumprod[t].double()
        sigma = ((1.0 - a) / a.clamp(min=1e-12)).sqrt()
        return ((1.0 - huber_c) / (1.0 + sigma) ** 2 + huber_c).float()
    raise ValueError(f"unknown huber schedule {schedule!r}")


def elementwise_loss(prediction: torch.Tensor, target: torch.Tensor, loss_type: str = "l2",
                     threshold: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The loss at each element, in fp32: l2, l1, or huber / smooth_l1 with a per-sample ``threshold`` c:
    huber 2c(sqrt(d^2 + c^2) - c), smooth_l1 2(sqrt(d^2 + c^2) - c) (pseudo-Huber, as kohya computes them)."""
    diff = prediction.float() - target.float()
    if loss_type == "l2":
        return diff.pow(2)
    if loss_type == "l1":
        return diff.abs()
    if loss_type in ("huber", "smooth_l1"):
        if threshold is None:
            raise ValueError(f"loss_type {loss_type} needs a threshold")
        c = threshold.to(diff.device, torch.float32).reshape(-1, *([1] * (diff.ndim - 1)))
        soft = torch.sqrt(diff.pow(2) + c.pow(2)) - c
        return 2 * c * soft if loss_type == "huber" else 2 * soft
    raise ValueError(f"unknown loss type {loss_type!r}")


def diffusion_loss(prediction: torch.Tensor, target: torch.Tensor, weights: Optional[torch.Tensor] = None,
                   loss_type: str = "l2", threshold: Optional[torch.Tensor] = None,
                   mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-sample mean of the elementwise loss, optionally masked per pixel (mask (B, 1, H, W) in [0, 1], at the
    latents' size; as kohya, masked elements count in the mean as zeros) and weighted per sample, averaged over the
    batch."""
    elements = elementwise_loss(prediction, target, loss_type, threshold)
    if mask is not None:
        elements = elements * mask.to(elements.device, torch.float32)
    per_sample = elements.flatten(1).mean(dim=1)
    if weights is not None:
        per_sample = per_sample * weights.to(per_sample.device)
    return per_sample.mean()
