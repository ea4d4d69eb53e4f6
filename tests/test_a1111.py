"""Training on A1111's loaded model: the real ldm classes, A1111's LoRA merges, --medvram moves, the queue lock."""

import os
import threading
import types
from pathlib import Path

import pytest
import torch
from lora_helpers import network_as_trained

from lora_trainer.backbones.a1111 import A1111Backbone
from lora_trainer.backbones.single_file import load_backbone_from_path
from lora_trainer.config import TrainConfig
from lora_trainer.demo import make_demo_dataset
from lora_trainer.errors import ModelError
from lora_trainer.events import EventBus, Phase, Progress, StopRequest
from lora_trainer.job import JobBusy, start_job
from lora_trainer.lora_file import read_lora_file
from lora_trainer.runner import run_training
from lora_trainer.webui_host import WebUIHost

pytest.importorskip("ldm", reason="needs stable-diffusion-sdkit (installed with --no-deps by `make test`)")
pytestmark = pytest.mark.slow

from standins.a1111 import (  # noqa: E402
    Networks,
    QueueLock,
    State,
    load_ldm_model,
    medvram_hooks,
    safe_torch_load,
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("data") / "shapes", count=6)


@pytest.fixture
def sd_model(tiny_sd1_files):
    return load_ldm_model(tiny_sd1_files["safetensors"])


def make_config(dataset, out, **changes):
    values = {"base_model": "(the WebUI's loaded model)", "train_data_dir": str(dataset), "output_dir": str(out),
              "output_name": "w", "resolution": 64, "min_bucket_reso": 32, "max_bucket_reso": 128,
              "bucket_reso_steps": 32, "lora_rank": 4, "learning_rate": 2e-3, "batch_size": 2,
              "max_train_steps": 6, "sample_steps": 2, "seed": 5, "trigger_word": "ltdemo"}
    values.update(changes)
    return TrainConfig.from_dict(values)


def snapshot(model):
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "training": [m.training for m in model.modules()],
        "placement": [(p.device, p.dtype) for p in model.parameters()],
        "flags": [(m.__dict__.get("use_checkpoint"), m.__dict__.get("checkpoint")) for m in model.modules()],
        "forwards": sorted(n for n, m in model.named_modules() if "forward" in m.__dict__),
    }


def assert_restored(before, model):
    after = snapshot(model)
    changed = [k for k in before["tensors"] if not torch.equal(before["tensors"][k], after["tensors"][k])]
    assert not changed, f"weights changed: {changed[:3]}"
    for key in ("requires_grad", "training", "placement", "flags", "forwards"):
        assert before[key] == after[key], f"{key} not restored"


def test_layer_names_are_kohyas_diffusers_names(sd_model, tiny_sd1_files):
    ours = A1111Backbone(sd_model)
    reference = load_backbone_from_path(str(tiny_sd1_files["folder"]))
    for conv in (False, True):
        assert set(ours.lora_targets(conv=conv)) == set(reference.lora_targets(conv=conv))
    assert set(ours.lora_targets(text_encoder=True)) == set(reference.lora_targets(text_encoder=True))
    assert "lora_unet_down_blocks_1_attentions_1_transformer_blocks_0_attn2_to_k" in ours.lora_targets()
    assert "lora_unet_up_blocks_0_upsamplers_0_conv" in ours.lora_targets(conv=True)


def test_file_trained_in_the_webui_reproduces_in_diffusers(sd_model, tiny_sd1_files, dataset, tmp_path):
    from diffusers import StableDiffusionPipeline

    backbone = A1111Backbone(sd_model)
    result = run_training(make_config(dataset, tmp_path, network="locon", final_check="full"), lambda c: backbone)
    assert result.loss_after < result.loss_before
    tensors, meta = read_lora_file(result.lora_path)
    assert meta["ss_sd_model_name"] == "tiny" and meta["ss_sd_model_hash"] == "0123456789"

    network = network_as_trained(backbone.lora_targets(conv=True), 4, result.run_dir)
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd1_files["folder"]), safety_checker=None,
                                                   requires_safety_checker=False, local_files_only=True)
    pipe.load_lora_weights(str(result.lora_path), adapter_name="w")
    gen = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([20, 800])
    with torch.no_grad():
        cond = backbone.encode_prompts(["ltdemo, a red circle", "a green square"])
        with network.attached_to_model():
            in_webui = backbone.predict(x, t, cond)
        in_diffusers = pipe.unet(x, t, encoder_hidden_states=cond).sample
        pipe.set_adapters(["w"], [0.0])
        base = pipe.unet(x, t, encoder_hidden_states=cond).sample
    assert (in_webui - in_diffusers).abs().max() <= 1e-5
    assert (in_diffusers - base).abs().max() > 1e-4


