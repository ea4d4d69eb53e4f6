"""SDXL inside A1111 (sgm), against the stand-in in tests/standins/sgm.py: kohya's SDXL names, the dict
conditioning, and size conditioning that follows each image's original size, crop and bucket."""

import json

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from lora_trainer.backbones.a1111 import A1111Backbone
from lora_trainer.backbones.base import TrainSize
from lora_trainer.config import TrainConfig
from lora_trainer.demo import make_demo_dataset
from lora_trainer.errors import ModelError
from lora_trainer.runner import run_training

pytest.importorskip("ldm", reason="needs stable-diffusion-sdkit (installed with --no-deps by `make test`)")
pytestmark = pytest.mark.slow

from standins.sgm import SdConditioning, build_sdxl_like  # noqa: E402


def test_sdxl_trains_with_original_names_and_bucket_sizes(tiny_sd1_files, tmp_path):
    model = build_sdxl_like(tiny_sd1_files)
    pristine = {k: v.clone() for k, v in model.state_dict().items()}
    dataset = make_demo_dataset(tmp_path / "data", count=6)
    Image.new("RGB", (128, 64), "red").save(dataset / "wide.png")
    with open(dataset / "metadata.csv", "a", encoding="utf-8") as fh:
        fh.write("wide.png,a wide red banner\n")
    backbone = A1111Backbone(model)
    assert backbone.family == "sdxl"
    targets = backbone.lora_targets()
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in targets
    assert "lora_unet_output_blocks_2_1_proj_out" in targets
    assert not any("down_blocks" in name for name in targets)

    config = TrainConfig.from_dict({
        "base_model": "(webui)", "train_data_dir": str(dataset), "output_dir": str(tmp_path), "output_name": "xl",
        "resolution": 64, "min_bucket_reso": 32, "max_bucket_reso": 128, "bucket_reso_steps": 32, "lora_rank": 4,
        "learning_rate": 2e-3, "batch_size": 2, "max_train_steps": 6, "sample_steps": 2})
    result = run_training(config, lambda c: backbone)
    assert result.loss_after < result.loss_before
    buckets = {(w, h) for w, h in model.conditioner.sizes_seen}
    assert (64, 64) in buckets and any(w > h for w, h in buckets), buckets  # the wide image's own bucket
    after = model.state_dict()
    assert all(torch.equal(pristine[k], after[k]) for k in pristine)
    with safe_open(str(result.lora_path), "pt") as fh:
        meta, keys = fh.metadata(), set(fh.keys())
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight" in keys
    assert json.loads((result.run_dir / "xl.json").read_text())["sd version"] == "SDXL"


def test_sdxl_size_conditioning_is_each_images_own(tiny_sd1_files):
    """sgm's conditioner gets each image's original size, crop and bucket: SDXL's six numbers, embedded as the
    reference does (ldm's timestep_embedding), and for an uncropped image exactly what A1111's own
    get_learned_conditioning gives for that size."""
    from ldm.modules.diffusionmodules.util import timestep_embedding

    model = build_sdxl_like(tiny_sd1_files)
    backbone = A1111Backbone(model)
    cropped = TrainSize((64, 64), original_size=(200, 100), crop_top_left=(12, 4))
    with torch.no_grad():
        mixed = backbone.encode_prompts(["a", "b", "c"], [(64, 64), (128, 64), cropped])
        alone = model.get_learned_conditioning(SdConditioning(["b"], 128, 64))
        first = model.get_learned_conditioning(SdConditioning(["a"], 64, 64))
    assert torch.equal(mixed["vector"][1], alone["vector"][0]) and torch.equal(mixed["vector"][0], first["vector"][0])
    assert torch.equal(mixed["crossattn"][1], alone["crossattn"][0])
    numbers = torch.tensor([100.0, 200.0, 12.0, 4.0, 64.0, 64.0])  # original h, w; crop top, left; target h, w
    assert torch.allclose(mixed["vector"][2, -48:], timestep_embedding(numbers, 8).reshape(-1), atol=1e-6)


def test_sdxl_text_encoder_lora_is_refused_clearly(tiny_sd1_files):
    backbone = A1111Backbone(build_sdxl_like(tiny_sd1_files))
    with pytest.raises(ModelError, match="open_clip"):
        backbone.lora_targets(text_encoder=True)
