"""SD2 768-v inside Forge (tests/standins/forge.py): v-prediction from Forge's predictor, and text-encoder LoRA on
Forge's HF ``clip_h`` under kohya's ``lora_te_`` names; the file reproduces the trained model in diffusers."""

import pytest
import torch
from lora_helpers import network_as_trained

from lora_trainer.backbones.forge import ForgeBackbone
from lora_trainer.config import TrainConfig
from lora_trainer.demo import make_demo_dataset
from lora_trainer.lora_file import read_lora_file
from lora_trainer.runner import run_training

pytest.importorskip("ldm", reason="needs stable-diffusion-sdkit (installed with --no-deps by `make test`)")
pytest.importorskip("open_clip")
pytestmark = pytest.mark.slow

from standins.forge import load_forge_model  # noqa: E402


def test_forge_sd2_trains_unet_and_clip_h_and_reproduces_in_diffusers(tiny_sd2_files, tmp_path):
    from diffusers import StableDiffusionPipeline

    forge_model = load_forge_model(tiny_sd2_files)
    unet = forge_model.forge_objects.unet.model.diffusion_model
    encoders = forge_model.forge_objects.clip.cond_stage_model
    assert list(encoders) == ["clip_h"]
    pristine = {k: v.clone() for k, v in [*unet.state_dict().items(), *encoders.state_dict().items()]}
    backbone = ForgeBackbone(forge_model)
    assert (backbone.family, backbone.prediction_type) == ("sd2", "v_prediction")
    reference = tiny_sd2_files["backbone"]
    assert set(backbone.lora_targets(text_encoder=True)) == set(reference.lora_targets(text_encoder=True))

    config = TrainConfig.from_dict({
        "base_model": "(Forge's loaded model)", "train_data_dir": str(make_demo_dataset(tmp_path / "data", count=1)),
        "output_dir": str(tmp_path), "output_name": "fv2", "resolution": 64, "min_bucket_reso": 32,
        "max_bucket_reso": 128, "bucket_reso_steps": 32, "lora_rank": 4, "learning_rate": 2e-3, "batch_size": 1,
        "max_train_steps": 2, "sample_steps": 1, "seed": 5, "train_text_encoder": True})
    result = run_training(config, lambda c: backbone)
    after = {**unet.state_dict(), **encoders.state_dict()}
    assert all(torch.equal(pristine[k], after[k]) for k in pristine), "Forge's weights changed"
    assert not [n for n, t in [*unet.named_parameters(), *encoders.named_parameters()] if t.is_inference()]

    tensors, meta = read_lora_file(result.lora_path)
    assert (meta["ss_v2"], meta["modelspec.architecture"], meta["modelspec.prediction_type"]) == \
        ("True", "stable-diffusion-v2-768-v/lora", "v")
    ups = {k: v for k, v in tensors.items() if k.endswith(".lora_up.weight")}
    assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in ups)
    assert all(v.abs().sum() > 0 for v in ups.values()), "a layer got no gradient"

    network = network_as_trained(backbone.lora_targets(text_encoder=True), 4, result.run_dir)
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd2_files["folder"]), safety_checker=None,
                                                   requires_safety_checker=False, local_files_only=True)
    pipe.load_lora_weights(str(result.lora_path), adapter_name="fv2")
    gen = torch.Generator().manual_seed(6)
    x, t = torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([25, 850])
    prompts = ["a red circle", "a green square"]
    with torch.no_grad():
        with network.attached_to_model():
            cond = backbone.encode_prompts(prompts)
            in_forge = backbone.predict(x, t, cond)
        embeds, _ = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1,
                                       do_classifier_free_guidance=False)
        in_diffusers = pipe.unet(x, t, encoder_hidden_states=cond).sample
    assert (embeds - cond).abs().max() <= 1e-5  # the text-encoder LoRA, as diffusers applies it
    assert (in_forge - in_diffusers).abs().max() <= 1e-5