def test_merged_webui_lora_is_undone_and_everything_restored(sd_model, dataset, tmp_path):
    networks = Networks()
    pristine = snapshot(sd_model)
    unet = sd_model.model.diffusion_model
    merged = [unet.input_blocks[4][1].transformer_blocks[0].attn2.to_k, unet.output_blocks[1][1].proj_out]
    for layer in merged:
        networks.merge(layer, torch.full_like(layer.weight, 0.5))
    for module in unet.modules():  # as v1-inference.yaml has it before A1111's repair_config
        if "use_checkpoint" in module.__dict__:
            module.use_checkpoint = True
    pristine["flags"] = snapshot(sd_model)["flags"]

    backbone = A1111Backbone(sd_model, networks=networks)
    config = make_config(dataset, tmp_path, gradient_checkpointing=True, network="locon")
    result = run_training(config, lambda c: backbone)
    assert networks.loaded_networks == []
    assert all(getattr(layer, "network_weights_backup", None) is None for layer in merged)
    assert_restored(pristine, sd_model)
    tensors, _ = read_lora_file(result.lora_path)
    assert all(tensors[k].abs().sum() > 0 for k in tensors if "lora_up" in k), "a layer got no gradient"

    stop, events = StopRequest(), EventBus()
    events.subscribe(lambda e: stop.request(save=False) if isinstance(e, Progress) and e.step == 2 else None)
    run_training(config.replace(max_train_steps=30), lambda c: backbone, events, stop)
    assert_restored(pristine, sd_model)

    original = sd_model.apply_model
    sd_model.apply_model = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("CUDA out of memory (simulated)"))
    try:
        with pytest.raises(RuntimeError, match="simulated"):
            run_training(config, lambda c: backbone)
    finally:
        del sd_model.apply_model
        assert sd_model.apply_model.__func__ is original.__func__
    assert_restored(pristine, sd_model)


def test_medvram_moves_during_training_do_no_harm(sd_model, dataset, tmp_path):
    pristine = snapshot(sd_model)
    backbone = A1111Backbone(sd_model)
    with medvram_hooks(sd_model) as moves:
        result = run_training(make_config(dataset, tmp_path, max_train_steps=8, final_check="full"),
                              lambda c: backbone)
    assert moves["moves"] > 10
    assert result.loss_after < result.loss_before
    assert_restored(pristine, sd_model)


def test_refusals(sd_model):
    with pytest.raises(ModelError, match="--lowvram"):
        A1111Backbone(sd_model, lowvram=True)
    if hasattr(torch, "float8_e4m3fn"):
        layer = sd_model.model.diffusion_model.input_blocks[1][0].in_layers[2]
        layer.weight.data = layer.weight.data.to(torch.float8_e4m3fn)
        with pytest.raises(ModelError, match="fp8"):
            A1111Backbone(sd_model)
    sd3_like = types.SimpleNamespace(is_sd3=True, model=sd_model.model)
    with pytest.raises(ModelError, match="SD3"):
        A1111Backbone(sd3_like)


def make_host(sd_model, tmp_path, networks=None):
    shared = types.SimpleNamespace(sd_model=sd_model, state=State(), cmd_opts=types.SimpleNamespace(lowvram=False))
    networks = networks or Networks()
    networks.refreshed = 0
    lock = QueueLock()

    def refresh():
        networks.refreshed += 1
        networks.locked_when_published = lock.locked()

    networks.list_available_networks = refresh

    host = WebUIHost(shared, lock, tmp_path / "models" / "Lora", networks=networks)
    return host, shared, lock, networks


def test_job_holds_the_queue_lock_and_reports_through_shared_state(sd_model, dataset, tmp_path):
    host, shared, lock, networks = make_host(sd_model, tmp_path)
    seen = {}

    job = start_job(make_config(dataset, tmp_path / "runs", max_train_steps=5), host)

    def on_progress(event):
        if isinstance(event, Phase):
            seen.setdefault("phases", []).append((shared.state.textinfo, lock.locked()))
        if isinstance(event, Progress) and event.step == 2:
            seen["locked"] = lock.locked() and lock.owner == threading.get_ident()
            seen["job_no"], seen["job_count"] = shared.state.job_no, shared.state.job_count
            seen["textinfo"] = shared.state.textinfo
            try:
                start_job(make_config(dataset, tmp_path / "runs"), host)
            except JobBusy as exc:
                seen["busy"] = str(exc)

    job.events.subscribe(on_progress)
    assert job.wait(300)
    snap = job.snapshot()
    assert snap["state"] == "finished", snap["error"]
    assert seen["locked"] and (seen["job_no"], seen["job_count"]) == (2, 5)
    assert "step 2/5" in seen["textinfo"]
    assert "already in progress" in seen["busy"]
    assert not lock.locked() and lock.acquired == 1
    assert (shared.state.begun, shared.state.ended) == (1, 1)
    assert shared.state.current_image is not None and shared.state.current_image.size == (64, 64)  # live preview
    lora_dir = tmp_path / "models" / "Lora"
    assert sorted(p.name for p in lora_dir.iterdir()) == ["w.json", "w.preview.png", "w.safetensors"]
    mask = os.umask(0o022)
    os.umask(mask)
    assert {oct(p.stat().st_mode & 0o777) for p in lora_dir.iterdir()} == {oct(0o666 & ~mask)}  # not mkstemp's 0600
    assert networks.refreshed == 1
    # after the last step the WebUI's progress says what runs, and the lock is given back before publishing
    # 10 images trained pay for no loss sample: the quick check looks at the weights only (no phase of its own)
    assert ("Training LoRA: saving", True) in seen["phases"]
    assert not any("checking" in text for text, _ in seen["phases"])
    assert networks.locked_when_published is False
    assert snap["published"] and snap["lora_path"].endswith("w.safetensors")


