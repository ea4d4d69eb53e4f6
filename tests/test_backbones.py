"""The SD1 diffusers backbone, the tiny model, the offline tokenizer / configs and the single-file loader."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from lora_trainer.errors import ModelError

GOLDEN_UNET = [
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
    "lora_unet_down_blocks_1_attentions_1_transformer_blocks_0_attn2_to_k",
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0",
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_ff_net_0_proj",
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_ff_net_2",
    "lora_unet_down_blocks_1_attentions_0_proj_in",
    "lora_unet_mid_block_attentions_0_proj_out",
    "lora_unet_up_blocks_0_attentions_2_transformer_blocks_0_attn2_to_v",
]
GOLDEN_CONV = [
    "lora_unet_down_blocks_0_resnets_0_conv1",
    "lora_unet_down_blocks_0_resnets_1_time_emb_proj",
    "lora_unet_down_blocks_1_resnets_0_conv_shortcut",
    "lora_unet_down_blocks_0_downsamplers_0_conv",
    "lora_unet_up_blocks_0_upsamplers_0_conv",
    "lora_unet_mid_block_resnets_1_conv2",
]
GOLDEN_TE = [
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
    "lora_te_text_model_encoder_layers_0_self_attn_out_proj",
    "lora_te_text_model_encoder_layers_2_mlp_fc1",
    "lora_te_text_model_encoder_layers_2_mlp_fc2",
]


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _one_line(error: pytest.ExceptionInfo, path) -> str:
    text = str(error.value)
    assert "\n" not in text and "Traceback" not in text, text
    assert str(path) in text and " — " in text, text
    return text


# ---- tokenizer and configs ------------------------------------------------------------------------------------
def test_tokenizer_matches_open_clip(tmp_path, monkeypatch):
    import open_clip
    from transformers import CLIPTokenizer

    from lora_trainer.backbones.tokenizer_files import TOKENIZER_FILES, clip_tokenizer_dir

    monkeypatch.setenv("LORA_TRAINER_CACHE", str(tmp_path))
    folder = clip_tokenizer_dir()
    assert folder == tmp_path / "clip_tokenizer"
    assert sorted(p.name for p in folder.iterdir()) == sorted(TOKENIZER_FILES)
    assert [p.name for p in tmp_path.iterdir()] == ["clip_tokenizer"]  # no temporary folder left behind
    stamp = (folder / "vocab.json").stat().st_mtime_ns
    assert clip_tokenizer_dir() == folder and (folder / "vocab.json").stat().st_mtime_ns == stamp

    tok = CLIPTokenizer.from_pretrained(str(folder))
    assert len(tok) == 49408 and tok.bos_token_id == 49406 and tok.eos_token_id == 49407
    for text in ["a photo of a cat", "A Photo of SKS dog, 4k, highly-detailed!!  ", "naïve café 😀 (masterpiece:1.2)",
                 "", "tokyo-tower_2024 東京", "word " * 100]:
        ours = tok(text, max_length=77, truncation=True).input_ids
        reference = [t for t in open_clip.tokenize([text])[0].tolist() if t != 0]
        assert ours == reference, text


def test_family_config_dirs(tmp_path, monkeypatch, tiny_sd1_files):
    from lora_trainer.backbones.family_configs import family_config_dir

    monkeypatch.setenv("LORA_TRAINER_CACHE", str(tmp_path / "cache"))
    sd1 = family_config_dir("sd1")
    for part in ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
                 "scheduler/scheduler_config.json", "tokenizer/vocab.json", "tokenizer/merges.txt"):
        assert (sd1 / part).is_file(), part
    assert family_config_dir("sd1") == sd1
    assert json.loads((sd1 / "unet" / "config.json").read_text())["cross_attention_dim"] == 768

    given = tiny_sd1_files["config"]
    assert family_config_dir("sd1", str(given)) == given  # has a tokenizer: used as it is
    bare = tmp_path / "bare"
    shutil.copytree(given, bare)
    shutil.rmtree(bare / "tokenizer")
    assembled = family_config_dir("sd1", str(bare))
    assert assembled != bare and (assembled / "tokenizer" / "vocab.json").is_file()
    assert (assembled / "unet" / "config.json").read_bytes() == (bare / "unet" / "config.json").read_bytes()
    assert not (bare / "tokenizer").exists()  # the user's folder is not written to

    with pytest.raises(ModelError) as err:
        family_config_dir("sd1", str(tmp_path))
    _one_line(err, tmp_path)
    with pytest.raises(ModelError):
        family_config_dir("flux")


def test_bundled_sd1_config_is_the_real_architecture():
    """The bundled JSONs build SD1.5's exact modules (on the meta device: no memory), with kohya's module counts."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from lora_trainer.backbones.diffusers_sd import DiffusersSDBackbone
    from lora_trainer.backbones.family_configs import BUNDLED
    from lora_trainer.backbones.tokenizer_files import clip_tokenizer_dir

    def load(part):
        return json.loads((BUNDLED / "sd1" / part).read_text())

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(load("unet/config.json"))
        vae = AutoencoderKL.from_config(load("vae/config.json"))
        te = CLIPTextModel(CLIPTextConfig(**load("text_encoder/config.json")))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert (count(unet), count(vae), count(te)) == (859_520_964, 83_653_863, 123_060_480)
    bb = DiffusersSDBackbone(unet, vae, te, CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir())),
                             load("scheduler/scheduler_config.json"))
    # kohya sd-scripts on SD1.5: "create LoRA for U-Net: 192 modules" (278 with conv), text encoder: 72.
    assert len(bb.lora_targets()) == 192
    assert len(bb.lora_targets(conv=True)) == 278
    assert len(bb.lora_targets(text_encoder=True)) == 192 + 72
    assert torch.allclose(bb.alphas_cumprod[[0, -1]], torch.tensor([0.99915, 0.0046601]), atol=1e-6)


