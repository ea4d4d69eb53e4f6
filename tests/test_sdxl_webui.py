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
        "learning_rate": 2e-2, "batch_size": 2, "max_train_steps": 30, "sample_steps": 2,
        "final_check": "full"})
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


def merge_like_a1111(model, tensors: dict) -> None:
    """A1111's merge of a file's text-encoder layers into an SDXL model: HF CLIP layers by name, open_clip's
    attention into ``in_proj_weight`` (q, k, v rows) and ``out_proj`` (its MultiheadAttention branch)."""
    from lora_trainer.lora_formats import lora_delta, lora_pairs

    first, second = model.conditioner.embedders[0].wrapped.transformer, model.conditioner.embedders[1].model
    with torch.no_grad():
        for name, (down, up, alpha) in lora_pairs(tensors, "file").items():
            if not name.startswith("lora_te"):
                continue
            delta = lora_delta(down, up, alpha / down.shape[0]).float()
            layer, kind = name.split("_layers_")[1].split("_", 1)
            if name.startswith("lora_te1_"):
                module = getattr(first, "text_model", first).encoder.layers[int(layer)].get_submodule(
                    kind.replace("self_attn_", "self_attn.").replace("mlp_", "mlp."))
                module.weight += delta
            elif name.startswith("lora_te2_"):
                block = second.transformer.resblocks[int(layer)]
                if kind in ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj"):
                    rows = "qkv".index(kind[len("self_attn_")]) * delta.shape[0]
                    block.attn.in_proj_weight[rows:rows + delta.shape[0]] += delta
                else:
                    module = {"self_attn_out_proj": block.attn.out_proj, "mlp_fc1": block.mlp.c_fc,
                              "mlp_fc2": block.mlp.c_proj}[kind]
                    module.weight += delta


def test_sdxl_text_encoder_lora_trains_both_encoders_and_matches_a1111s_merge(tiny_sd1_files, tmp_path):
    """SDXL's two encoders train (sgm's conditioner lets gradients through only to trainable embedders; CLIP-G's
    fused attention is split), the model is as before afterwards, and the file merged the way A1111 merges it
    gives the conditioning the trained model gave."""
    import copy

    from lora_helpers import network_as_trained

    from lora_trainer.lora_file import read_lora_file

    model = build_sdxl_like(tiny_sd1_files)
    pristine = {k: v.clone() for k, v in model.state_dict().items()}
    backbone = A1111Backbone(model)
    te = sorted(n for n in backbone.lora_targets(text_encoder=True) if n.startswith("lora_te"))
    assert len(te) == 2 * 2 * 6 and {n.split("text_model")[0] for n in te} == {"lora_te1_", "lora_te2_"}
    assert "lora_te2_text_model_encoder_layers_1_self_attn_v_proj" in te
    dataset = make_demo_dataset(tmp_path / "data", count=2)
    config = TrainConfig.from_dict({
        "base_model": "(webui)", "train_data_dir": str(dataset), "output_dir": str(tmp_path), "output_name": "xlte",
        "resolution": 64, "min_bucket_reso": 32, "max_bucket_reso": 128, "bucket_reso_steps": 32, "lora_rank": 4,
        "learning_rate": 2e-3, "text_encoder_lr": 5e-3, "batch_size": 2, "max_train_steps": 3, "sample_steps": 1,
        "train_text_encoder": True})
    result = run_training(config, lambda c: backbone)
    after = model.state_dict()
    assert all(torch.equal(pristine[k], after[k]) for k in pristine), "the WebUI's weights changed"
    assert not [n for n, m in model.named_modules() if "forward" in m.__dict__], "a patched forward is left"
    assert not any(getattr(e, "is_trainable", False) for e in model.conditioner.embedders)
    tensors, _ = read_lora_file(result.lora_path)
    # Gradients reached both encoders: every layer of CLIP-G (its last makes the pooled output), CLIP-L's but the
    # last (SDXL reads CLIP-L's penultimate hidden states, so its last layer stays at zero, as with kohya).
    trained = {k.split(".")[0] for k, v in tensors.items() if k.endswith("lora_up.weight") and v.abs().max() > 0}
    assert {n for n in te if n.startswith("lora_te2_")} <= trained
    assert {n for n in te if n.startswith("lora_te1_")} - trained == {
        f"lora_te1_text_model_encoder_layers_1_{kind}" for kind in
        ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2")}

    network = network_as_trained(backbone.lora_targets(text_encoder=True), 4, result.run_dir)
    merged = copy.deepcopy(model)
    merge_like_a1111(merged, tensors)
    prompts, sizes = ["a red circle", "ltdemo, a green square"], [(64, 64), (64, 64)]
    with torch.no_grad():
        base = backbone.encode_prompts(prompts, sizes)
        with backbone.borrow(), network.attached_to_model():
            ours = backbone.encode_prompts(prompts, sizes)
        theirs = A1111Backbone(merged).encode_prompts(prompts, sizes)
    for key in ("crossattn", "vector"):
        assert (ours[key] - theirs[key]).abs().max() <= 1e-5, key
        assert (ours[key] - base[key]).abs().max() > 1e-4, key


def test_sdxl_latents_are_the_posteriors_mean_although_sgm_samples_it(tiny_sd1_files):
    """sgm's encode_first_stage samples the VAE posterior (as Forge's VAE does): the backbone takes its mean, so latents
    (and a resume, and the disk cache) do not depend on the global RNG; the regularizer is put back as it was."""
    model = build_sdxl_like(tiny_sd1_files)
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    assert not torch.equal(model.encode_first_stage(pixels), model.encode_first_stage(pixels))
    backbone = A1111Backbone(model)
    first, second = backbone.encode_images(pixels), backbone.encode_images(pixels)
    assert torch.equal(first, second)
    assert model.first_stage_model.regularization.sample is True
