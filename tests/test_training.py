"""End-to-end training on the tiny SD1 model: the file, the loss, the base model, stop/error, init_lora."""

import json

import pytest
import torch
from lora_helpers import network_as_trained
from safetensors import safe_open

from lora_trainer.backbones.single_file import load_backbone_from_path
from lora_trainer.checkpoints import list_checkpoints
from lora_trainer.config import TrainConfig
from lora_trainer.demo import make_demo_dataset
from lora_trainer.errors import TrainingError
from lora_trainer.events import EventBus, Progress, StopRequest
from lora_trainer.hashing import addnet_hash_file
from lora_trainer.lora_file import read_lora_file
from lora_trainer.runner import run_training

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("data") / "shapes", count=6)


def make_config(model_dir, dataset, out, **changes):
    values = {
        "base_model": str(model_dir), "train_data_dir": str(dataset), "output_dir": str(out),
        "output_name": "t", "resolution": 64, "min_bucket_reso": 32, "max_bucket_reso": 128,
        "bucket_reso_steps": 32, "lora_rank": 4, "learning_rate": 2e-3, "batch_size": 2,
        "max_train_steps": 12, "trigger_word": "ltdemo", "sample_steps": 2, "seed": 3, "device": "cpu",
    }
    values.update(changes)
    return TrainConfig.from_dict(values)


def snapshot(backbone):
    """Everything about the base model the trainer must give back unchanged."""
    out = {}
    for part in ("unet", "vae", "text_encoder"):
        module = getattr(backbone, part)
        out[part] = {
            "tensors": {k: v.detach().clone() for k, v in module.state_dict().items()},
            "requires_grad": [p.requires_grad for p in module.parameters()],
            "training": [m.training for m in module.modules()],
            "placement": [(p.device, p.dtype) for p in module.parameters()],
            "forward_overrides": sorted(n for n, m in module.named_modules() if "forward" in m.__dict__),
        }
    return out


def assert_same_model(before, after):
    for part in before:
        b, a = before[part], after[part]
        assert b["tensors"].keys() == a["tensors"].keys()
        changed = [k for k in b["tensors"] if not torch.equal(b["tensors"][k], a["tensors"][k])]
        assert not changed, f"{part} weights changed: {changed[:3]}"
        for key in ("requires_grad", "training", "placement", "forward_overrides"):
            assert b[key] == a[key], f"{part}: {key} not restored"


@pytest.fixture
def live_backbone(tiny_sd1_files):
    """A model object we hand to the trainer, the way the WebUI hands over its loaded model."""
    backbone = load_backbone_from_path(str(tiny_sd1_files["folder"]))
    backbone.unet.train()  # a mixed state the trainer must give back as found
    backbone.vae.encoder.requires_grad_(True)
    return backbone


def test_trained_file_reproduces_the_model_in_diffusers(tiny_sd1_files, dataset, tmp_path):
    from diffusers import StableDiffusionPipeline

    config = make_config(tiny_sd1_files["folder"], dataset, tmp_path, save_precision="fp32", max_train_steps=40)
    result = run_training(config, lambda c: load_backbone_from_path(c.base_model))  # 80 images: a 2-sample check
    path = result.lora_path
    tensors, metadata = read_lora_file(path)

    # The network exactly as trained (fp32 parameters from the final checkpoint's state).
    ours = load_backbone_from_path(str(tiny_sd1_files["folder"]))
    network = network_as_trained(ours.lora_targets(), config.lora_rank, result.run_dir)

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd1_files["folder"]), safety_checker=None,
                                                   requires_safety_checker=False, local_files_only=True)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([10, 700])
    cond = torch.randn(2, 77, 32, generator=gen)
    with torch.no_grad():
        base = pipe.unet(x, t, encoder_hidden_states=cond).sample.clone()
        assert (ours.predict(x, t, cond) - base).abs().max() <= 1e-6

    pipe.load_lora_weights(str(path), adapter_name="ours")
    lora_layers = [n for n, m in pipe.unet.named_modules() if hasattr(m, "lora_A") and "ours" in m.lora_A]
    file_modules = {k.rsplit(".lora_down.weight", 1)[0] for k in tensors if k.endswith(".lora_down.weight")}
    assert len(lora_layers) == len(file_modules), "diffusers did not use every key of the file"

    with torch.no_grad():
        for weight in (1.0, 0.5):
            pipe.set_adapters(["ours"], [weight])
            theirs = pipe.unet(x, t, encoder_hidden_states=cond).sample
            with network.attached_to_model(), network.multiplier(weight):
                mine = ours.predict(x, t, cond)
            assert (theirs - mine).abs().max() <= 1e-5
            assert (theirs - base).abs().max() > 1e-4, "the LoRA changes nothing"
        pipe.set_adapters(["ours"], [0.0])
        assert torch.equal(pipe.unet(x, t, encoder_hidden_states=cond).sample, base)
    assert result.loss_after < result.loss_before