# ---- the tiny model and the backbone --------------------------------------------------------------------------
def test_tiny_is_deterministic_and_leaves_the_rng_alone(tiny_sd1):
    from lora_trainer.backbones.tiny import build_tiny_sd1

    state = torch.random.get_rng_state()
    again = build_tiny_sd1(0)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert _same_weights(again.unet, tiny_sd1.unet) and _same_weights(again.text_encoder, tiny_sd1.text_encoder)
    assert not _same_weights(build_tiny_sd1(1).unet, tiny_sd1.unet)
    assert tiny_sd1.family == "sd1" and tiny_sd1.prediction_type == "epsilon"
    assert tiny_sd1.alphas_cumprod.shape == (1000,) and tiny_sd1.alphas_cumprod.dtype == torch.float32


def test_lora_target_names(tiny_sd1):
    attn = tiny_sd1.lora_targets()
    conv = tiny_sd1.lora_targets(conv=True)
    with_te = tiny_sd1.lora_targets(text_encoder=True)
    assert set(GOLDEN_UNET) <= set(attn) and set(GOLDEN_CONV) <= set(conv) - set(attn)
    assert set(GOLDEN_TE) <= set(with_te)
    # Each Transformer2DModel: attn1 and attn2 q/k/v/out, ff x2, proj_in, proj_out = 12 layers.
    n_transformers = 2 + 3 + 1  # down level 1, up level 0, mid block
    assert len(attn) == n_transformers * (10 + 2)
    assert len(with_te) - len(attn) == 3 * 6  # 3 layers x q/k/v/out/fc1/fc2
    assert len(conv) > len(attn)
    assert all(k.startswith("lora_unet_") for k in conv)
    assert all(k.startswith(("lora_unet_", "lora_te_text_model_encoder_layers_")) for k in with_te)
    assert all(isinstance(m, (nn.Linear, nn.Conv2d)) for m in conv.values())
    assert all(m.kernel_size == (1, 1) for m in attn.values() if isinstance(m, nn.Conv2d))
    assert attn["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"] is \
        tiny_sd1.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    assert not any("time_embedding" in k for k in conv)  # kohya adapts only attention/resnet/sampler blocks


