"""scripts/lora_trainer_tab.py, imported as A1111 imports an extension script, against the WebUI stand-in."""

from __future__ import annotations

import importlib.util
import re
import sys
import threading
from pathlib import Path

import pytest

from lora_trainer import job as jobs
from lora_trainer.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "lora_trainer_tab.py"
STANDINS = ROOT / "tests" / "standins" / "webui_modules"


@pytest.fixture
def webui(tmp_path, monkeypatch):
    """The stand-in ``modules`` package on sys.path, and the script imported with the extension dir on it."""
    pytest.importorskip("gradio")
    monkeypatch.setenv("FAKE_WEBUI_LORA_DIR", str(tmp_path / "models" / "Lora"))
    monkeypatch.setenv("FAKE_WEBUI_CHECKPOINT", str(tmp_path / "v1-5.safetensors"))
    saved = {k: v for k, v in sys.modules.items() if k == "modules" or k.startswith("modules.")}
    for key in saved:
        del sys.modules[key]
    sys.path.insert(0, str(STANDINS))
    sys.path.insert(0, str(ROOT))  # what scripts.load_scripts does while importing the file
    try:
        spec = importlib.util.spec_from_file_location("lora_trainer_tab_script", SCRIPT)
        script = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(script)
    finally:
        sys.path.remove(str(ROOT))
    from modules import script_callbacks, shared

    yield script, script_callbacks, shared
    sys.path.remove(str(STANDINS))
    for key in [k for k in sys.modules if k == "modules" or k.startswith("modules.")]:
        del sys.modules[key]
    sys.modules.update(saved)


def test_registers_settings_and_the_tab(webui, tmp_path):
    import gradio as gr

    script, callbacks, shared = webui
    callbacks.ui_settings_callback()
    labels = shared.opts.data_labels
    assert {"lora_trainer_subfolder", "lora_trainer_default_rank", "lora_trainer_output_dir"} <= set(labels)
    assert all(info.section == ("lora_trainer", "LoRA Trainer") for info in labels.values())
    shared.opts.data.update(lora_trainer_subfolder="trained", lora_trainer_output_dir=str(tmp_path / "runs"),
                            lora_trainer_default_rank=8)
    tabs = callbacks.ui_tabs_callback()
    assert len(tabs) == 1
    blocks, label, tab_id = tabs[0]
    assert isinstance(blocks, gr.Blocks) and (label, tab_id) == ("Train LoRA", "lora_trainer")
    ids = [getattr(b, "elem_id", None) for b in blocks.blocks.values()]
    assert all(i.startswith("lora_trainer_") for i in ids if i)
    assert {"lora_trainer_model_info", "lora_trainer_use_txt2img", "lora_trainer_refresh",
            "lora_trainer_multi_gpu"} <= set(ids)
    rank = next(b for b in blocks.blocks.values() if getattr(b, "elem_id", None) == "lora_trainer_cfg_lora_rank")
    assert rank.value == 8  # the setting's default
    host = script._host()
    from modules import call_queue

    assert host.queue_lock is call_queue.queue_lock
    assert host.lora_dir() == tmp_path / "models" / "Lora" / "trained"
    assert script._model_info() == "v1-5.safetensors (loads when training starts)"
    assert host.forge_reload is None and host.load_model_gpu is None  # A1111


def test_every_setting_gets_a_widget_on_the_webuis_settings_page(webui):
    """A1111 1.10 and Forge make a default widget only for str, int and bool settings; a float without a component
    stopped both real WebUIs at start ("bad options item type")."""
    import gradio as gr

    _, callbacks, shared = webui
    callbacks.ui_settings_callback()
    from modules import ui_settings

    with gr.Blocks():
        components = ui_settings.create_settings_page()
    assert len(components) == len(shared.opts.data_labels) >= 12
    lr = next(c for c in components if c.elem_id == "setting_lora_trainer_default_lr")
    assert lr.value == pytest.approx(1e-4)


def test_the_settings_stand_in_refuses_a_float_without_a_component(webui):
    """The stand-in keeps the real rule, so CI sees the mistake that stopped both WebUIs."""
    _, _, shared = webui
    from modules import ui_settings

    shared.opts.add_option("lora_trainer_test_float", shared.OptionInfo(0.5, "a float", section=("x", "x")))
    with pytest.raises(Exception, match="bad options item type: <class 'float'>"):
        ui_settings.create_setting_component("lora_trainer_test_float")


def test_on_forge_the_host_gets_forges_lazy_load_and_memory_manager(webui, monkeypatch):
    """Forge's ``sd_models.forge_model_reload`` and ``backend.memory_management.load_model_gpu`` reach the host."""
    import types

    script, _, _ = webui
    from modules import sd_models

    reloads, placed = [], []
    monkeypatch.setattr(sd_models, "forge_model_reload", lambda: reloads.append(1), raising=False)
    backend = types.ModuleType("backend")
    backend.memory_management = types.ModuleType("backend.memory_management")
    backend.memory_management.load_model_gpu = placed.append
    monkeypatch.setitem(sys.modules, "backend", backend)
    monkeypatch.setitem(sys.modules, "backend.memory_management", backend.memory_management)
    host = script._host()
    host.forge_reload()
    host.load_model_gpu("unet patcher")
    assert reloads == [1] and placed == ["unet patcher"]


