"""``generate``: A1111 prompt syntax, names from a LoRA folder, blending several LoRAs, infotext that parses back."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from a1111_lora_math import a1111_deltas, merge_like_a1111
from lora_helpers import sd1_metadata, write_random_lora
from PIL import Image

from lora_trainer import cli
from lora_trainer.errors import ConfigError
from lora_trainer.hashing import addnet_hash_file
from lora_trainer.lora_file import save_lora_file
from lora_trainer.lora_formats import lora_pairs
from lora_trainer.lora_stack import LoraFile, attached_stack, load_stack
from lora_trainer.network import LoraNetwork
from lora_trainer.prompt_syntax import format_infotext, parse_infotext, parse_prompt


@pytest.fixture(scope="module")
def lora_dir(tiny_sd1, tmp_path_factory):
    """brand (rank 4, LoCon rank 2, with text encoder), sub/ink_v3 (alias "ink"), an SDXL one and a broken one."""
    root = tmp_path_factory.mktemp("loras")
    targets = tiny_sd1.lora_targets(conv=True, text_encoder=True)
    write_random_lora(root / "brand.safetensors", targets, seed=1, rank=4, alpha=2, conv_rank=2)
    write_random_lora(root / "sub" / "ink_v3.safetensors", targets, seed=2, rank=2, alpha=1,
                      metadata=sd1_metadata("ink"))
    write_random_lora(root / "xl.safetensors", targets, seed=3,
                      metadata={"ss_base_model_version": "sdxl_base_v1-0", "ss_output_name": "xl"})
    from safetensors.torch import save_file

    ia3 = {f"{name}.{k}": v for name, layer in list(targets.items())[:4] if isinstance(layer, torch.nn.Linear)
           for k, v in (("weight", torch.ones(layer.out_features)), ("on_input", torch.tensor(False)))}
    save_file(ia3, str(root / "ia3.safetensors"), metadata=sd1_metadata("ia3"))
    save_lora_file(root / "hada.safetensors", random_variant(targets, "loha", seed=4), sd1_metadata("hada"))
    data = (root / "brand.safetensors").read_bytes()
    (root / "broken.safetensors").write_bytes(data[: len(data) // 3])
    return root


def random_variant(targets, algorithm: str, seed: int) -> dict:
    """kohya/LyCORIS tensors of a LoHa/LoKr/DoRA network with every factor random (fresh ones start at zero)."""
    network = LoraNetwork(targets, 2, 1.0, seed=seed, algorithm=algorithm)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in network.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.2)
    return network.kohya_state_dict()


def run_cli(argv, capsys):
    rc = cli.main(argv)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    return rc, captured.out, captured.err, (lines[-1] if lines else "")


# ---- prompt syntax -----------------------------------------------------------------------------------------
def test_prompt_tags_are_parsed_like_a1111_and_removed_from_the_text():
    text, tags = parse_prompt("smartphone on a neon-lit table, <lora:brand:0.7>, <lora:ink:0.4:0.9>, "
                              "<lora:a:te=0.2:unet=0.3> <lyco:b> glow")
    assert text == "smartphone on a neon-lit table, glow"
    assert [(t.name, t.te_weight, t.unet_weight) for t in tags] == [
        ("brand", 0.7, 0.7), ("ink", 0.4, 0.9), ("a", 0.2, 0.3), ("b", 1.0, 1.0)]
    with pytest.raises(ConfigError, match="not a number"):
        parse_prompt("x <lora:brand:strong>")


def test_infotext_round_trip_with_quoted_values():
    prompt = "a cat, <lora:brand:0.7>, <lora:ink:0.4:0.5>\nsecond line"
    params = {"Steps": 20, "Sampler": "DDIM", "CFG scale": 7.5, "Seed": 42, "Size": "512x768",
              "Model": "tiny", "Lora hashes": "brand: 0123456789ab, ink: ba9876543210"}
    parsed = parse_infotext(format_infotext(prompt, "blurry, low resolution", params))
    assert parsed["prompt"] == prompt and parsed["negative_prompt"] == "blurry, low resolution"
    assert (parsed["steps"], parsed["seed"], parsed["cfg_scale"], parsed["size"]) == (20, 42, 7.5, (512, 768))
    assert parsed["loras"] == [
        {"name": "brand", "te_weight": 0.7, "unet_weight": 0.7, "hash": "0123456789ab"},
        {"name": "ink", "te_weight": 0.4, "unet_weight": 0.5, "hash": "ba9876543210"}]


# ---- blending ----------------------------------------------------------------------------------------------
def test_two_loras_blend_exactly_like_diffusers_adapters(tiny_sd1, tiny_sd1_files, lora_dir):
    from diffusers import StableDiffusionPipeline

    brand, ink = LoraFile.read(lora_dir / "brand.safetensors"), LoraFile.read(lora_dir / "sub" / "ink_v3.safetensors")
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd1_files["folder"]), safety_checker=None,
                                                   requires_safety_checker=False, local_files_only=True)
    pipe.load_lora_weights(str(brand.path), adapter_name="a")
    pipe.load_lora_weights(str(ink.path), adapter_name="b")
    pipe.set_adapters(["a", "b"], [0.6, 0.4])
    gen = torch.Generator().manual_seed(0)
    x, t, cond = torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([10, 700]), torch.randn(2, 77, 32, generator=gen)
    targets = tiny_sd1.lora_targets(conv=True, text_encoder=True)
    entries = load_stack(targets, [(brand, 0.6, 0.6), (ink, 0.4, 0.4)])
    with torch.no_grad():
        theirs = pipe.unet(x, t, encoder_hidden_states=cond).sample
        base = tiny_sd1.predict(x, t, cond)
        with attached_stack(entries):
            mine = tiny_sd1.predict(x, t, cond)
            # layer by layer the stack adds exactly 0.6 * delta_a + 0.4 * delta_b (a linear and a 3x3 conv layer)
            for name, probe in (("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k",
                                 torch.randn(3, 32, generator=gen)),
                                ("lora_unet_down_blocks_0_resnets_0_conv1", torch.randn(1, 32, 8, 8, generator=gen))):
                layer = targets[name]
                blended = layer(probe)
                expected = layer._lycoris_original_forward(probe)
                for lora, w in ((brand, 0.6), (ink, 0.4)):
                    down, up, alpha = lora_pairs(lora.tensors, "x")[name]
                    expected = expected + w * alpha / down.shape[0] * _apply(layer, down, up, probe)
                assert (blended - expected).abs().max() <= 1e-5
    assert (theirs - base).abs().max() > 1e-3, "the LoRAs change nothing"
    assert (theirs - mine).abs().max() <= 1e-5
    assert not [n for n, m in tiny_sd1.unet.named_modules() if "forward" in m.__dict__], "a LoRA stayed attached"


@pytest.mark.parametrize("algorithm", ["loha", "lokr", "dora"])
def test_lycoris_files_apply_as_a1111_merges_them(algorithm, tiny_sd1, tmp_path):
    """<lora:name:0.5:1.0> with a LoHa, LoKr or DoRA file: the text encoder at 0.5 and the UNet at 1.0, exactly
    what A1111's merge of the same file gives."""
    targets = tiny_sd1.lora_targets(conv=algorithm != "dora", text_encoder=True)
    path = save_lora_file(tmp_path / f"{algorithm}.safetensors", random_variant(targets, algorithm, seed=7),
                          sd1_metadata(algorithm))
    lora = LoraFile.read(path)
    assert lora.family == "sd1"
    entries = load_stack(targets, [(lora, 0.5, 1.0)])
    gen = torch.Generator().manual_seed(1)
    x, t, cond = torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([10, 700]), torch.randn(2, 77, 32, generator=gen)
    ids = tiny_sd1.tokenize(["a red circle", "ltdemo, a green square"])
    deltas = a1111_deltas(lora.tensors, targets)
    originals = {name: targets[name].weight.detach().clone() for name in deltas}
    with torch.no_grad():
        base, base_text = tiny_sd1.predict(x, t, cond), tiny_sd1.text_encoder(ids).last_hidden_state
        with attached_stack(entries):
            ours, ours_text = tiny_sd1.predict(x, t, cond), tiny_sd1.text_encoder(ids).last_hidden_state
        try:
            for part, weight in (("lora_te_", 0.5), ("lora_unet_", 1.0)):
                chosen = {n: d for n, d in deltas.items() if n.startswith(part)}
                merge_like_a1111(chosen, originals, targets, weight)
            theirs, theirs_text = tiny_sd1.predict(x, t, cond), tiny_sd1.text_encoder(ids).last_hidden_state
        finally:
            for name, weight in originals.items():
                targets[name].weight.copy_(weight)
    assert (theirs - base).abs().max() > 1e-3 and (theirs_text - base_text).abs().max() > 1e-3
    assert (ours - theirs).abs().max() <= 1e-5 and (ours_text - theirs_text).abs().max() <= 1e-5
    assert torch.equal(tiny_sd1.predict(x, t, cond), base), "the model is not back to its own weights"


