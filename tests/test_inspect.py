"""``inspect``: our files, hand-written kohya files, diffusers/peft files and LyCORIS files, with and without a base."""

from __future__ import annotations

import json

import pytest
import torch
from lora_helpers import random_lora_tensors, sd1_metadata, tag_frequency, write_random_lora
from safetensors.torch import save_file

from lora_trainer import cli
from lora_trainer.hashing import addnet_hash_file
from lora_trainer.inspect_lora import format_report, inspect_lora
from lora_trainer.lora_stack import FileLoraNetwork, LoraFile


@pytest.fixture(scope="module")
def targets(tiny_sd1):
    return tiny_sd1.lora_targets(conv=True, text_encoder=True)


def test_our_file(targets, tmp_path):
    meta = sd1_metadata("brand", ss_tag_frequency=tag_frequency(brandx=6, phone=4, table=2), ss_steps="200",
                        ss_learning_rate="0.0001", ss_sd_model_name="tiny", ss_training_started_at="1700000000",
                        ss_resolution="(512, 512)", **{"modelspec.trigger_phrase": "brandx"})
    path = write_random_lora(tmp_path / "brand.safetensors", targets, seed=1, rank=4, alpha=2, conv_rank=2,
                             metadata=meta)
    (tmp_path / "brand.json").write_text(json.dumps({"activation text": "brandx, product shot"}))
    info = inspect_lora(path, targets, base_family="sd1", base_name="tiny")
    assert (info["family"], info["family_source"]) == ("sd1", "metadata")
    assert (info["key_style"], info["network_type"]) == ("kohya", "locon")
    assert info["ranks"] == {"linear": [4], "conv": [2]} and info["alphas"] == [2.0]
    unet = sum(1 for n in targets if n.startswith("lora_unet_"))
    assert info["layers"] == {"unet": unet, "te": len(targets) - unet}
    assert info["trigger_words"] == {"trigger_phrase": ["brandx"], "activation_text": ["brandx", "product shot"],
                                     "top_tags": ["brandx", "phone", "table"]}
    assert info["training"]["steps"] == "200" and info["training"]["base model"] == "tiny"
    assert info["training"]["started"].startswith("2023-11-1")
    hashes = info["hashes"]
    assert hashes["addnet"] == addnet_hash_file(path) and hashes["sshs_model_hash_matches"] is True
    assert hashes["a1111_short"] == hashes["addnet"][:12]
    match = info["match"]
    assert (match["matched"], match["unmatched"], match["shape_mismatches"]) == (len(targets), 0, 0)
    report = format_report(info)
    assert "family:          SD1 (from metadata)" in report and "locon" in report and "brandx" in report


def test_hand_written_kohya_file_with_a_foreign_and_a_misfit_layer(targets, tmp_path):
    q, fc1 = ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
              "lora_te_text_model_encoder_layers_0_mlp_fc1")
    tensors = {f"{q}.lora_down.weight": torch.randn(8, 64), f"{q}.lora_up.weight": torch.randn(64, 8),
               f"{q}.alpha": torch.tensor(4.0),
               f"{fc1}.lora_down.weight": torch.randn(8, 32), f"{fc1}.lora_up.weight": torch.randn(64, 8),
               f"{fc1}.alpha": torch.tensor(8.0),
               "lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight": torch.randn(8, 64),
               "lora_unet_down_blocks_9_attentions_0_proj_in.lora_up.weight": torch.randn(64, 8),
               # a misfit: the model's attn2.to_k takes 32 inputs, not 768 (an SD1-sized file)
               "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight":
                   torch.randn(8, 768),
               "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight":
                   torch.randn(64, 8)}
    path = tmp_path / "kohya.safetensors"
    save_file(tensors, str(path))
    info = inspect_lora(path, targets, base_family="sd1")
    assert (info["key_style"], info["network_type"]) == ("kohya", "lora")
    assert (info["family"], info["family_source"]) == ("sd1", "keys")  # attn2.to_k reads 768 wide: SD1
    assert info["layers"] == {"unet": 3, "te": 1} and info["ranks"] == {"linear": [8], "conv": []}
    assert info["alphas"] == [4.0, 8.0] and info["hashes"]["sshs_model_hash"] is None
    match = info["match"]
    assert (match["layers"], match["matched"], match["unmatched"], match["shape_mismatches"]) == (4, 3, 1, 1)
    assert match["unmatched_examples"] == ["lora_unet_down_blocks_9_attentions_0_proj_in"]
    assert "768->64" in match["shape_mismatch_examples"][0]
    assert "A1111 would silently skip 1 layer(s)" in match["notes"]


