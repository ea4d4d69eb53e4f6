"""Loss types, timestep range, debiased estimation, zero terminal SNR, and masked loss: the maths against kohya's
formulas (written out here), and training runs that use them."""

import math

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from lora_trainer.backbones.single_file import load_backbone_from_path
from lora_trainer.config import TrainConfig
from lora_trainer.diffusion import (
    debiased_weights,
    diffusion_loss,
    huber_threshold,
    min_snr_weights,
    sample_timesteps,
    zero_terminal_snr,
)
from lora_trainer.errors import ConfigError
from lora_trainer.masks import mask_tensor
from lora_trainer.runner import run_training

SD_ALPHAS = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2, 0)  # SD's scaled-linear


def test_loss_types_follow_kohyas_formulas():
    generator = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 4, 8, 8, generator=generator), torch.randn(3, 4, 8, 8, generator=generator)
    c = torch.tensor([0.1, 0.5, 1.0])
    d = pred - target
    cb = c.view(-1, 1, 1, 1)
    assert torch.allclose(diffusion_loss(pred, target), (d ** 2).mean())
    assert torch.allclose(diffusion_loss(pred, target, loss_type="l1"), d.abs().mean())
    huber = 2 * cb * (torch.sqrt(d ** 2 + cb ** 2) - cb)
    assert torch.allclose(diffusion_loss(pred, target, loss_type="huber", threshold=c), huber.mean())
    smooth = 2 * (torch.sqrt(d ** 2 + cb ** 2) - cb)
    assert torch.allclose(diffusion_loss(pred, target, loss_type="smooth_l1", threshold=c), smooth.mean())
    # huber is close to l2 for small errors and to l1 (times 2c) for large ones
    small, large = torch.full((1, 1), 1e-3), torch.full((1, 1), 100.0)
    one = torch.tensor([0.1])
    assert math.isclose(float(diffusion_loss(small, 0 * small, loss_type="huber", threshold=one)), 1e-6, rel_tol=1e-2)
    assert math.isclose(float(diffusion_loss(large, 0 * large, loss_type="huber", threshold=one)), 2 * 0.1 * 99.9,
                        rel_tol=1e-3)


def test_huber_schedules():
    t = torch.tensor([0, 500, 999])
    assert torch.allclose(huber_threshold(t, SD_ALPHAS, 0.1, "constant"), torch.full((3,), 0.1))
    exponential = huber_threshold(t, SD_ALPHAS, 0.1, "exponential")
    assert math.isclose(float(exponential[0]), 1.0) and math.isclose(float(exponential[2]), 0.1 ** 0.999, rel_tol=1e-4)
    snr = huber_threshold(t, SD_ALPHAS, 0.1, "snr")
    sigma = ((1 - SD_ALPHAS[t]) / SD_ALPHAS[t]).sqrt()
    assert torch.allclose(snr, (1 - 0.1) / (1 + sigma) ** 2 + 0.1, atol=1e-6)
    assert snr[0] > snr[1] > snr[2] > 0.1  # large where the noise is small


def test_timestep_range_and_weights():
    generator = torch.Generator().manual_seed(1)
    t = sample_timesteps(10_000, generator, min_timestep=200, max_timestep=300)
    assert int(t.min()) == 200 and int(t.max()) == 299
    ts = torch.tensor([0, 10, 500, 999])
    snr = SD_ALPHAS[ts] / (1 - SD_ALPHAS[ts])
    assert torch.allclose(debiased_weights(ts, SD_ALPHAS, "epsilon"), 1 / snr.clamp(max=1000).sqrt())
    assert torch.allclose(debiased_weights(ts, SD_ALPHAS, "v_prediction"), 1 / (snr.clamp(max=1000) + 1))