def test_webui_interrupt_stops_and_saves_and_errors_release_the_lock(sd_model, dataset, tmp_path, monkeypatch):
    # A1111 replaces torch.load with its safe unpickler, which refused the training state torch writes: Extend failed
    monkeypatch.setattr(torch, "load", safe_torch_load(torch.load))
    host, shared, lock, _ = make_host(sd_model, tmp_path)
    job = start_job(make_config(dataset, tmp_path / "runs", max_train_steps=200), host)
    job.events.subscribe(lambda e: shared.state.interrupt() if isinstance(e, Progress) and e.step == 3 else None)
    assert job.wait(300)
    snap = job.snapshot()
    # pressed while step 3 is reported: the job sees it at its next check, after step 4
    assert snap["state"] == "stopped" and snap["step"] == 4 and snap["lora_path"]
    assert not lock.locked()

    extended = job.extend(2)
    assert extended.wait(300)
    assert extended.snapshot()["state"] == "finished" and extended.snapshot()["step"] == 6
    assert [step for step, _ in extended.snapshot()["losses"]] == [1, 2, 3, 4, 5, 6]  # the whole run's chart
    _, meta = read_lora_file(extended.lora_path)
    assert meta["ss_steps"] == "6"

    # A failed Extend (here: the last checkpoint's state is damaged) changes none of the run's files.
    run_dir = Path(extended.snapshot()["run_dir"])
    (run_dir / "checkpoints" / "checkpoint-000006" / "training_state.pt").write_bytes(b"damaged")
    before = {p.name: p.read_bytes() for p in (run_dir / "config.yaml", run_dir / "metrics.csv")}
    broken = extended.extend(5)
    assert broken.wait(300) and broken.snapshot()["state"] == "failed"
    assert "checkpoint cannot be read" in broken.snapshot()["error"]
    assert {p.name: p.read_bytes() for p in (run_dir / "config.yaml", run_dir / "metrics.csv")} == before

    sd_model.apply_model = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))
    try:
        failing = start_job(make_config(dataset, tmp_path / "runs"), host)
        assert failing.wait(300)
    finally:
        del sd_model.apply_model
    assert failing.snapshot()["state"] == "failed" and "boom" in failing.snapshot()["error"]
    assert not lock.locked()
    assert shared.state.begun == shared.state.ended


def test_kohya_dataset_features_on_the_webuis_model(sd_model, dataset, tmp_path):
    """Regularization images, a validation split, alpha masks, huber loss and disk caches on A1111's loaded model:
    it trains, the validation loss is logged, the caches are reused by a second run, and the model is given back."""
    reg = make_demo_dataset(tmp_path / "reg" / "1_shape", count=3, seed=4).parent
    before = snapshot(sd_model)
    backbone = A1111Backbone(sd_model)
    runs = []
    for out in ("a", "b"):
        config = make_config(dataset, tmp_path / out, reg_data_dir=str(reg), validation_split=0.2,
                             validate_every_n_steps=3, alpha_mask=True, loss_type="huber", min_timestep=100,
                             cache_latents_to_disk=True, cache_text_encoder_outputs_to_disk=True,
                             cache_dir=str(tmp_path / "cache"))
        runs.append(run_training(config, lambda c: backbone))
        assert_restored(before, sd_model)
    rows = (runs[0].run_dir / "metrics.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in rows[1:] if not line.endswith(",")] == ["3", "6"]
    assert read_lora_file(runs[0].lora_path)[1]["ss_num_reg_images"] == "3"
    first, second = (read_lora_file(r.lora_path)[0] for r in runs)
    assert all(torch.equal(first[k], second[k]) for k in first), "reused caches must train the same LoRA"