def test_diffusers_and_peft_files(tiny_sd1, targets, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict

    from lora_trainer.backbones.tiny import TINY_UNET

    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian",
                        target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**TINY_UNET)
        unet.add_adapter(config)
        peft_unet = get_peft_model(UNet2DConditionModel(**TINY_UNET), config)
        for name, param in list(unet.named_parameters()) + list(peft_unet.named_parameters()):
            if "lora_B" in name:  # peft starts B at zero: the adapter would change nothing
                torch.nn.init.normal_(param, std=0.1)
    StableDiffusionPipeline.save_lora_weights(str(tmp_path / "diffusers"), unet_lora_layers=get_peft_model_state_dict(
        unet), unet_lora_adapter_metadata=config.to_dict())  # diffusers keeps lora_alpha in the header
    peft_unet.save_pretrained(str(tmp_path / "peft"))  # peft keeps it in adapter_config.json

    probe_name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    probe = torch.randn(3, 64)
    for folder, style, model in (("diffusers", "diffusers", unet), ("peft", "peft", peft_unet.base_model.model)):
        path = next((tmp_path / folder).glob("*.safetensors"))
        info = inspect_lora(path, targets, base_family="sd1")
        assert (info["key_style"], info["network_type"]) == (style, "lora"), folder
        layers = info["layers"]["unet"]
        assert layers == sum(1 for n in targets if n.startswith("lora_unet_") and n.endswith(
            ("to_q", "to_k", "to_v", "to_out_0", "proj_in", "proj_out"))), folder
        assert info["ranks"]["linear"] == [4] and info["layers"]["te"] == 0 and info["alphas"] == [8.0]
        assert (info["match"]["matched"], info["match"]["shape_mismatches"]) == (layers, 0), folder
        assert any("A1111 1.10 reads only kohya-style names" in note for note in info["match"]["notes"])
        # applied by us, the layer adds exactly what peft adds (scale alpha/r = 2)
        peft_layer = model.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
        network = FileLoraNetwork(targets, LoraFile.read(path).tensors, str(path))
        with torch.no_grad(), network.attached_to_model():
            ours = targets[probe_name](probe) - targets[probe_name]._lycoris_original_forward(probe)
            theirs = peft_layer(probe) - peft_layer.base_layer(probe)
        assert (ours - theirs).abs().max() <= 1e-5 and theirs.abs().max() > 1e-3, folder


@pytest.mark.parametrize("algo, module_name, suffix", [("loha", "LohaModule", "hada_w1_a"),
                                                       ("lokr", "LokrModule", "lokr_w1")])
def test_lycoris_files(algo, module_name, suffix, targets, tmp_path):
    import lycoris.modules

    module_class = getattr(lycoris.modules, module_name)
    tensors = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for name, layer in list(targets.items())[:12]:
            for key, value in module_class(name, layer, 1.0, 4, 2.0, factor=4).state_dict().items():
                tensors[f"{name}.{key}"] = value.contiguous()
    path = tmp_path / f"{algo}.safetensors"
    save_file(tensors, str(path), metadata={"ss_base_model_version": "sd_v1", "ss_network_module": "lycoris.kohya"})
    assert any(k.endswith(suffix) for k in tensors)
    info = inspect_lora(path, targets, base_family="sd1")
    assert info["network_type"] == algo and info["family"] == "sd1" and info["layers"]["unet"] == 12
    assert 2.0 in info["alphas"]  # LoKr in full-matrix mode stores alpha = rank
    match = info["match"]
    assert (match["matched"], match["shapes_checked"]) == (12, False)
    assert "shapes not checked" in format_report(info)


def test_inspect_command_with_base_and_json(tiny_sd1_files, targets, tmp_path, capsys):
    path = write_random_lora(tmp_path / "x.safetensors", targets, seed=3, rank=2, alpha=1)
    rc = cli.main(["inspect", str(path), "--base", str(tiny_sd1_files["folder"]), "--json"])
    info = json.loads(capsys.readouterr().out)
    assert rc == 0 and info["network_type"] == "locon"
    assert (info["match"]["base"], info["match"]["matched"]) == ("tiny-folder", len(targets))


@pytest.mark.parametrize("case, expected", [("truncated", "truncated"), ("checkpoint", "holds no LoRA weights"),
                                            ("missing", "LoRA file not found")])
def test_inspect_of_a_bad_file_is_one_line(case, expected, tmp_path, capsys):
    path = tmp_path / "bad.safetensors"
    if case == "truncated":
        save_file({"lora_unet_x.lora_down.weight": torch.zeros(64, 64)}, str(path))
        path.write_bytes(path.read_bytes()[:200])
    elif case == "checkpoint":
        save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, str(path))
    assert cli.main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and expected in err and "\n" not in err


def test_random_tensors_helper_has_nonzero_ups(targets):
    tensors = random_lora_tensors(dict(list(targets.items())[:2]), seed=0, rank=2, alpha=1)
    assert all(v.abs().sum() > 0 for k, v in tensors.items() if k.endswith("lora_up.weight"))