def _apply(layer, down, up, x):
    if isinstance(layer, torch.nn.Conv2d):
        mid = torch.nn.functional.conv2d(x, down, stride=layer.stride, padding=layer.padding)
        return torch.nn.functional.conv2d(mid, up)
    return x @ down.T @ up.T


# ---- the command -------------------------------------------------------------------------------------------
def test_generate_writes_a_png_whose_infotext_parses_back(tiny_sd1_files, lora_dir, tmp_path, capsys):
    out = tmp_path / "img.png"
    prompt = "smartphone on a neon-lit table, <lora:brand:0.7>, <lora:ink:0.4>"
    rc, stdout, _, _ = run_cli(["generate", "--base", str(tiny_sd1_files["folder"]), "--prompt", prompt,
                                "--negative", "low resolution, watermark", "--seed", "1", "--steps", "2",
                                "--size", "64x48", "--lora-dir", str(lora_dir), "--out", str(out)], capsys)
    assert rc == 0 and stdout.strip() == str(out)
    with Image.open(out) as image:
        assert image.size == (64, 48)
        info = parse_infotext(image.text["parameters"])
    assert info["prompt"] == prompt and info["negative_prompt"] == "low resolution, watermark"
    assert (info["seed"], info["steps"], info["size"], info["sampler"]) == (1, 2, (64, 48), "DDIM")
    assert info["cfg_scale"] == 7.0 and info["model"] == "tiny-folder"
    hashes = {"brand": addnet_hash_file(lora_dir / "brand.safetensors")[:12],
              "ink": addnet_hash_file(lora_dir / "sub" / "ink_v3.safetensors")[:12]}
    assert info["loras"] == [{"name": "brand", "te_weight": 0.7, "unet_weight": 0.7, "hash": hashes["brand"]},
                             {"name": "ink", "te_weight": 0.4, "unet_weight": 0.4, "hash": hashes["ink"]}]
    assert not list(tmp_path.glob(".tmp-*"))


