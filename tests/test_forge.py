"""Training on Forge's loaded model, against the stand-in in tests/standins/forge.py (Forge is not on PyPI)."""

import pytest
import torch
from lora_helpers import network_as_trained

from lora_trainer.backbones.checkpointing import norm_inputs_copied
from lora_trainer.backbones.forge import ForgeBackbone, make_params_trainable_inputs
from lora_trainer.backbones.single_file import load_backbone_from_path
from lora_trainer.config import TrainConfig
from lora_trainer.demo import make_demo_dataset
from lora_trainer.errors import ModelError
from lora_trainer.runner import run_training

pytest.importorskip("ldm", reason="needs stable-diffusion-sdkit (installed with --no-deps by `make test`)")
pytestmark = pytest.mark.slow

from standins.forge import ForgeLinear, engine_flags, guessed_config, load_forge_model  # noqa: E402


@pytest.fixture
def forge_model(tiny_sd1_files):
    return load_forge_model(tiny_sd1_files)


def config(tmp_path, **changes):
    dataset = make_demo_dataset(tmp_path / "data", count=6)
    values = {"base_model": "(Forge's loaded model)", "train_data_dir": str(dataset), "output_dir": str(tmp_path),
              "output_name": "f", "resolution": 64, "min_bucket_reso": 32, "max_bucket_reso": 128,
              "bucket_reso_steps": 32, "lora_rank": 4, "learning_rate": 2e-3, "batch_size": 2,
              "max_train_steps": 6, "sample_steps": 2, "seed": 9}
    values.update(changes)
    return TrainConfig.from_dict(values)


def values_of(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_forge_layers_get_kohya_names(forge_model, tiny_sd1_files):
    backbone = ForgeBackbone(forge_model)
    reference = load_backbone_from_path(str(tiny_sd1_files["folder"]))
    for conv in (False, True):
        assert set(backbone.lora_targets(conv=conv)) == set(reference.lora_targets(conv=conv))
    targets = backbone.lora_targets(text_encoder=True)
    assert any(isinstance(layer, ForgeLinear) for layer in targets.values())
    assert set(targets) == set(reference.lora_targets(text_encoder=True))


def test_training_on_forge_model_undoes_its_loras_and_reproduces_in_diffusers(forge_model, tiny_sd1_files, tmp_path):
    from diffusers import StableDiffusionPipeline

    unet = forge_model.forge_objects.unet.model.diffusion_model
    pristine = values_of(unet)
    layer = unet.input_blocks[4][1].transformer_blocks[0].attn2.to_v
    forge_model.forge_objects_original.unet.patch_lora(layer, torch.full_like(layer.weight, 0.25))
    assert not torch.equal(layer.weight, pristine["input_blocks.4.1.transformer_blocks.0.attn2.to_v.weight"])

    text = forge_model.forge_objects.clip.cond_stage_model
    flags_before = [p.requires_grad for p in [*unet.parameters(), *text.parameters()]]
    assert sum(flags_before) > 100  # Forge's Parameters keep torch's default requires_grad=True

    backbone = ForgeBackbone(forge_model)
    result = run_training(config(tmp_path, max_train_steps=20), lambda c: backbone)  # every option at its default
    assert 0 < result.loss_before < 10 and 0 < result.loss_after < 10  # the quick check: 40 images, 1 sample, finite
    assert forge_model.current_lora_hash == "[]"
    after = values_of(unet)
    assert all(torch.equal(pristine[k], after[k]) for k in pristine), "Forge's weights changed"
    assert [p.requires_grad for p in [*unet.parameters(), *text.parameters()]] == flags_before
    assert not any("forward" in m.__dict__ or m._forward_pre_hooks for m in unet.modules())

    network = network_as_trained(backbone.lora_targets(), 4, result.run_dir)
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd1_files["folder"]), safety_checker=None,
                                                   requires_safety_checker=False, local_files_only=True)
    pipe.load_lora_weights(str(result.lora_path), adapter_name="f")
    gen = torch.Generator().manual_seed(2)
    x, t = torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([30, 600])
    with torch.no_grad():
        cond = backbone.encode_prompts(["a red circle", "a green square"])
        with network.attached_to_model():
            in_forge = backbone.predict(x, t, cond)
        in_diffusers = pipe.unet(x, t, encoder_hidden_states=cond).sample
    assert (in_forge - in_diffusers).abs().max() <= 1e-5


def test_forge_trains_with_gradient_checkpointing_too(forge_model, tmp_path):
    unet = forge_model.forge_objects.unet.model.diffusion_model
    pristine = values_of(unet)
    result = run_training(config(tmp_path, gradient_checkpointing=True, final_check="full"),
                          lambda c: ForgeBackbone(forge_model))
    assert result.loss_after < result.loss_before  # full: the 4x4 fixed batch
    assert all(torch.equal(pristine[k], v) for k, v in values_of(unet).items())