def test_file_keys_and_metadata_follow_kohya(tiny_sd1_files, dataset, tmp_path):
    config = make_config(tiny_sd1_files["folder"], dataset, tmp_path, max_train_steps=2, lora_alpha=2,
                         description="shapes test")
    result = run_training(config, lambda c: load_backbone_from_path(c.base_model))
    run = result.run_dir
    with safe_open(str(result.lora_path), "pt") as fh:
        keys, meta = list(fh.keys()), fh.metadata()
    modules = {k.split(".", 1)[0] for k in keys}
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q" in modules
    assert "lora_unet_up_blocks_0_attentions_2_proj_out" in modules
    for module in modules:
        assert module.startswith("lora_unet_") and "." not in module
        for suffix in ("lora_down.weight", "lora_up.weight", "alpha"):
            assert f"{module}.{suffix}" in keys
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert meta["ss_output_name"] == result.lora_path.stem == run.name
    assert meta["ss_network_module"] == "networks.lora"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "2")
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.trigger_phrase"] == "ltdemo"
    assert meta["sshs_model_hash"] == addnet_hash_file(result.lora_path)
    assert meta["ss_steps"] == "2" and meta["ss_num_train_images"] == "6"
    tags = json.loads(meta["ss_tag_frequency"])["shapes"]
    assert sum(tags.values()) > 0 and "flat illustration" in tags
    assert json.loads(meta["ss_dataset_dirs"]) == {"shapes": {"n_repeats": 1, "img_count": 6}}
    assert json.loads(meta["ss_bucket_info"])["buckets"]
    for key in ("ss_training_started_at", "ss_epoch", "ss_sd_model_name", "ss_seed", "ss_learning_rate",
                "ss_resolution", "modelspec.title", "modelspec.resolution", "modelspec.date",
                "modelspec.sai_model_spec"):
        assert meta[key], key
    sidecar = json.loads((run / "t.json").read_text())
    assert sidecar["activation text"] == "ltdemo" and sidecar["sd version"] == "SD1"
    assert sidecar["preferred weight"] == 0.7 and sidecar["description"] == "shapes test"
    for name in ("t.preview.png", "loss.png", "train.log", "metrics.csv", "config.yaml"):
        assert (run / name).is_file(), name
    assert not list(run.rglob(".tmp-*")), "temporary files left behind"