def test_encode_and_predict_shapes(tiny_sd1):
    pixels = torch.rand(2, 3, 64, 48) * 2 - 1
    latents = tiny_sd1.encode_images(pixels)
    assert latents.shape == (2, 4, 8, 6) and not latents.requires_grad
    assert torch.equal(latents, tiny_sd1.encode_images(pixels))  # the mean, not a sample
    cond = tiny_sd1.encode_prompts(["a cat", "a dog"], [(48, 64)] * 2)
    assert cond.shape == (2, 77, 32)
    out = tiny_sd1.predict(latents, torch.tensor([10, 900]), cond)
    assert out.shape == latents.shape


def test_clip_skip_and_gradients(tiny_sd1):
    from lora_trainer.backbones.diffusers_sd import DiffusersSDBackbone, text_model_of

    bb = tiny_sd1
    skip2 = DiffusersSDBackbone(bb.unet, bb.vae, bb.text_encoder, bb.tokenizer, bb.noise_scheduler_config, clip_skip=2)
    with torch.no_grad():
        ids = bb.tokenize(["a red circle"])
        hidden = bb.text_encoder(ids, output_hidden_states=True).hidden_states
        expected = text_model_of(bb.text_encoder).final_layer_norm(hidden[-2])
        assert torch.equal(skip2.encode_prompts(["a red circle"]), expected)
        assert not torch.equal(expected, bb.encode_prompts(["a red circle"]))
    layer = bb.text_encoder.get_input_embeddings()
    layer.weight.requires_grad_(True)
    try:
        assert bb.encode_prompts(["a red circle"]).requires_grad  # not wrapped in no_grad
    finally:
        layer.weight.requires_grad_(False)


def test_borrow_restores_flags_even_on_error():
    from lora_trainer.backbones.diffusers_sd import text_model_of
    from lora_trainer.backbones.tiny import build_tiny_sd1

    bb = build_tiny_sd1(3)
    bb.unet.train()
    bb.unet.conv_in.weight.requires_grad_(True)
    text_model_of(bb.text_encoder).encoder.layers[0].train()
    before = {name: [(m.training) for m in mod.modules()] for name, mod in
              [("unet", bb.unet), ("vae", bb.vae), ("te", bb.text_encoder)]}
    grads = [p.requires_grad for p in bb.unet.parameters()]
    assert not bb.unet.is_gradient_checkpointing
    with pytest.raises(KeyError):
        with bb.borrow(gradient_checkpointing=True):
            assert bb.unet.is_gradient_checkpointing
            assert not any(p.requires_grad for m in (bb.unet, bb.vae, bb.text_encoder) for p in m.parameters())
            raise KeyError("boom")
    assert not bb.unet.is_gradient_checkpointing
    assert [p.requires_grad for p in bb.unet.parameters()] == grads and bb.unet.conv_in.weight.requires_grad
    after = {name: [(m.training) for m in mod.modules()] for name, mod in
             [("unet", bb.unet), ("vae", bb.vae), ("te", bb.text_encoder)]}
    assert after == before

    bb.unet.enable_gradient_checkpointing()  # on before: stays on, whatever the body asked
    with bb.borrow(gradient_checkpointing=False):
        pass
    assert bb.unet.is_gradient_checkpointing


def test_generate_is_deterministic_and_keeps_modes():
    from lora_trainer.backbones.tiny import build_tiny_sd1

    bb = build_tiny_sd1(0)
    bb.unet.train()
    first = bb.generate(["a red circle", "a blue square"], "blurry", seed=7, steps=2, guidance_scale=5.0,
                        size=(64, 48))
    assert [im.size for im in first] == [(64, 48)] * 2
    assert bb.unet.training and not bb.vae.training and not bb.text_encoder.training
    again = bb.generate(["a red circle", "a blue square"], "blurry", seed=7, steps=2, guidance_scale=5.0,
                        size=(64, 48))
    assert [im.tobytes() for im in first] == [im.tobytes() for im in again]
    other = bb.generate(["a red circle"], "", seed=8, steps=2, guidance_scale=1.0, size=(64, 48))
    assert other[0].tobytes() != first[0].tobytes()


