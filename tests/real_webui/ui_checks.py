"""The Train LoRA tab in a real WebUI, in Chromium: the flow of tests/test_ui_webui.py, against the real page.

The tab renders inside the WebUI's tabs, the Model box names the loaded checkpoint, a run started from the tab
(settings from a YAML file, the CLI's schema) trains and publishes, Status tells the end state, "Use in txt2img"
fills the txt2img prompt. Screenshots go to test-artifacts/ (README screenshots come from here).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from standins.ui_servers import TabPage, browser  # noqa: E402


def run_tab_checks(report, flavour: str, webui: Path, port: int) -> None:
    r = lambda name, ok, figure="": report.check(flavour, f"tab: {name}", ok, figure)  # noqa: E731
    data = webui / "outputs" / "suite-data" / "shapes"
    name = f"suite-tab-{flavour}-{int(time.time())}"
    config = webui / "outputs" / "suite-data" / f"{name}.yaml"
    config.write_text(f"train_data_dir: {data}\noutput_name: {name}\ntrigger_word: ltdemo\nresolution: 64\n"
                      "min_bucket_reso: 64\nmax_train_steps: 6\n", encoding="utf-8")
    with browser(webui / ".suite-chromium") as chromium:
        page = chromium.new_page()
        page.set_viewport_size({"width": 1280, "height": 800})
        tab = TabPage(page, f"real-{flavour}")
        page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded")
        page.locator("#tabs button", has_text="Train LoRA").first.click(timeout=120_000)
        page.wait_for_selector("#lora_trainer_dataset_dir")
        model = tab.value("lora_trainer_model_info")
        r("renders inside the WebUI; the Model box names the checkpoint", "tiny-sd1" in model, model)
        rank = tab.value("lora_trainer_cfg_lora_rank")
        r("the settings' defaults reach the form", float(rank) == 16, f"rank {rank}")
        tab.shot("tab")
        page.set_input_files("#lora_trainer_yaml_upload input[type=file]", str(config))
        page.wait_for_timeout(500)
        tab.status_after("lora_trainer_yaml_load", f"loaded {name}.yaml")
        started = tab.status_after("lora_trainer_start", f"started: {name}", timeout=120_000)
        r("Start starts a run", True, started)
        page.locator("#lora_trainer_yaml_load").scroll_into_view_if_needed()
        hidden = tab.off_screen("lora_trainer_yaml_load", "lora_trainer_start", "lora_trainer_progress",
                                "lora_trainer_result")
        r("at 1280x800, scrolled to the foot of the settings, Start, progress and result are in view", not hidden,
          f"off screen: {hidden or 'none'}")
        progress = tab.wait_value("lora_trainer_progress", "v.includes('finished') || v.includes('failed')", 900_000)
        r("the run finishes and the progress says so", "finished" in progress, progress.splitlines()[0])
        status = tab.wait_value("lora_trainer_status", "v.includes('finished') || v.includes('failed')", 60_000)
        r("Status tells the end state", "finished" in status, status.splitlines()[0])
        result = tab.wait_value("lora_trainer_result", "v.includes('Published')", 60_000)
        r("the result says where it was published", "Lora" in result, result.splitlines()[0][:200])
        tab.shot("trained")
        page.evaluate("() => window.scrollTo(0, 0)")
        page.wait_for_timeout(300)
        page.screenshot(path=str(ROOT / "test-artifacts" / f"real-{flavour}-screenshot.png"))  # README pictures
        page.locator("#txt2img_prompt textarea").evaluate("(el) => { el.value = 'a photo of a cat'; }")
        tab.click("lora_trainer_use_txt2img")
        page.wait_for_function("() => document.querySelector('#txt2img_prompt textarea').value.includes('<lora:')",
                               timeout=30_000)
        prompt = page.locator("#txt2img_prompt textarea").input_value()
        r("Use in txt2img fills the txt2img prompt", f"<lora:{name}:0.7>" in prompt, prompt)
        tab.shot("txt2img")
