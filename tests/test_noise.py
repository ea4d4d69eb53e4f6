"""The noise options kohya users bring: offset noise, pyramid (multires) noise and input perturbation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lora_trainer.config import TrainConfig
from lora_trainer.diffusion import noise_generator, perturbed, pyramid_noise, sample_noise


def coarse_variance(noise: torch.Tensor, factor: int = 8) -> float:
    """Variance of the noise averaged over factor x factor patches: how much low-frequency energy it has."""
    return float(F.avg_pool2d(noise, factor).var())


def test_noise_depends_on_the_seed_and_the_step_only():
    latents = torch.zeros(1, 4, 8, 8)
    draws = {(seed, step): sample_noise(latents, noise_generator(seed, step)) for seed in (0, 1, 2) for step in (0, 1)}
    assert torch.equal(draws[(1, 0)], sample_noise(latents, noise_generator(1, 0)))  # resume draws the same
    values = list(draws.values())
    assert all(not torch.equal(a, b) for i, a in enumerate(values) for b in values[i + 1:])  # seed matters


def test_pyramid_noise_is_unit_scale_deterministic_and_low_frequency():
    latents = torch.zeros(4, 4, 64, 64)
    plain = sample_noise(latents, noise_generator(3, 0))
    pyramid = sample_noise(latents, noise_generator(3, 0), multires_iterations=6, multires_discount=0.8)
    again = sample_noise(latents, noise_generator(3, 0), multires_iterations=6, multires_discount=0.8)
    assert torch.equal(pyramid, again)  # a function of (seed, step): resume draws the same
    assert pyramid.shape == plain.shape and abs(float(pyramid.std()) - 1.0) < 1e-4
    # white noise averaged over 8x8 patches keeps 1/64 of its variance; pyramid noise keeps several times more
    assert coarse_variance(plain) < 0.03 and coarse_variance(pyramid) > 5 * coarse_variance(plain)
    single = pyramid_noise(torch.randn(1, 4, 1, 1), torch.Generator().manual_seed(0), 6, 0.3)
    assert single.shape == (1, 4, 1, 1)  # a 1x1 latent stops after the first level instead of failing


def test_input_perturbation_changes_the_input_noise_only():
    noise = torch.randn(2, 4, 8, 8)
    assert perturbed(noise, torch.Generator().manual_seed(1), 0.0) is noise
    noisy = perturbed(noise, torch.Generator().manual_seed(1), 0.1)
    extra = noisy - noise
    assert 0.07 < float(extra.std()) < 0.13  # gamma times unit noise
    assert torch.equal(noisy, perturbed(noise, torch.Generator().manual_seed(1), 0.1))


def test_kohya_names_are_our_names():
    config = TrainConfig.from_dict({"base_model": "m", "train_data_dir": "d", "ip_noise_gamma": 0.1,
                                    "multires_noise_iterations": 6, "multires_noise_discount": 0.3})
    assert (config.ip_noise_gamma, config.multires_noise_iterations, config.multires_noise_discount) == (0.1, 6, 0.3)