# ---- loading from disk ----------------------------------------------------------------------------------------
def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("kind", ["safetensors", "ckpt", "folder"])
def test_load_gives_identical_weights(kind, tiny_sd1, tiny_sd1_files):
    from lora_trainer.backbones.single_file import load_backbone_from_path

    path = tiny_sd1_files[kind]
    config = {"safetensors": tiny_sd1_files["config"], "ckpt": tiny_sd1_files["ckpt_config"], "folder": ""}[kind]
    before = _digest(path) if path.is_file() else None
    bb = load_backbone_from_path(str(path), model_config=str(config))
    for part in ("unet", "vae", "text_encoder"):
        assert _same_weights(getattr(bb, part), getattr(tiny_sd1, part)), part
    assert bb.model_name == path.stem if path.is_file() else path.name
    assert bb.family == "sd1" and bb.prediction_type == "epsilon"
    assert not any(p.requires_grad for p in bb.unet.parameters()) and not bb.unet.training
    if before is not None:
        assert _digest(path) == before and len(bb.model_hash) == 8


def test_load_folder_without_tokenizer_and_config_without_tokenizer(tmp_path, tiny_sd1, tiny_sd1_files):
    from lora_trainer.backbones.single_file import load_backbone_from_path

    folder = tmp_path / "no-tok"
    shutil.copytree(tiny_sd1_files["folder"], folder)
    shutil.rmtree(folder / "tokenizer")
    bb = load_backbone_from_path(str(folder))
    assert _same_weights(bb.unet, tiny_sd1.unet)
    assert bb.tokenize(["a cat"]).tolist() == tiny_sd1.tokenize(["a cat"]).tolist()

    config = tmp_path / "config-no-tok"
    shutil.copytree(tiny_sd1_files["config"], config)
    shutil.rmtree(config / "tokenizer")
    bb = load_backbone_from_path(str(tiny_sd1_files["safetensors"]), model_config=str(config), clip_skip=2)
    assert _same_weights(bb.text_encoder, tiny_sd1.text_encoder) and bb.clip_skip == 2


@pytest.mark.skipif(importlib.util.find_spec("ldm") is None, reason="needs stable-diffusion-sdkit (--no-deps)")
def test_single_file_loads_into_the_original_ldm_classes(tiny_sd1, tiny_sd1_files):
    """What A1111 runs: the checkpoint fits ldm's UNetModel / Encoder / Decoder built from the yaml, strictly."""
    import yaml
    from ldm.modules.diffusionmodules.model import Decoder, Encoder
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    from safetensors.torch import load_file

    path = tiny_sd1_files["safetensors"]
    params = yaml.safe_load(path.with_suffix(".yaml").read_text())["model"]["params"]
    sd = load_file(str(path))

    def part(prefix):
        return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}

    unet = UNetModel(**params["unet_config"]["params"])
    unet.load_state_dict(part("model.diffusion_model."), strict=True)
    dd = params["first_stage_config"]["params"]["ddconfig"]
    vae = nn.Module()
    vae.encoder, vae.decoder = Encoder(**dd), Decoder(**dd)
    vae.quant_conv = nn.Conv2d(2 * dd["z_channels"], 8, 1)
    vae.post_quant_conv = nn.Conv2d(4, dd["z_channels"], 1)
    vae.load_state_dict(part("first_stage_model."), strict=True)
    te_keys = {k for k in sd if k.startswith("cond_stage_model.transformer.text_model.")}
    assert len(te_keys) == len(tiny_sd1.text_encoder.state_dict()) + 1  # + position_ids, as in real checkpoints

    x, t, c = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 32)
    with torch.no_grad():
        ours = tiny_sd1.unet(x, t, encoder_hidden_states=c).sample
        assert torch.allclose(unet(x, t, context=c), ours, atol=1e-5)


def _write_safetensors(path: Path, tensors: dict) -> Path:
    from safetensors.torch import save_file

    save_file({k: torch.zeros(shape) for k, shape in tensors.items()}, str(path))
    return path