def test_the_stand_in_adds_in_place_as_forge_does(forge_model):
    """Without the norm-input copies, a LoRA's gradient through Forge's block fails as it did in the real Forge."""
    block = forge_model.forge_objects.unet.model.diffusion_model.input_blocks[4][1].transformer_blocks[0]
    make_params_trainable_inputs(block)
    block.requires_grad_(False)
    lora_like = torch.nn.Parameter(torch.zeros(1))
    context = torch.randn(1, 77, block.attn2.to_k.in_features)

    def backward():
        x = torch.randn(1, 16, block.norm1.normalized_shape[0]) + lora_like
        block._forward(x, context).sum().backward()

    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        backward()
    with norm_inputs_copied(block):
        backward()
    assert lora_like.grad is not None and not any(m._forward_pre_hooks for m in block.modules())


def test_low_bit_storage_is_refused(forge_model):
    forge_model.forge_objects.unet.model.storage_dtype = torch.float8_e4m3fn
    with pytest.raises(ModelError, match="Low Bits"):
        ForgeBackbone(forge_model)
    forge_model.forge_objects.unet.model.storage_dtype = torch.float32


@pytest.mark.parametrize("guess, name", [("Flux", "Flux.1-dev"), ("FluxSchnell", "Flux.1-schnell"), ("SD3", "SD3"),
                                         ("SDXLRefiner", "an SDXL refiner"), ("SSD1B", "SSD-1B")])
def test_every_family_but_sd1_sd2_sdxl_is_refused_by_name_before_anything_is_touched(forge_model, guess, name):
    """Forge never sets ``is_flux``: its Flux engine has every ``is_*`` flag False and huggingface_guess's Flux class
    as ``model_config``; the old guard (``is_flux``) let it through as SD1. SSD-1B and the refiner go through the
    SDXL engines (``is_sdxl`` True) but are other architectures."""
    engine_flags(forge_model, guess)
    if guess in ("SDXLRefiner", "SSD1B"):
        forge_model.is_sdxl = True  # Forge's StableDiffusionXL(Refiner) engines
    forge_model.forge_objects_original.unet.patch_lora = None  # any use of the model would fail loudly
    unet = forge_model.forge_objects.unet.model.diffusion_model
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    with pytest.raises(ModelError, match=f"the loaded checkpoint is {name}; training supports SD1, SD2 and SDXL "
                                         "checkpoints in this version"):
        ForgeBackbone(forge_model)
    assert forge_model.current_lora_hash != "[]"  # its LoRAs were not even undone
    assert all(torch.equal(v, unet.state_dict()[k]) for k, v in before.items())


def test_an_inpainting_checkpoint_is_refused(forge_model):
    forge_model.model_config = guessed_config("SD15", in_channels=9)
    forge_model.is_inpaint = True
    with pytest.raises(ModelError, match="an inpainting SD1 model"):
        ForgeBackbone(forge_model)


def test_kohya_dataset_features_on_forges_model(forge_model, tmp_path):
    reg = make_demo_dataset(tmp_path / "reg" / "1_shape", count=3, seed=4).parent
    unet = forge_model.forge_objects.unet.model.diffusion_model
    pristine = values_of(unet)
    backbone = ForgeBackbone(forge_model)
    result = run_training(config(tmp_path, reg_data_dir=str(reg), validation_split=0.2, validate_every_n_steps=3,
                                 alpha_mask=True, loss_type="smooth_l1", debiased_estimation_loss=True,
                                 cache_latents_to_disk=True, cache_text_encoder_outputs_to_disk=True),
                          lambda c: backbone)
    rows = (result.run_dir / "metrics.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in rows[1:] if not line.endswith(",")] == ["3", "6"]
    assert any((tmp_path / ".cache" / "latents").rglob("*.safetensors"))
    after = values_of(unet)
    assert all(torch.equal(pristine[k], after[k]) for k in pristine), "Forge's weights changed"


def test_latents_are_the_posteriors_mean_although_forge_samples_it(forge_model):
    """Forge's VAE samples its posterior at each encode (the real suite found the disk cache never reused on Forge);
    the backbone takes the mean through Forge's VAE regulation hook, for this call only."""
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    sampled = [forge_model.encode_first_stage(pixels) for _ in range(2)]
    assert not torch.equal(*sampled), "the stand-in must sample, as Forge does"
    backbone = ForgeBackbone(forge_model)
    first, second = backbone.encode_images(pixels), backbone.encode_images(pixels)
    assert torch.equal(first, second)
    mean = forge_model.vae.encode(pixels).latent_dist.mean * 0.18215
    assert torch.allclose(first, mean)
    assert "model_vae_regulation" not in forge_model.forge_objects.vae.patcher.model_options
