"""SD2 768-v inside A1111: ldm's LatentDiffusion with parameterization "v" and the open_clip text encoder
(``FrozenOpenCLIPEmbedder``), built from ``<ckpt>.yaml`` as A1111 does (tests/standins/a1111.py)."""

import pytest
import torch
from lora_helpers import network_as_trained

from lora_trainer.backbones.a1111 import A1111Backbone
from lora_trainer.config import TrainConfig
from lora_trainer.demo import make_demo_dataset
from lora_trainer.lora_file import read_lora_file
from lora_trainer.runner import run_training

pytest.importorskip("ldm", reason="needs stable-diffusion-sdkit (installed with --no-deps by `make test`)")
pytest.importorskip("open_clip")
pytestmark = pytest.mark.slow

from standins.a1111 import load_ldm_model  # noqa: E402


@pytest.fixture(scope="module")
def sd2_model(tiny_sd2_files):
    return load_ldm_model(tiny_sd2_files["safetensors"])


def config(tmp_path, **changes):
    dataset = make_demo_dataset(tmp_path / "data", count=2)
    values = {"base_model": "(the WebUI's loaded model)", "train_data_dir": str(dataset), "output_dir": str(tmp_path),
              "output_name": "v2", "resolution": 64, "min_bucket_reso": 32, "max_bucket_reso": 128,
              "bucket_reso_steps": 32, "lora_rank": 4, "learning_rate": 2e-3, "batch_size": 2,
              "max_train_steps": 3, "sample_steps": 1, "seed": 3}
    values.update(changes)
    return TrainConfig.from_dict(values)


def test_sd2_model_is_recognised_with_kohyas_names(sd2_model, tiny_sd2_files):
    assert type(sd2_model.cond_stage_model).__name__ == "FrozenOpenCLIPEmbedder"
    assert not hasattr(sd2_model.cond_stage_model.model, "visual")
    backbone = A1111Backbone(sd2_model)
    assert (backbone.family, backbone.prediction_type) == ("sd2", "v_prediction")
    reference = tiny_sd2_files["backbone"]
    for conv in (False, True):
        assert set(backbone.lora_targets(conv=conv)) == set(reference.lora_targets(conv=conv))
    assert "lora_unet_down_blocks_1_attentions_0_proj_in" in backbone.lora_targets()  # a Linear (use_linear_in_...)
    with torch.no_grad():  # A1111's open_clip conditioning is what the diffusers SD2 computes
        prompts = ["a red circle, blue background", "a green square"]
        assert (backbone.encode_prompts(prompts) - reference.encode_prompts(prompts)).abs().max() <= 1e-5


def test_sd2_text_encoder_lora_trained_in_the_webui_reproduces_in_diffusers(sd2_model, tiny_sd2_files, tmp_path):
    """open_clip's fused attention: q/k/v/out trained under kohya's HF names; the file in diffusers (whose SD2
    encoder is the converted HF CLIP) gives the text embeddings the WebUI's encoder gave while trained."""
    from diffusers import StableDiffusionPipeline

    pristine = {k: v.clone() for k, v in sd2_model.state_dict().items()}
    requires_grad = [p.requires_grad for p in sd2_model.parameters()]
    backbone = A1111Backbone(sd2_model)
    reference = tiny_sd2_files["backbone"]
    te_names = {n for n in backbone.lora_targets(text_encoder=True) if n.startswith("lora_te_")}
    assert te_names == {n for n in reference.lora_targets(text_encoder=True) if n.startswith("lora_te_")}
    result = run_training(config(tmp_path, train_text_encoder=True, text_encoder_lr=5e-3), lambda c: backbone)
    after = sd2_model.state_dict()
    assert all(torch.equal(pristine[k], after[k]) for k in pristine), "the WebUI's weights changed"
    assert [p.requires_grad for p in sd2_model.parameters()] == requires_grad
    assert not [n for n, m in sd2_model.named_modules() if "forward" in m.__dict__], "a patched forward is left"
    tensors, meta = read_lora_file(result.lora_path)
    assert {k.split(".")[0] for k in tensors if k.startswith("lora_te_")} == te_names
    assert meta["ss_text_encoder_lr"] == "0.005"

    network = network_as_trained(backbone.lora_targets(text_encoder=True), 4, result.run_dir)
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd2_files["folder"]), safety_checker=None,
                                                   requires_safety_checker=False, local_files_only=True)
    pipe.load_lora_weights(str(result.lora_path), adapter_name="v2")
    prompts = ["a red circle, blue background", "ltdemo, a green square"]
    with torch.no_grad():
        base = backbone.encode_prompts(prompts)
        with backbone.borrow(), network.attached_to_model():
            in_webui = backbone.encode_prompts(prompts)
        in_diffusers = pipe.encode_prompt(prompts, "cpu", 1, False)[0]
    assert (in_webui - in_diffusers).abs().max() <= 1e-5
    assert (in_webui - base).abs().max() > 1e-4, "the text-encoder LoRA changes nothing"
    assert torch.equal(backbone.encode_prompts(prompts), base)  # detached and un-split: the encoder as it was


def test_sd2_file_trained_in_the_webui_reproduces_in_diffusers(sd2_model, tiny_sd2_files, tmp_path):
    from diffusers import StableDiffusionPipeline

    pristine = {k: v.clone() for k, v in sd2_model.state_dict().items()}
    requires_grad = [p.requires_grad for p in sd2_model.parameters()]
    backbone = A1111Backbone(sd2_model)
    result = run_training(config(tmp_path), lambda c: backbone)
    after = sd2_model.state_dict()
    assert all(torch.equal(pristine[k], after[k]) for k in pristine), "the WebUI's weights changed"
    assert [p.requires_grad for p in sd2_model.parameters()] == requires_grad

    tensors, meta = read_lora_file(result.lora_path)
    assert (meta["ss_base_model_version"], meta["ss_v2"]) == ("sd_v2", "True")
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert meta["modelspec.prediction_type"] == "v"
    assert meta["ss_sd_model_name"] == "tiny-sd2"
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight" in tensors
    assert not any(k.startswith("lora_te") for k in tensors)

    network = network_as_trained(backbone.lora_targets(), 4, result.run_dir)
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd2_files["folder"]), safety_checker=None,
                                                   requires_safety_checker=False, local_files_only=True)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    pipe.load_lora_weights(str(result.lora_path), adapter_name="v2")
    gen = torch.Generator().manual_seed(4)
    x, t = torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([15, 900])
    with torch.no_grad():
        cond = backbone.encode_prompts(["a red circle", "a green square"])
        base_webui = backbone.predict(x, t, cond)
        with network.attached_to_model():
            in_webui = backbone.predict(x, t, cond)
        in_diffusers = pipe.unet(x, t, encoder_hidden_states=cond).sample
        pipe.set_adapters(["v2"], [0.0])
        base = pipe.unet(x, t, encoder_hidden_states=cond).sample
    assert (base_webui - base).abs().max() <= 1e-5
    assert (in_webui - in_diffusers).abs().max() <= 1e-5
    assert (in_diffusers - base).abs().max() > 1e-4, "the LoRA changes nothing"
