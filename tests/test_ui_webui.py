"""The tab as A1111 1.10 mounts it (gradio 3.41.2): scripts/lora_trainer_tab.py imported like an extension
script, the tab collected from on_ui_tabs, javascript/ and style.css injected into the page, a WebUI stand-in
(tests/standins/webui_modules) with the real ldm model. Training runs on the WebUI's loaded model through
WebUIHost and the queue lock, the LoRA lands in models/Lora/<sub-folder>, and "Use in txt2img" fills the prompt.
The HTTP API joins the WebUI's FastAPI app through on_app_started (FastAPI 0.94 here) behind --api-auth.
"""

from __future__ import annotations

import base64
import json
import sys
import urllib.error
import urllib.request

import pytest
from standins.ui_servers import ROOT, TabPage, browser, free_port, running_server, server_env

pytestmark = [pytest.mark.browser, pytest.mark.slow]
STANDINS = ROOT / "tests" / "standins" / "webui_modules"


def test_tab_inside_a1111_fills_the_txt2img_prompt(tmp_path):
    pytest.importorskip("ldm", reason="needs stable-diffusion-sdkit (installed with --no-deps by `make test`)")
    from lora_trainer.backbones.tiny import save_tiny_sd1_single_file
    from lora_trainer.demo import make_demo_dataset

    checkpoint = tmp_path / "models" / "Stable-diffusion" / "tiny.safetensors"
    save_tiny_sd1_single_file(0, checkpoint)  # with tiny.yaml beside it, as A1111 reads it
    data = make_demo_dataset(tmp_path / "shapes", count=6)
    config = tmp_path / "uiwebui.yaml"
    config.write_text(f"train_data_dir: {data}\noutput_name: uiwebui\ntrigger_word: ltdemo\nresolution: 64\n"
                      "min_bucket_reso: 32\nmax_bucket_reso: 128\nbucket_reso_steps: 32\nlora_rank: 4\n"
                      "batch_size: 2\nmax_train_steps: 6\nsample_steps: 2\nlearning_rate: 1.0e-3\n", encoding="utf-8")
    env = server_env("3.41.2", extra_paths=[STANDINS, ROOT / "tests"])
    env.update(FAKE_WEBUI_CHECKPOINT=str(checkpoint), FAKE_WEBUI_LORA_DIR=str(tmp_path / "models" / "Lora"),
               FAKE_WEBUI_OPTS=json.dumps({"lora_trainer_output_dir": str(tmp_path / "outputs"),
                                           "lora_trainer_subfolder": "trained"}),
               FAKE_WEBUI_API_AUTH="alice:s3cret")
    port = free_port()
    command = [sys.executable, str(STANDINS / "fake_webui.py"), str(ROOT), str(port)]
    with running_server(command, env, ROOT / "test-artifacts" / "server-webui.log", port) as url, \
            browser(tmp_path / "chromium") as chromium:
        page = chromium.new_page()
        tab = TabPage(page, "webui-3.41.2")
        page.goto(url, wait_until="domcontentloaded")
        page.locator("#tabs button", has_text="Train LoRA").first.click()
        page.wait_for_selector("#lora_trainer_dataset_dir")
        assert "tiny.safetensors" in tab.value("lora_trainer_model_info")
        assert float(tab.value("lora_trainer_cfg_lora_rank")) == 16  # the settings' default rank
        tab.wait_value("lora_trainer_progress", "v.includes('No training run yet')")  # the injected JS polls

        page.set_input_files("#lora_trainer_yaml_upload input[type=file]", str(config))
        page.wait_for_timeout(500)
        tab.status_after("lora_trainer_yaml_load", "loaded uiwebui.yaml")
        assert tab.value("lora_trainer_dataset_dir") == str(data)
        tab.status_after("lora_trainer_start", "started: uiwebui")
        tab.wait_value("lora_trainer_progress", "v.includes('finished')", 120_000)
        result = tab.wait_value("lora_trainer_result", "v.includes('Published')")
        published = tmp_path / "models" / "Lora" / "trained"
        assert str(published) in result
        assert {p.name for p in published.iterdir()} >= {"uiwebui.safetensors", "uiwebui.json"}
        runs = urllib.request.Request(f"{url}lora-trainer/v1/runs")
        with pytest.raises(urllib.error.HTTPError, match="401"):
            urllib.request.urlopen(runs, timeout=30)
        runs.add_header("Authorization", "Basic " + base64.b64encode(b"alice:s3cret").decode())
        with urllib.request.urlopen(runs, timeout=30) as response:
            assert [r["name"] for r in json.loads(response.read())["runs"]] == ["uiwebui"]
        tab.click("lora_trainer_model_refresh")  # the model is loaded now: its family shows
        tab.wait_value("lora_trainer_model_info", "v.includes('(SD1)')")
        tab.shot("trained")

        page.locator("#txt2img_prompt textarea").evaluate("(el) => { el.value = 'a photo of a cat'; }")
        tab.click("lora_trainer_use_txt2img")
        page.wait_for_function("() => document.querySelector('#txt2img_prompt textarea').value.includes('<lora:')")
        prompt = page.locator("#txt2img_prompt textarea").input_value()
        assert prompt == "a photo of a cat, <lora:uiwebui:0.7>, ltdemo"
        assert page.locator("#txt2img_prompt textarea").is_visible()  # switch_to_txt2img() showed the tab
        tab.shot("txt2img")
