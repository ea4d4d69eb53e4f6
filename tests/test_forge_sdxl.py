"""SDXL inside Forge, against the stand-in in tests/standins/forge_xl.py: kohya's original-path UNet names,
``lora_te1_``/``lora_te2_`` for Forge's two HF text encoders, size conditioning per bucket, inference tensors."""

import json

import pytest
import torch
from PIL import Image

from lora_trainer.backbones.base import TrainSize
from lora_trainer.backbones.forge import ForgeBackbone
from lora_trainer.config import TrainConfig
from lora_trainer.demo import make_demo_dataset
from lora_trainer.lora_file import read_lora_file
from lora_trainer.runner import run_training

pytest.importorskip("ldm", reason="needs stable-diffusion-sdkit (installed with --no-deps by `make test`)")
pytestmark = pytest.mark.slow

from standins.forge import ForgeLinear  # noqa: E402
from standins.forge_xl import SdConditioning, load_forge_xl_model  # noqa: E402


@pytest.fixture
def forge_xl(tiny_sd1_files):
    return load_forge_xl_model(tiny_sd1_files)


def backbone_of(model):
    return ForgeBackbone(model)


def values_of(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def inference_tensors(module):
    return [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_inference()]


def test_forge_sdxl_names_and_size_conditioning(forge_xl):
    backbone = backbone_of(forge_xl)
    assert (backbone.family, backbone.prediction_type) == ("sdxl", "epsilon")
    unet_targets = backbone.lora_targets()
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in unet_targets
    assert "lora_unet_output_blocks_2_1_proj_out" in unet_targets
    assert not any("down_blocks" in name or name.startswith("lora_te") for name in unet_targets)
    assert all(isinstance(layer, ForgeLinear) for layer in unet_targets.values())

    targets = backbone.lora_targets(text_encoder=True)
    te = sorted(name for name in targets if name.startswith("lora_te"))
    assert {name.split("text_model")[0] for name in te} == {"lora_te1_", "lora_te2_"}
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in te
    assert "lora_te2_text_model_encoder_layers_1_mlp_fc2" in te
    assert len(te) == 2 * 2 * 6  # two encoders, two layers each, q/k/v/out + fc1/fc2

    # Each image's own size numbers, made with Forge's own embedder: for an uncropped image exactly what Forge's
    # get_learned_conditioning gives for that size, for a cropped one SDXL's six numbers as the reference embeds them.
    from ldm.modules.diffusionmodules.util import timestep_embedding

    cropped = TrainSize((64, 64), original_size=(200, 100), crop_top_left=(12, 4))
    with torch.no_grad():
        mixed = backbone.encode_prompts(["a", "b", "a"], [(64, 64), (128, 64), cropped])
    alone = forge_xl.get_learned_conditioning(SdConditioning(["b"], 128, 64))
    assert torch.allclose(mixed["vector"][1], alone["vector"][0], atol=1e-6)
    numbers = torch.tensor([100.0, 200.0, 12.0, 4.0, 64.0, 64.0])
    assert torch.allclose(mixed["vector"][2, -48:], timestep_embedding(numbers, 8).reshape(-1), atol=1e-6)
    assert torch.equal(mixed["vector"][0, :-48], mixed["vector"][2, :-48])  # the same pooled text part
    assert not mixed["vector"].is_inference() and not mixed["crossattn"].is_inference()
    assert mixed["crossattn"].shape == (3, 77, 32 + 64)


def test_forge_sdxl_trains_unet_and_both_text_encoders_and_gives_everything_back(forge_xl, tmp_path):
    unet = forge_xl.forge_objects.unet.model.diffusion_model
    encoders = forge_xl.forge_objects.clip.cond_stage_model
    pristine_unet, pristine_te = values_of(unet), values_of(encoders)
    assert inference_tensors(unet) and inference_tensors(encoders)  # as Forge loads them
    flags_before = [p.requires_grad for p in [*unet.parameters(), *encoders.parameters()]]
    assert any(flags_before)  # torch's default, which Forge's Parameters keep
    layer = unet.input_blocks[4][1].transformer_blocks[0].attn2.to_v
    forge_xl.forge_objects_original.unet.patch_lora(layer, torch.full_like(layer.weight, 0.25))  # a LoRA applied

    dataset = make_demo_dataset(tmp_path / "data", count=1)
    Image.new("RGB", (128, 64), "red").save(dataset / "wide.png")
    with open(dataset / "metadata.csv", "a", encoding="utf-8") as fh:
        fh.write("wide.png,a wide red banner\n")
    config = TrainConfig.from_dict({
        "base_model": "(Forge's loaded model)", "train_data_dir": str(dataset), "output_dir": str(tmp_path),
        "output_name": "fxl", "resolution": 64, "min_bucket_reso": 32, "max_bucket_reso": 128,
        "bucket_reso_steps": 32, "lora_rank": 4, "learning_rate": 2e-3, "text_encoder_lr": 1e-3, "batch_size": 2,
        "max_train_steps": 2, "sample_steps": 1, "seed": 11, "train_text_encoder": True})
    backbone = backbone_of(forge_xl)
    encode, sizes_seen = backbone.encode_prompts, []

    def spy(prompts, sizes=None):  # what the training loop asks the conditioning for
        sizes_seen.extend(tuple(s) for s in sizes or ())
        return encode(prompts, sizes)

    backbone.encode_prompts = spy
    result = run_training(config, lambda c: backbone)

    buckets = set(sizes_seen)
    assert (64, 64) in buckets and any(w > h for w, h in buckets), buckets  # the wide image's own bucket
    assert forge_xl.current_lora_hash == "[]"
    after_unet, after_te = values_of(unet), values_of(encoders)
    assert all(torch.equal(pristine_unet[k], after_unet[k]) for k in pristine_unet), "Forge's UNet changed"
    assert all(torch.equal(pristine_te[k], after_te[k]) for k in pristine_te), "Forge's text encoders changed"
    assert inference_tensors(unet) == [] and inference_tensors(encoders) == []
    assert [p.requires_grad for p in [*unet.parameters(), *encoders.parameters()]] == flags_before
    assert not any("forward" in m.__dict__ or m._forward_pre_hooks for m in [*unet.modules(), *encoders.modules()])

    tensors, meta = read_lora_file(result.lora_path)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["ss_text_encoder_lr"] == "0.001"
    assert json.loads((result.run_dir / "fxl.json").read_text())["sd version"] == "SDXL"
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight" in tensors
    ups = {k: v for k, v in tensors.items() if k.endswith(".lora_up.weight")}
    # Gradients reached both encoders through get_learned_conditioning: every CLIP-G layer (crossattn + pooled) and
    # CLIP-L's first layer (SDXL conditions on CLIP-L's penultimate layer, so its last layer gets none, as in kohya).
    assert all(v.abs().sum() > 0 for k, v in ups.items() if k.startswith("lora_te2_")), "CLIP-G got no gradient"
    assert all(v.abs().sum() > 0 for k, v in ups.items() if k.startswith("lora_te1_text_model_encoder_layers_0_"))
    assert all(v.abs().sum() > 0 for k, v in ups.items() if k.startswith("lora_unet_"))