SD1_MIN = {
    "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
    "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3),
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (4, 768),
}
REJECTED = {
    "sdxl-refiner": ({"model.diffusion_model.input_blocks.0.0.weight": (384, 4, 3, 3),
                      "conditioner.embedders.0.model.ln_final.weight": (1280,)}, "SDXL refiner"),
    "sd3": ({"model.diffusion_model.x_embedder.proj.weight": (1536, 16, 2, 2)}, "Stable Diffusion 3"),
    "flux": ({"double_blocks.0.img_attn.norm.key_norm.scale": (128,)}, "Flux"),
    "lora": ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320)}, "LoRA"),
    "inpainting": ({**SD1_MIN, "model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)}, "inpainting"),
    "vae": ({"encoder.conv_in.weight": (128, 3, 3, 3), "decoder.conv_in.weight": (512, 4, 3, 3)}, "VAE"),
    "random": ({"foo.weight": (3,)}, "not a Stable Diffusion checkpoint"),
}


@pytest.mark.parametrize("kind", sorted(REJECTED))
def test_rejects_other_models(kind, tmp_path):
    from lora_trainer.backbones.single_file import load_backbone_from_path

    tensors, what = REJECTED[kind]
    path = _write_safetensors(tmp_path / f"{kind}.safetensors", tensors)
    with pytest.raises(ModelError) as err:
        load_backbone_from_path(str(path))
    assert what in _one_line(err, path)


class _NotATensor:
    pass


def test_rejects_broken_inputs(tmp_path, tiny_sd1_files):
    from lora_trainer.backbones.single_file import load_backbone_from_path

    data = tiny_sd1_files["safetensors"].read_bytes()
    cases = {
        "missing": tmp_path / "nope.safetensors",
        "not-diffusers": tmp_path / "some-folder",
        "zero.safetensors": tmp_path / "zero.safetensors",
        "truncated.safetensors": tmp_path / "truncated.safetensors",
        "garbage.safetensors": tmp_path / "garbage.safetensors",
        "truncated.ckpt": tmp_path / "truncated.ckpt",
        "pickle.ckpt": tmp_path / "pickle.ckpt",
        "text.txt": tmp_path / "model.txt",
        "sdxl-folder": tmp_path / "sdxl-folder",
    }
    cases["not-diffusers"].mkdir()
    cases["sdxl-folder"].mkdir()
    (cases["sdxl-folder"] / "model_index.json").write_text(
        '{"_class_name": "StableDiffusionXLImg2ImgPipeline", "text_encoder": [null, null], '
        '"text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}')
    cases["zero.safetensors"].write_bytes(b"")
    cases["truncated.safetensors"].write_bytes(data[: len(data) // 2])
    cases["garbage.safetensors"].write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + b"\0" * 64)
    cases["truncated.ckpt"].write_bytes(tiny_sd1_files["ckpt"].read_bytes()[:5000])
    torch.save({"state_dict": {"x": torch.zeros(1)}, "extra": _NotATensor()}, str(cases["pickle.ckpt"]))
    cases["text.txt"].write_text("hello")
    messages = {}
    for name, path in cases.items():
        with pytest.raises(ModelError) as err:
            load_backbone_from_path(str(path))
        messages[name] = _one_line(err, path)
    assert "no such file" in messages["missing"]
    assert "model_index.json" in messages["not-diffusers"]
    assert "empty" in messages["zero.safetensors"]
    assert "truncated" in messages["truncated.safetensors"]
    assert "Python objects" in messages["pickle.ckpt"]
    assert "SDXL refiner" in messages["sdxl-folder"]


def test_v_prediction_from_the_yaml_beside_the_checkpoint(tmp_path, tiny_sd1_files):
    from lora_trainer.backbones.single_file import load_backbone_from_path

    path = tmp_path / "v-model.safetensors"
    shutil.copyfile(tiny_sd1_files["safetensors"], path)
    yaml_text = tiny_sd1_files["safetensors"].with_suffix(".yaml").read_text()
    path.with_suffix(".yaml").write_text(yaml_text.replace("    use_ema: false\n", "    use_ema: false\n"
                                                           "    parameterization: v\n"))
    config = str(tiny_sd1_files["config"])
    assert load_backbone_from_path(str(path), model_config=config).prediction_type == "v_prediction"
    assert load_backbone_from_path(str(path), model_config=config, prediction_type="epsilon").prediction_type \
        == "epsilon"