def test_zero_terminal_snr_rescales_the_schedule():
    rescaled = zero_terminal_snr(SD_ALPHAS)
    assert float(rescaled[-1]) == 0.0
    assert math.isclose(float(rescaled[0]), float(SD_ALPHAS[0]), rel_tol=1e-6)
    assert bool((rescaled[1:] <= rescaled[:-1]).all()), "still decreasing"
    weights = min_snr_weights(torch.tensor([999]), rescaled, 5.0, "epsilon")
    assert torch.isfinite(weights).all(), "SNR 0 at the last step must not give 0/0"
    assert torch.isfinite(debiased_weights(torch.tensor([999]), rescaled, "epsilon")).all()


def test_timestep_range_must_be_ordered():
    with pytest.raises(ConfigError, match="min_timestep .* must be below max_timestep"):
        TrainConfig.from_dict({"base_model": "m", "train_data_dir": "d", "min_timestep": 500, "max_timestep": 400})
    with pytest.raises(ConfigError, match="loss_type' must be one of"):
        TrainConfig.from_dict({"base_model": "m", "train_data_dir": "d", "loss_type": "l3"})


# -- masks ------------------------------------------------------------------------------------------------------------
def test_a_mask_is_cut_like_its_image_and_shrunk_to_latent_size(tmp_path):
    mask = Image.new("L", (128, 64), 0)
    mask.paste(255, (0, 0, 64, 64))  # the left half counts
    mask.save(tmp_path / "m.png")
    latent = mask_tensor(tmp_path / "m.png", False, (128, 64), (128, 64), flip=False)
    assert latent.shape == (1, 8, 16)
    assert float(latent[0, :, :8].min()) == 1.0 and float(latent[0, :, 8:].max()) == 0.0
    mirrored = mask_tensor(tmp_path / "m.png", False, (128, 64), (128, 64), flip=True)
    assert torch.equal(mirrored, latent.flip(-1))
    # A 64x64 bucket takes the centre of the 128x64 image: half of it counts.
    centre = mask_tensor(tmp_path / "m.png", False, (128, 64), (64, 64), flip=False)
    assert float(centre.mean()) == pytest.approx(0.5)
    # A smaller mask is stretched to its image first.
    mask.resize((32, 16)).save(tmp_path / "small.png")
    assert torch.allclose(mask_tensor(tmp_path / "small.png", False, (128, 64), (128, 64), False), latent, atol=0.1)
    # The alpha channel of an RGBA image.
    rgba = Image.new("RGBA", (64, 64), (10, 20, 30, 0))
    rgba.paste((10, 20, 30, 255), (0, 0, 64, 32))  # the top half is opaque
    rgba.save(tmp_path / "a.png")
    alpha = mask_tensor(tmp_path / "a.png", True, (64, 64), (64, 64), False)
    assert float(alpha[0, :4].min()) == 1.0 and float(alpha[0, 4:].max()) == 0.0


def test_masked_pixels_give_no_gradient():
    pred = torch.randn(1, 4, 8, 8, requires_grad=True)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1
    diffusion_loss(pred, torch.zeros_like(pred), mask=mask).backward()
    assert float(pred.grad[..., 4:].abs().max()) == 0.0 and float(pred.grad[..., :4].abs().min()) > 0


def rgba_folder(path, count, opaque):
    path.mkdir(parents=True)
    generator = torch.Generator().manual_seed(4)
    for i in range(count):
        rgb = (torch.rand(64, 64, 3, generator=generator) * 255).to(torch.uint8).numpy()
        image = Image.fromarray(rgb).convert("RGBA")
        image.putalpha(255 if opaque else 0)
        image.save(path / f"p{i}.png")
        (path / f"p{i}.txt").write_text(f"pattern {i}")
    return path


def tiny_config(model, data, out, **values):
    return TrainConfig.from_dict({
        "base_model": str(model), "train_data_dir": str(data), "output_dir": str(out), "output_name": "m",
        "resolution": 64, "min_bucket_reso": 32, "max_bucket_reso": 128, "bucket_reso_steps": 32, "lora_rank": 4,
        "learning_rate": 2e-3, "batch_size": 2, "max_train_steps": 3, "sample_steps": 2, "seed": 3, "device": "cpu",
        **values})


