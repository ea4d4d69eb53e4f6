"""Training SD1, SD2 (768-v) and SDXL, with and without text-encoder LoRA: the file loads in diffusers with every key
used and reproduces the trained UNet and text encoders; keys and metadata are kohya's for the family."""

from __future__ import annotations

import json

import pytest
import torch
from lora_helpers import load_trained_state

from lora_trainer.backbones.base import TrainSize
from lora_trainer.backbones.single_file import load_backbone_from_path
from lora_trainer.config import TrainConfig
from lora_trainer.demo import make_demo_dataset
from lora_trainer.lora_file import read_lora_file
from lora_trainer.runner import run_training
from lora_trainer.trainer import build_network

pytestmark = pytest.mark.slow

FAMILY_META = {  # ss_base_model_version, ss_v2, modelspec.architecture, modelspec.prediction_type, "sd version"
    "sd1": ("sd_v1", "False", "stable-diffusion-v1/lora", "epsilon", "SD1"),
    "sd2": ("sd_v2", "True", "stable-diffusion-v2-768-v/lora", "v", "SD2"),
    "sdxl": ("sdxl_base_v1-0", "False", "stable-diffusion-xl-v1-base/lora", "epsilon", "SDXL"),
}
UNET_KEY = {"sd1": "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
            "sd2": "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
            "sdxl": "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"}
TE_PREFIXES = {"sd1": ("lora_te_",), "sd2": ("lora_te_",), "sdxl": ("lora_te1_", "lora_te2_")}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("data") / "shapes", count=3)


@pytest.fixture(scope="module")
def folders(tiny_sd1_files, tmp_path_factory):
    from lora_trainer.backbones.tiny_families import build_tiny_sd2, build_tiny_sdxl, save_tiny_folder

    root = tmp_path_factory.mktemp("families")
    return {"sd1": tiny_sd1_files["folder"], "sd2": save_tiny_folder(build_tiny_sd2(0), root / "sd2"),
            "sdxl": save_tiny_folder(build_tiny_sdxl(0), root / "sdxl")}


def trained_network(config, backbone, run_dir):
    """The network exactly as trained: fp32 parameters from the final checkpoint's state."""
    return load_trained_state(build_network(config, backbone), run_dir)


def _count_adapted(module, adapter: str) -> int:
    return sum(1 for _, m in module.named_modules() if hasattr(m, "lora_A") and adapter in m.lora_A)


@pytest.mark.parametrize("train_te", [False, True], ids=["unet", "unet+te"])
@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_file_reproduces_the_trained_model_in_diffusers(family, train_te, folders, dataset, tmp_path):
    from diffusers import DiffusionPipeline

    folder = folders[family]
    config = TrainConfig.from_dict({
        "base_model": str(folder), "train_data_dir": str(dataset), "output_dir": str(tmp_path), "output_name": "f",
        "resolution": 64, "min_bucket_reso": 32, "max_bucket_reso": 128, "bucket_reso_steps": 32, "lora_rank": 4,
        "learning_rate": 2e-2, "text_encoder_lr": 1e-2, "batch_size": 1, "max_train_steps": 3, "sample_steps": 1,
        "seed": 7, "device": "cpu", "save_precision": "fp32", "train_text_encoder": train_te,
        "trigger_word": "ltdemo"})
    seen_sizes = []

    def load(c):
        backbone = load_backbone_from_path(c.base_model)
        encode = backbone.encode_prompts

        def spy(prompts, sizes=None):
            seen_sizes.extend(sizes or [])
            return encode(prompts, sizes)

        backbone.encode_prompts = spy
        return backbone

    result = run_training(config, load)
    tensors, meta = read_lora_file(result.lora_path)
    modules = {k.split(".", 1)[0] for k in tensors}

    # kohya's names and metadata for the family
    assert UNET_KEY[family] in modules
    te_modules = {m for m in modules if m.startswith("lora_te")}
    assert bool(te_modules) == train_te
    assert all(m.startswith(TE_PREFIXES[family]) for m in te_modules)
    if train_te:
        assert {m.split("text_model")[0] for m in te_modules} == set(TE_PREFIXES[family])
    version, v2, architecture, prediction, sd_version = FAMILY_META[family]
    assert (meta["ss_base_model_version"], meta["ss_v2"], meta["modelspec.architecture"],
            meta["modelspec.prediction_type"]) == (version, v2, architecture, prediction)
    assert meta["ss_text_encoder_lr"] == ("0.01" if train_te else "0")
    sidecar = json.loads((result.run_dir / "f.json").read_text())
    assert sidecar["sd version"] == sd_version
    # Training hands each image's bucket, original size and crop to the text conditioning (SDXL's time ids);
    # plain sizes come only from rendering samples. 3 steps of batch 1 are one epoch: every image is seen.
    trained_sizes = {s.key() for s in seen_sizes if isinstance(s, TrainSize)}
    assert trained_sizes == {((64, 64), (96, 64), (0, 16)), ((64, 64), (64, 64), (0, 0))}

    # The network exactly as trained, and the file in diffusers.
    ours = load_backbone_from_path(str(folder))
    network = trained_network(config, ours, result.run_dir)
    pipe = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.load_lora_weights(str(result.lora_path), adapter_name="ours")
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])
    assert _count_adapted(pipe.unet, "ours") + sum(_count_adapted(e, "ours") for e in encoders) == len(modules), \
        "diffusers did not use every key of the file"

    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([20, 800])
    prompts = ["ltdemo, a red circle, blue background", "a green square"]
    sizes = [TrainSize((64, 64), (96, 64), (0, 16)), (64, 64)]
    ids = [ours.tokenize(prompts, tok) for tok in ([ours.tokenizer] + ([ours.tokenizer_2] if family == "sdxl" else []))]
    ours_encoders = [ours.text_encoder] + ([ours.text_encoder_2] if family == "sdxl" else [])
    with torch.no_grad():
        with network.attached_to_model():
            cond = ours.encode_prompts(prompts, sizes)
            mine = ours.predict(x, t, cond)
            my_states = [e(i, output_hidden_states=True).hidden_states for e, i in zip(ours_encoders, ids)]
        if family == "sdxl":
            theirs = pipe.unet(x, t, encoder_hidden_states=cond["crossattn"],
                               added_cond_kwargs={"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]})
            embeds, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
            assert (embeds - cond["crossattn"]).abs().max() <= 1e-5
            assert (pooled - cond["text_embeds"]).abs().max() <= 1e-5
        else:
            theirs = pipe.unet(x, t, encoder_hidden_states=cond)
            embeds, _ = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1,
                                           do_classifier_free_guidance=False)
            assert (embeds - cond).abs().max() <= 1e-5
        assert (theirs.sample - mine).abs().max() <= 1e-5
        for encoder, i, states in zip(encoders, ids, my_states):
            for a, b in zip(encoder(i, output_hidden_states=True).hidden_states, states):
                assert (a - b).abs().max() <= 1e-5
        pipe.set_adapters(["ours"], [0.0])
        base = pipe.unet(x, t, encoder_hidden_states=cond["crossattn"] if family == "sdxl" else cond,
                         **({"added_cond_kwargs": {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}}
                            if family == "sdxl" else {})).sample
        assert (base - mine).abs().max() > 1e-4, "the LoRA changes nothing"
