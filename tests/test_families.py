"""SD2 and SDXL: detection from a checkpoint's keys, the clear refusals, offline configs and tokenizers, loading
tiny models from single files and folders, SDXL's size conditioning and the v-prediction target."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn

from lora_trainer.backbones.base import TrainSize, sdxl_time_ids
from lora_trainer.backbones.detect import detect_family
from lora_trainer.errors import ModelError

SUPPORTED = "SD1.x, SD2.x (512 or 768-v) or SDXL base"
UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"
VAE = {"first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3)}
SD1 = {UNET_IN: (320, 4, 3, 3), **VAE,
       "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768)}
SD2 = {UNET_IN: (320, 4, 3, 3), **VAE,
       "cond_stage_model.model.token_embedding.weight": (49408, 1024),
       "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight": (3072, 1024)}
SDXL = {UNET_IN: (320, 4, 3, 3), **VAE,
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
        "conditioner.embedders.1.model.token_embedding.weight": (49408, 1280),
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2816)}


def _one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text and "Traceback" not in text and " — " in text, text
    return text


# ---- detection ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shapes, family", [(SD1, "sd1"), (SD2, "sd2"), (SDXL, "sdxl")])
def test_detects_each_family_from_its_keys(shapes, family):
    assert detect_family(shapes, "model.safetensors") == family
    assert detect_family({**shapes, "v_pred": ()}, "model.safetensors") == family


REFUSED = {
    "sdxl refiner": ({UNET_IN: (384, 4, 3, 3), **VAE, "conditioner.embedders.0.model.ln_final.weight": (1280,)},
                     "the SDXL refiner"),
    "sdxl inpainting": ({**SDXL, UNET_IN: (320, 9, 3, 3)}, "an inpainting model (9 input channels)"),
    "sd1 inpainting": ({**SD1, UNET_IN: (320, 9, 3, 3)}, "an inpainting model (9 input channels)"),
    "pix2pix": ({**SD1, UNET_IN: (320, 8, 3, 3)}, "instruct-pix2pix"),
    "sd2 depth": ({**SD2, UNET_IN: (320, 5, 3, 3)}, "depth-to-image"),
    "sd3": ({"model.diffusion_model.joint_blocks.0.context_block.attn.qkv.weight": (4608, 1536)},
            "a Stable Diffusion 3 model"),
    "flux": ({"double_blocks.0.img_attn.norm.key_norm.scale": (128,)}, "a Flux model"),
    "playground": ({**SDXL, "edm_mean": (1, 4, 1, 1)}, "Playground v2.5"),
    "cascade": ({"down_blocks.1.0.channelwise.0.weight": (1, 2)}, "Stable Cascade"),
    "lora": ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320)}, "a LoRA file"),
    "vae": ({"encoder.conv_in.weight": (128, 3, 3, 3), "decoder.conv_in.weight": (512, 4, 3, 3)}, "a VAE file"),
    "no vae": ({k: v for k, v in SD2.items() if not k.startswith("first_stage")}, "has no VAE"),
    "no clip-l": ({k: v for k, v in SDXL.items() if ".embedders.0." not in k}, "without its CLIP-L"),
    "unet only": ({UNET_IN: (320, 4, 3, 3), **VAE}, "no text encoder"),
    "other": ({"foo.weight": (3,)}, "not a Stable Diffusion checkpoint"),
}


@pytest.mark.parametrize("kind", sorted(REFUSED))
def test_refuses_everything_else_in_one_line(kind):
    shapes, what = REFUSED[kind]
    with pytest.raises(ModelError) as err:
        detect_family(shapes, "x.safetensors")
    text = _one_line(err)
    assert what in text and text.startswith("x.safetensors: ")
    assert SUPPORTED in text or "LoRA" in kind.upper() or kind in ("vae", "no vae", "no clip-l", "unet only",
                                                                     "other")


def test_refuses_through_the_loader_too(tmp_path):
    from safetensors.torch import save_file

    from lora_trainer.backbones.single_file import load_backbone_from_path

    path = tmp_path / "refiner.safetensors"
    save_file({k: torch.zeros(v) for k, v in REFUSED["sdxl refiner"][0].items()}, str(path))
    with pytest.raises(ModelError, match="SDXL refiner.*trains SD1.x, SD2.x"):
        load_backbone_from_path(str(path))
    with pytest.raises(ModelError, match="family 'sd3' is not supported"):
        load_backbone_from_path(str(path), family="sd3")


def test_prediction_markers(tmp_path):
    from lora_trainer.backbones.single_file import _prediction_marker, looks_like_v_prediction

    path = tmp_path / "m.safetensors"
    assert _prediction_marker(path, {**SD2, "v_pred": ()}) == "v_prediction"
    assert _prediction_marker(path, SD2) is None
    path.with_suffix(".yaml").write_text("model:\n  params:\n    parameterization: \"v\"\n")
    assert _prediction_marker(path, SD2) == "v_prediction"
    path.with_suffix(".yaml").write_text("model:\n  params:\n    linear_start: 0.00085\n")
    assert _prediction_marker(path, SD2) == "epsilon"

    class Stub(nn.Module):  # A1111's test: at t=999 a v-model outputs far below its input
        def __init__(self, sign):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))
            self.sign = sign
            self.config = type("C", (), {"cross_attention_dim": 8, "in_channels": 4})()

        def forward(self, x, t, encoder_hidden_states):
            assert int(t) == 999 and encoder_hidden_states.shape == (1, 2, 8)
            return type("O", (), {"sample": x * self.sign})()

    assert looks_like_v_prediction(Stub(-2.0)) and not looks_like_v_prediction(Stub(1.0))


# ---- configs and tokenizers -----------------------------------------------------------------------------------------
def test_bundled_sd2_and_sdxl_configs_are_the_real_architectures(tmp_path, monkeypatch):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from lora_trainer.backbones.family_configs import BUNDLED, family_config_dir

    def load(family, part):
        return json.loads((BUNDLED / family / part).read_text())

    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    with torch.device("meta"):
        assert count(UNet2DConditionModel.from_config(load("sd2-v", "unet/config.json"))) == 865_910_724
        assert count(CLIPTextModel(CLIPTextConfig(**load("sd2", "text_encoder/config.json")))) == 340_387_840
        assert count(UNet2DConditionModel.from_config(load("sdxl", "unet/config.json"))) == 2_567_463_684
        assert count(CLIPTextModelWithProjection(CLIPTextConfig(**load("sdxl", "text_encoder_2/config.json")))) \
            == 694_659_840
    assert load("sd2", "scheduler/scheduler_config.json")["prediction_type"] == "epsilon"
    assert load("sd2-v", "scheduler/scheduler_config.json")["prediction_type"] == "v_prediction"
    assert load("sdxl", "vae/config.json")["scaling_factor"] == 0.13025

    monkeypatch.setenv("LORA_TRAINER_CACHE", str(tmp_path))
    sdxl = family_config_dir("sdxl")
    assert CLIPTokenizer.from_pretrained(str(sdxl / "tokenizer")).pad_token_id == 49407
    assert CLIPTokenizer.from_pretrained(str(sdxl / "tokenizer_2")).pad_token_id == 0
    assert CLIPTokenizer.from_pretrained(str(family_config_dir("sd2-v") / "tokenizer")).pad_token_id == 0


def test_open_clip_tokenizer_pads_like_open_clip():
    import open_clip
    from transformers import CLIPTokenizer

    from lora_trainer.backbones.tokenizer_files import OPEN_CLIP_PAD, clip_tokenizer_dir

    tok = CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir(OPEN_CLIP_PAD)))
    for text in ["a photo of a cat", "naïve café 😀 (masterpiece:1.2)", "", "word " * 100]:
        ours = tok(text, padding="max_length", max_length=77, truncation=True).input_ids
        assert ours == open_clip.tokenize([text])[0].tolist(), text


# ---- tiny models on disk ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    from lora_trainer.backbones.tiny_families import (
        build_tiny_sd2,
        build_tiny_sdxl,
        save_tiny_folder,
        save_tiny_single_file,
    )

    root = tmp_path_factory.mktemp("tiny_families")
    out = {}
    for family, bb in (("sd2", build_tiny_sd2(0)), ("sdxl", build_tiny_sdxl(0))):
        out[family] = {"model": bb, "folder": save_tiny_folder(bb, root / f"{family}-folder"),
                       "file": root / f"{family}.safetensors",
                       "config": save_tiny_single_file(bb, root / f"{family}.safetensors")}
    return out


def _parts(bb):
    return ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if bb.family == "sdxl" else [])


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
@pytest.mark.parametrize("kind", ["file", "folder"])
def test_tiny_models_load_from_single_files_and_folders(family, kind, tiny_files):
    from lora_trainer.backbones.single_file import load_backbone_from_path

    files = tiny_files[family]
    bb = load_backbone_from_path(str(files[kind]), model_config=str(files["config"]) if kind == "file" else "")
    reference = files["model"]
    assert type(bb) is type(reference) and bb.family == family
    assert bb.prediction_type == ("v_prediction" if family == "sd2" else "epsilon")
    for part in _parts(bb):
        assert _same_weights(getattr(bb, part), getattr(reference, part)), part
    pads = [bb.tokenizer.pad_token_id] + ([bb.tokenizer_2.pad_token_id] if family == "sdxl" else [])
    assert pads == ([0] if family == "sd2" else [49407, 0])
    assert not any(p.requires_grad for part in _parts(bb) for p in getattr(bb, part).parameters())


def test_family_and_prediction_settings(tiny_files, tmp_path, monkeypatch, caplog):
    from lora_trainer.backbones import single_file
    from lora_trainer.backbones.single_file import load_backbone_from_path

    sd2 = tiny_files["sd2"]
    assert load_backbone_from_path(str(sd2["file"]), str(sd2["config"]), prediction_type="epsilon") \
        .prediction_type == "epsilon"
    with pytest.raises(ModelError) as err:
        load_backbone_from_path(str(sd2["folder"]), family="sd1")
    assert "family is set to 'sd1' but the checkpoint is SD2.x" in _one_line(err)
    with pytest.raises(ModelError) as err:  # the tiny model is not SD2's real size: the bundled config says so
        load_backbone_from_path(str(sd2["file"]), family="sd2", prediction_type="v_prediction")
    assert "its text encoder is 32 wide, the SD2.x model config says 1024" in _one_line(err)

    # An SD2 checkpoint that says nothing about v: A1111's test of the UNet decides.
    config = tmp_path / "config-no-prediction"
    shutil.copytree(sd2["config"], config)
    scheduler_file = config / "scheduler" / "scheduler_config.json"
    scheduler = json.loads(scheduler_file.read_text())
    del scheduler["prediction_type"]
    scheduler_file.write_text(json.dumps(scheduler))
    monkeypatch.setattr(single_file, "looks_like_v_prediction", lambda unet: True)
    with caplog.at_level("INFO", logger="lora_trainer"):
        assert load_backbone_from_path(str(sd2["file"]), str(config)).prediction_type == "v_prediction"
    assert "A1111's test of the UNet says v_prediction" in caplog.text


# ---- SDXL size conditioning ------------------------------------------------------------------------------------
def test_train_size_follows_the_crop_of_each_image(tmp_path):
    import numpy as np
    from PIL import Image

    from lora_trainer.config import TrainConfig
    from lora_trainer.images import image_to_tensor
    from lora_trainer.training_data import prepare_data

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (64, 101, 3), dtype=np.uint8)  # 101 x 64: an odd overhang to crop
    Image.fromarray(pixels).save(data_dir / "wide.png")
    Image.fromarray(pixels[:, :64]).save(data_dir / "square.png")
    (data_dir / "wide.txt").write_text("a wide image")
    (data_dir / "square.txt").write_text("a square image")
    config = TrainConfig.from_dict({"base_model": "m", "train_data_dir": str(data_dir), "resolution": 64,
                                    "enable_bucket": False})
    data = prepare_data(config)
    wide = next(i for i, r in enumerate(data.scan.records) if r.path.name == "wide.png")
    square = 1 - wide
    size = data.train_size(wide)
    assert isinstance(size, TrainSize) and size == (64, 64)  # still the plain bucket for SD1/SD2 and A1111
    assert (size.original_size, size.crop_top_left) == ((101, 64), (0, 18))
    assert data.train_size(wide, flip=True).crop_top_left == (0, 19)  # measured on the mirrored image
    assert data.train_size(square).crop_top_left == (0, 0)
    assert sdxl_time_ids(size) == (64, 101, 0, 18, 64, 64)
    assert sdxl_time_ids((96, 64)) == (64, 96, 0, 0, 64, 96)

    # The crop is the one the pixels come from, mirrored or not.
    image = Image.fromarray(pixels)
    expected = torch.from_numpy(pixels[:, 18:82].copy()).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.allclose(image_to_tensor(image, (64, 64)), expected)
    mirrored = torch.from_numpy(pixels[:, ::-1][:, 19:83].copy()).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.allclose(image_to_tensor(image, (64, 64), flip=True), mirrored)


def test_sdxl_conditioning_matches_diffusers(tiny_files):
    """Both encoders' penultimate states side by side, encoder 2's pooled projection, and the six size numbers."""
    from diffusers import StableDiffusionXLPipeline

    bb = tiny_files["sdxl"]["model"]
    sizes = [TrainSize((64, 48), (300, 200), (7, 11)), (64, 64)]
    cond = bb.encode_prompts(["a red circle, flat", "a cat"], sizes)
    assert cond["time_ids"].tolist() == [[200, 300, 7, 11, 48, 64], [64, 64, 0, 0, 64, 64]]
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_files["sdxl"]["folder"]), local_files_only=True)
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(["a red circle, flat", "a cat"], device="cpu",
                                                  do_classifier_free_guidance=False)
        assert torch.allclose(cond["crossattn"], embeds, atol=1e-6)
        assert torch.allclose(cond["text_embeds"], pooled, atol=1e-6)
        time_ids = pipe._get_add_time_ids((200, 300), (7, 11), (48, 64), dtype=torch.float32,
                                          text_encoder_projection_dim=bb.text_encoder_2.config.projection_dim)
        assert time_ids[0].tolist() == cond["time_ids"][0].tolist()
    out = bb.predict(torch.randn(2, 4, 6, 8), torch.tensor([10, 900]), cond)
    assert out.shape == (2, 4, 6, 8)
    images = bb.generate(["a cat"], "", seed=1, steps=2, guidance_scale=5.0, size=(64, 48))
    assert images[0].size == (64, 48)


# ---- v-prediction --------------------------------------------------------------------------------------------------
def test_v_prediction_target_is_the_velocity(tiny_files):
    from diffusers import DDPMScheduler

    from lora_trainer.diffusion import add_noise, training_target

    bb = tiny_files["sd2"]["model"]
    scheduler = DDPMScheduler.from_config(bb.noise_scheduler_config)
    assert scheduler.config.prediction_type == "v_prediction" == bb.prediction_type
    assert torch.allclose(bb.alphas_cumprod, scheduler.alphas_cumprod.float())
    gen = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(4, 4, 8, 8, generator=gen), torch.randn(4, 4, 8, 8, generator=gen)
    t = torch.tensor([0, 250, 600, 999])
    target = training_target(latents, noise, t, bb.alphas_cumprod, "v_prediction")
    assert torch.allclose(target, scheduler.get_velocity(latents, noise, t), atol=1e-6)
    assert torch.allclose(add_noise(latents, noise, t, bb.alphas_cumprod), scheduler.add_noise(latents, noise, t),
                          atol=1e-6)
    assert torch.equal(training_target(latents, noise, t, bb.alphas_cumprod, "epsilon"), noise)