@pytest.mark.slow
@pytest.mark.parametrize("cache_latents", [True, False])
def test_a_fully_masked_dataset_teaches_nothing(tiny_sd1_files, tmp_path, cache_latents):
    """Every pixel transparent, alpha_mask on: the loss is zero everywhere, so the LoRA's up weights stay zero and it
    changes no output; the same images fully opaque do train."""
    model = tiny_sd1_files["folder"]
    ups = {}
    for opaque in (False, True):
        data = rgba_folder(tmp_path / f"data{opaque}", 2, opaque)
        config = tiny_config(model, data, tmp_path / f"out{opaque}", alpha_mask=True, cache_latents=cache_latents)
        result = run_training(config, lambda c: load_backbone_from_path(c.base_model))
        with safe_open(str(result.lora_path), "pt") as fh:
            ups[opaque] = [fh.get_tensor(k) for k in fh.keys() if k.endswith("lora_up.weight")]
            assert fh.metadata()["ss_masked_loss"] == "True"
    assert all(float(u.abs().max()) == 0.0 for u in ups[False])
    assert any(float(u.abs().max()) > 0.0 for u in ups[True])


@pytest.mark.slow
def test_a_mask_folder_weights_the_loss(tiny_sd1_files, tmp_path):
    data = rgba_folder(tmp_path / "data", 2, True)
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.new("L", (64, 64), 0).save(masks / "p0.png")  # p0 is ignored entirely; p1 has no mask: all of it counts
    config = tiny_config(tiny_sd1_files["folder"], data, tmp_path / "out", masked_loss=True, mask_dir=str(masks),
                         batch_size=1, max_train_steps=2)
    result = run_training(config, lambda c: load_backbone_from_path(c.base_model))
    log = (result.run_dir / "train.log").read_text()
    assert "p1.png" in log and "no mask" in log
    losses = [float(line.split(",")[2]) for line in (result.run_dir / "metrics.csv").read_text().splitlines()[1:]]
    assert 0.0 in losses and any(v > 0 for v in losses), "the masked image's steps have zero loss, the other's not"


def test_a_missing_mask_folder_is_one_line(tmp_path):
    from lora_trainer.errors import DatasetError
    from lora_trainer.training_data import prepare_data

    data = rgba_folder(tmp_path / "data", 1, True)
    config = tiny_config("m", data, tmp_path, masked_loss=True, mask_dir=str(tmp_path / "nope"))
    with pytest.raises(DatasetError, match="mask folder .*nope does not exist; check mask_dir"):
        prepare_data(config)


@pytest.mark.slow
def test_loss_options_train_end_to_end(tiny_sd1_files, tmp_path):
    from lora_trainer.demo import make_demo_dataset

    data = make_demo_dataset(tmp_path / "data", count=4)
    config = tiny_config(tiny_sd1_files["folder"], data, tmp_path / "out", loss_type="huber", huber_c=0.2,
                         huber_schedule="snr", min_timestep=100, max_timestep=900, debiased_estimation_loss=True,
                         zero_terminal_snr=True, max_train_steps=4)
    result = run_training(config, lambda c: load_backbone_from_path(c.base_model))
    with safe_open(str(result.lora_path), "pt") as fh:
        meta = fh.metadata()
    assert (meta["ss_loss_type"], meta["ss_huber_c"], meta["ss_huber_schedule"]) == ("huber", "0.2", "snr")
    assert (meta["ss_min_timestep"], meta["ss_max_timestep"]) == ("100", "900")
    assert meta["ss_debiased_estimation"] == "True" and meta["ss_zero_terminal_snr"] == "True"
    losses = [float(line.split(",")[2]) for line in (result.run_dir / "metrics.csv").read_text().splitlines()[1:]]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