def test_api_routes_join_the_webui_app_behind_api_auth(webui, tmp_path):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lora_trainer.api import PREFIX
    from lora_trainer.demo import make_demo_dataset

    script, callbacks, shared = webui
    callbacks.ui_settings_callback()
    assert {"lora_trainer_datasets_dir", "lora_trainer_allowed_dirs", "lora_trainer_max_file_mb"} <= set(
        shared.opts.data_labels)
    shared.opts.data.update(lora_trainer_output_dir=str(tmp_path / "outputs" / "lora_trainer"),
                            lora_trainer_datasets_dir=str(tmp_path / "datasets"),
                            lora_trainer_allowed_dirs=f"{tmp_path / 'models'}, {tmp_path / 'pictures'}")
    shared.cmd_opts.api_auth = "alice:s3cret,bob:pw"
    app = FastAPI()
    callbacks.app_started_callback(None, app)  # --nowebui: no gradio demo, only the API
    routes = set(app.openapi()["paths"])
    assert {f"{PREFIX}/jobs", f"{PREFIX}/jobs/{{job_id}}", f"{PREFIX}/runs", f"{PREFIX}/caption"} <= routes

    client = TestClient(app)
    assert client.get(f"{PREFIX}/runs").status_code == 401
    assert client.get(f"{PREFIX}/runs", auth=("alice", "wrong")).status_code == 401
    assert client.get(f"{PREFIX}/runs", auth=("bob", "pw")).json() == {"runs": []}
    outside = make_demo_dataset(tmp_path / "elsewhere", count=5)
    refused = client.post(f"{PREFIX}/jobs", json={"train_data_dir": str(outside)}, auth=("bob", "pw"))
    assert refused.status_code == 403
    assert all(str(tmp_path / d) in refused.json()["error"] for d in ("pictures", "models", "datasets"))
    shared.cmd_opts.api_auth, shared.cmd_opts.gradio_auth = None, "carol:pw"  # a WebUI behind a login only
    app = FastAPI()
    callbacks.app_started_callback(None, app)
    assert TestClient(app).get(f"{PREFIX}/runs").status_code == 401
    assert TestClient(app).get(f"{PREFIX}/runs", auth=("carol", "pw")).status_code == 200
    defaults = script._api_defaults()  # at each request: the checkpoint the WebUI has selected now
    assert defaults["base_model"] == "v1-5.safetensors" and defaults["lora_rank"] == 16
    assert defaults["output_dir"] == str(tmp_path / "outputs" / "lora_trainer")


def test_unloading_the_script_stops_the_run(webui, tmp_path):
    script, callbacks, shared = webui
    release = threading.Event()

    class Host:
        def model_lock(self):
            return threading.Lock()

        def load_backbone(self, config):
            release.wait(30)
            raise UserError("released")

        def lora_dir(self):
            return None

        def progress_started(self, *a):
            pass

        progress = progress_finished = published = phase = check_model = progress_started

        def interrupted(self):
            return False

    from lora_trainer.config import TrainConfig
    from lora_trainer.demo import make_demo_dataset

    data = make_demo_dataset(tmp_path / "data", count=5)
    job = jobs.start_job(TrainConfig.from_dict({"base_model": "m", "train_data_dir": str(data),
                                                "output_dir": str(tmp_path / "runs")}), Host())
    try:
        callbacks.script_unloaded_callback()
        assert job.stop_request.is_set() and job.stop_request.save
    finally:
        release.set()
        job.wait(30)


def test_the_glue_stays_glue():
    text = SCRIPT.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 150
    assert not re.search(r"^\s*(import|from)\s+(torch|diffusers|transformers)\b", text, re.M)
    js = (ROOT / "javascript" / "lora_trainer.js").read_text(encoding="utf-8")
    ours = {"lora_trainer_tab", "lora_trainer_output", "lora_trainer_refresh", "txt2img_prompt"}
    assert set(re.findall(r"#([A-Za-z0-9_]+)", js)) <= ours
    css = (ROOT / "style.css").read_text(encoding="utf-8")
    assert all(s.startswith("lora_trainer_") for s in re.findall(r"[#.]([A-Za-z_][A-Za-z0-9_-]*)\s*[{,\s]", css))


def test_the_model_box_names_forges_checkpoint_before_and_after_it_loads():
    """Forge (real, dfdcbab): a placeholder model until the first generation, the checkpoint in its loading
    parameters, and no sd_model_checkpoint setting in API mode; the box said "no checkpoint selected (SD1)"."""
    import types

    from lora_trainer.webui_host import describe_model

    info = types.SimpleNamespace(title="tiny-sd1.safetensors [2be795a74e]", name="tiny-sd1.safetensors")
    placeholder = types.SimpleNamespace(forge_objects=None)
    data = types.SimpleNamespace(sd_model=placeholder, forge_loading_parameters={"checkpoint_info": info})
    assert describe_model(data, None) == "tiny-sd1.safetensors [2be795a74e] (loads when training starts)"
    from standins.forge import engine_flags

    data.sd_model = types.SimpleNamespace(forge_objects=object(), sd_checkpoint_info=info)
    engine_flags(data.sd_model, "SD15")
    assert describe_model(data, None) == "tiny-sd1.safetensors [2be795a74e] (SD1)"
    engine_flags(data.sd_model, "Flux")  # the family Forge detected, also when it cannot train
    assert describe_model(data, None) == "tiny-sd1.safetensors [2be795a74e] (Flux.1-dev: cannot be trained)"
    a1111 = types.SimpleNamespace(sd_model=None)
    assert describe_model(a1111, "v1-5.safetensors") == "v1-5.safetensors (loads when training starts)"
    assert describe_model(a1111, None) == "no checkpoint selected (loads when training starts)"