@pytest.mark.parametrize("tag, expected", [
    ("<lora:brnad:0.7>", "no LoRA named 'brnad'"),
    ("<lora:xl:0.7>", "a LoRA for SDXL (from its metadata), the base model is SD1"),
    ("<lora:broken:0.7>", "broken.safetensors: truncated"),
    ("<lora:brand:strong>", "is not a number"),
    ("<lora:ia3:1>", "ia3.safetensors: a IA3 file; LoRA, LoCon, LoHa, LoKr and DoRA files can be applied here"),
])
def test_bad_loras_are_one_line_errors(tag, expected, tiny_sd1_files, lora_dir, tmp_path, capsys):
    out = tmp_path / "img.png"
    rc, _, err, last = run_cli(["generate", "--base", str(tiny_sd1_files["folder"]), "--prompt", f"a cat, {tag}",
                                "--steps", "1", "--size", "64x64", "--lora-dir", str(lora_dir), "--out", str(out)],
                               capsys)
    assert rc == 2 and "Traceback" not in err
    assert last.startswith("error: ") and expected in last, last
    if "brnad" in tag:
        assert "did you mean 'brand'?" in last
    assert not out.exists()


def test_generate_applies_a_loha_file_by_its_name(tiny_sd1_files, lora_dir, tmp_path, capsys):
    images = []
    for weight in (0, 1):
        out = tmp_path / f"hada_{weight}.png"
        rc, _, err, _ = run_cli(["generate", "--base", str(tiny_sd1_files["folder"]), "--prompt",
                                 f"a cat, <lora:hada:{weight}>", "--seed", "3", "--steps", "2", "--size", "64x64",
                                 "--lora-dir", str(lora_dir), "--out", str(out)], capsys)
        assert rc == 0, err
        with Image.open(out) as image:
            images.append(torch.tensor(np.asarray(image.convert("RGB")), dtype=torch.float32))
    assert (images[0] - images[1]).abs().mean() > 1.0, "the LoHa changes nothing"