def test_base_model_is_untouched_after_finish_stop_and_error(live_backbone, tiny_sd1_files, dataset, tmp_path):
    before = snapshot(live_backbone)
    config = make_config(tiny_sd1_files["folder"], dataset, tmp_path, network="locon", gradient_checkpointing=True,
                         max_train_steps=3)
    run_training(config, lambda c: live_backbone)
    assert_same_model(before, snapshot(live_backbone))

    stop, events = StopRequest(), EventBus()
    events.subscribe(lambda e: stop.request(save=False) if isinstance(e, Progress) and e.step == 2 else None)
    result = run_training(config.replace(max_train_steps=50), lambda c: live_backbone, events, stop)
    assert result.stopped and result.steps == 2 and result.lora_path is None
    assert_same_model(before, snapshot(live_backbone))

    original = live_backbone.predict

    def broken(noisy, t, cond):
        raise RuntimeError("simulated out of memory")

    live_backbone.predict = broken
    try:
        with pytest.raises(RuntimeError, match="simulated"):
            run_training(config, lambda c: live_backbone)
    finally:
        live_backbone.predict = original
    assert_same_model(before, snapshot(live_backbone))


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(live_backbone, tiny_sd1_files,
                                                                            dataset, tmp_path):
    config = make_config(tiny_sd1_files["folder"], dataset, tmp_path, max_train_steps=10, save_steps=3)
    original, calls = live_backbone.predict, {"n": 0}

    def diverging(noisy, t, cond):
        out = original(noisy, t, cond)
        if torch.is_grad_enabled():  # training steps, not the no-grad evaluation before them
            calls["n"] += 1
            if calls["n"] > 5:
                return out * float("nan")
        return out

    live_backbone.predict = diverging
    try:
        with pytest.raises(TrainingError) as info:
            run_training(config, lambda c: live_backbone)
    finally:
        live_backbone.predict = original
    message = str(info.value)
    assert "the loss became nan at step" in message and "checkpoint-000003" in message and "\n" not in message
    run = tmp_path / "t"
    assert [step for step, _ in list_checkpoints(run)] == [3]
    assert not (run / "t.safetensors").exists()


def test_stop_and_save_writes_a_usable_file(tiny_sd1_files, dataset, tmp_path):
    stop, events = StopRequest(), EventBus()
    events.subscribe(lambda e: stop.request(save=True) if isinstance(e, Progress) and e.step == 3 else None)
    config = make_config(tiny_sd1_files["folder"], dataset, tmp_path, max_train_steps=40)
    result = run_training(config, lambda c: load_backbone_from_path(c.base_model), events, stop)
    assert result.stopped and result.steps == 3
    tensors, meta = read_lora_file(result.lora_path)
    assert meta["ss_steps"] == "3" and any(v.abs().sum() > 0 for k, v in tensors.items() if "lora_up" in k)


def test_init_lora_continues_from_a_file(tiny_sd1_files, dataset, tmp_path):
    first = run_training(make_config(tiny_sd1_files["folder"], dataset, tmp_path, max_train_steps=4),
                         lambda c: load_backbone_from_path(c.base_model))
    # learning_rate 0: the weights must come out exactly as they went in.
    config = make_config(tiny_sd1_files["folder"], dataset, tmp_path, max_train_steps=2, learning_rate=0.0,
                         init_lora=str(first.lora_path), output_name="cont")
    second = run_training(config, lambda c: load_backbone_from_path(c.base_model))
    a, _ = read_lora_file(first.lora_path)
    b, meta = read_lora_file(second.lora_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert meta["ss_init_lora"] == str(first.lora_path)


def test_runs_never_overwrite_and_checkpoints_are_pruned(tiny_sd1_files, dataset, tmp_path):
    config = make_config(tiny_sd1_files["folder"], dataset, tmp_path, max_train_steps=6, save_steps=1,
                         keep_checkpoints=2)
    first = run_training(config, lambda c: load_backbone_from_path(c.base_model))
    second = run_training(config, lambda c: load_backbone_from_path(c.base_model))
    assert (first.run_dir.name, second.run_dir.name) == ("t", "t-2")
    assert second.lora_path.name == "t-2.safetensors"
    assert [step for step, _ in list_checkpoints(first.run_dir)] == [5, 6]
    inner = list((first.run_dir / "checkpoints" / "checkpoint-000006").iterdir())
    assert sorted(p.name for p in inner) == ["t-step000006.safetensors", "training_state.pt"]
