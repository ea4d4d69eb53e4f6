"""The standalone Train LoRA tab in a real browser, on current gradio, 4.40.0 (Forge) and 3.41.2 (A1111).

One flow per version, as a user would go: bad inputs, a dataset created in the tab and filled by uploads
(images, then a .zip; a zip-slip archive, a text file named .png and a file over the size cap are refused),
auto-caption with a tiny CLIP, a caption edit, a bulk tag edit, a config YAML, Start, live progress (step,
chart, samples, also after a page reload), Stop and save, Extend, the result and the Try panel's image, the
LoRA and the run folder downloaded, the run seen through the HTTP API, the dataset picked, renamed and deleted.
Screenshots go to test-artifacts/ (the README's pictures come from the real WebUIs: tests/real_webui/).
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest
from standins.ui_servers import ROOT, TabPage, browser, free_port, running_server, server_env, ui_command

pytestmark = [pytest.mark.browser, pytest.mark.slow]

VERSIONS = ["current", "4.40.0", "3.41.2"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny SD1 checkpoint (LDM .safetensors + its config folder) and a tiny open_clip model (config .json +
    weights .pt), made offline. A single file, not a diffusers folder: transformers 5 saves a tokenizer folder
    that Forge's transformers 4.46 cannot read, while the checkpoint's config folder suits both."""
    import torch

    from lora_trainer.backbones.tiny import save_tiny_sd1_single_file
    from lora_trainer.tiny_clip import register_tiny_clip, train_tiny_clip

    root = tmp_path_factory.mktemp("ui_assets")
    model_config = save_tiny_sd1_single_file(0, root / "tiny-sd1.safetensors")
    clip_config = register_tiny_clip(root / "clip")
    clip, _ = train_tiny_clip(steps=20, seed=0)
    torch.save({k: v.contiguous() for k, v in clip.state_dict().items()}, root / "clip" / "tiny-clip.pt")
    return {"model": root / "tiny-sd1.safetensors", "model_config": model_config, "clip_config": clip_config,
            "clip_weights": root / "clip" / "tiny-clip.pt", "cache": root / "cache"}


@pytest.fixture(scope="module")
def chromium(tmp_path_factory):
    with browser(tmp_path_factory.mktemp("chromium")) as context:
        yield context


def dataset_without_captions(folder: Path) -> Path:
    from lora_trainer.demo import make_demo_dataset

    make_demo_dataset(folder, count=6)
    (folder / "metadata.csv").unlink()
    shutil.copyfile(folder / "shape_00.png", folder / "shape_dup.png")  # a duplicate file to warn about
    return folder


def captions_on_disk(folder: Path) -> dict:
    with open(folder / "metadata.csv", newline="", encoding="utf-8") as fh:
        return {row["filename"]: row["prompt"] for row in csv.DictReader(fh)}


def write_config(path: Path, assets: dict, data: Path) -> Path:
    path.write_text(
        f"base_model: {assets['model']}\nmodel_config: {assets['model_config']}\ntrain_data_dir: {data}\n"
        "output_name: uitest\ntrigger_word: ltdemo\n"
        "resolution: 64\nmin_bucket_reso: 32\nmax_bucket_reso: 128\nbucket_reso_steps: 32\nlora_rank: 4\n"
        "learning_rate: 1.0e-3\nbatch_size: 2\nmax_train_steps: 1000\nsample_every_n_steps: 10\nsample_steps: 2\n"
        "device: cpu\nseed: 3\n", encoding="utf-8")
    return path


def upload_files(tab: TabPage, paths: list, expect: str) -> str:
    """Drop ``paths`` on the dataset's upload box; waits for the status (``expect``) and the emptied box."""
    before = tab.value("lora_trainer_status")
    assert expect not in before, f"the status already says {before!r}"
    tab.page.set_input_files("#lora_trainer_dataset_upload input[type=file]", [str(p) for p in paths])
    status = tab.wait_value("lora_trainer_status", f"v.includes({expect!r})")
    tab.page.wait_for_selector("#lora_trainer_dataset_upload input[type=file]", state="attached")
    tab.page.wait_for_function("() => !document.querySelector('#lora_trainer_dataset_upload .file-preview')")
    return status


def bad_uploads(folder: Path) -> list:
    """A zip-slip archive, a text file named .png, and a real image over the 0.05 MB cap the server is given."""
    folder.mkdir()
    with zipfile.ZipFile(folder / "evil.zip", "w") as zf:
        zf.writestr("ok.png", (folder.parent / "src" / "shape_00.png").read_bytes())
        zf.writestr("../../escaped.png", (folder.parent / "src" / "shape_01.png").read_bytes())
    (folder / "fake.png").write_bytes(b"this is text, not a picture")
    from PIL import Image

    Image.frombytes("RGB", (200, 200), os.urandom(200 * 200 * 3)).save(folder / "big.png")
    assert (folder / "big.png").stat().st_size > 0.05 * 2**20
    return [folder / "evil.zip", folder / "fake.png", folder / "big.png"]


def download(tab: TabPage, button: str, name: str) -> bytes:
    """Click a Download button, then the file link it shows (gradio 3: a link in a table; 4+: the same)."""
    tab.status_after(button, f"{name} is ready")
    link = tab.page.locator(f"#lora_trainer_download_file a[download='{name}']").first
    with tab.page.expect_download() as info:
        link.click()
    return Path(info.value.path()).read_bytes()


def progress_steps(tab: TabPage, count: int, timeout: float = 90) -> list:
    """Wait until the progress line has shown ``count`` different step numbers; returns them."""
    seen, deadline = [], time.monotonic() + timeout
    while len(seen) < count:
        assert time.monotonic() < deadline, f"progress showed only {seen}: {tab.value('lora_trainer_progress')!r}"
        text = tab.value("lora_trainer_progress")
        if " step " in text:
            step = int(text.split(" step ")[1].split("/")[0])
            if not seen or step != seen[-1]:
                seen.append(step)
        time.sleep(0.3)
    return seen


@pytest.mark.parametrize("version", VERSIONS)
def test_standalone_tab_end_to_end(version, assets, chromium, tmp_path):
    source = dataset_without_captions(tmp_path / "src")
    with zipfile.ZipFile(tmp_path / "more.zip", "w") as zf:  # two images in a folder of the archive
        for name in ("shape_04.png", "shape_05.png"):
            zf.write(source / name, f"more/{name}")
    refused = bad_uploads(tmp_path / "bad")
    data = tmp_path / "datasets" / "shapes"  # the default datasets folder: beside the runs folder
    (tmp_path / "empty").mkdir()
    config_file = write_config(tmp_path / "uitest.yaml", assets, data)
    port = free_port()
    env = server_env(version, cache=assets["cache"])
    log = ROOT / "test-artifacts" / f"server-{version}.log"
    command = ui_command(port, tmp_path / "runs") + ["--max-file-mb", "0.05"]
    with running_server(command, env, log, port) as url:
        page = chromium.new_page()
        page.set_viewport_size({"width": 1280, "height": 800})
        tab = TabPage(page, f"standalone-{version}")
        (ROOT / "test-artifacts" / f"standalone-{version}-timings.txt").unlink(missing_ok=True)
        tab.mark("server up")
        page.goto(url, wait_until="domcontentloaded")
        page.wait_for_selector("#lora_trainer_dataset_dir")
        served = page.evaluate("() => window.gradio_config && window.gradio_config.version")
        if version != "current":
            assert served == version
        tab.wait_value("lora_trainer_progress", "v.includes('No training run yet')")  # the poll is running

        # Bad input: one visible line each, never a traceback.
        tab.fill("lora_trainer_dataset_dir", tmp_path / "missing")
        assert "does not exist" in tab.status_after("lora_trainer_dataset_load", "Error:")
        tab.fill("lora_trainer_dataset_dir", tmp_path / "empty")
        assert "no images found" in tab.status_after("lora_trainer_dataset_load", "no images found")
        upload_files(tab, [source / "shape_00.png"], "choose a dataset from the list, or create one")
        tab.fill("lora_trainer_dataset_new_name", "../up")
        assert "Error:" in tab.status_after("lora_trainer_dataset_create", "file names must not contain")

        # A dataset made in the tab: images, then a .zip; the upload rules refuse three bad files, each visibly.
        tab.fill("lora_trainer_dataset_new_name", "shapes")
        tab.status_after("lora_trainer_dataset_create", "created dataset shapes")
        assert tab.value("lora_trainer_dataset_dir") == str(data)
        images = [source / f"shape_0{i}.png" for i in range(4)] + [source / "shape_dup.png"]
        upload_files(tab, images, "shapes: added 5 file(s)")
        upload_files(tab, [tmp_path / "more.zip"], "shapes: added 2 file(s)")
        assert tab.value("lora_trainer_dataset_choice") == "shapes — 7 images, 0 captioned (0%)"
        assert "without a caption" in tab.wait_value("lora_trainer_dataset_warnings", "v.includes('7 image(s)')")
        tab.mark("dataset uploaded")
        upload_files(tab, refused, "shapes: added 0 file(s), refused 3")
        report = tab.value("lora_trainer_upload_report").splitlines()
        assert report[0] == "added 0 file(s)" and len(report) == 4
        assert "refused evil.zip: entry '../../escaped.png' would be written outside the dataset folder" in report[1]
        assert report[2] == "refused fake.png: not an image (the contents do not decode)"
        assert report[3].startswith("refused big.png: ") and "larger than the 51 KiB limit per file" in report[3]
        expected = sorted([p.name for p in images] + ["shape_04.png", "shape_05.png"])
        assert sorted(p.name for p in data.iterdir()) == expected  # the refused files left no trace
        assert [p.name for p in data.parent.iterdir()] == ["shapes"]  # no staging folder left behind
        assert not list(tmp_path.rglob("escaped.png")) and not list(tmp_path.rglob("ok.png"))
        # Cancel answers outside the queue (a running upload is stopped between files: test_dataset_store.py)
        tab.status_after("lora_trainer_upload_cancel", "no upload is running; nothing to cancel")
        tab.mark("bad uploads refused")

        tab.fill("lora_trainer_cfg_output_name", "bad/name")
        assert "give the base checkpoint" in tab.status_after("lora_trainer_start", "base checkpoint")
        tab.fill("lora_trainer_base_model", assets["model"])
        tab.fill("lora_trainer_dataset_dir", data)
        assert "'output_name'" in tab.status_after("lora_trainer_start", "output_name")

        tab.mark("bad inputs")
        # The dataset: warnings, auto-caption, one caption edited, a bulk tag edit.
        tab.status_after("lora_trainer_dataset_load", "loaded 7 images")
        tab.mark("dataset loaded")
        warnings = tab.value("lora_trainer_dataset_warnings")
        assert "without a caption" in warnings and "identical" in warnings and "smaller than 256" in warnings
        tab.fill("lora_trainer_trigger_word", "ltdemo")
        tab.fill("lora_trainer_caption_model", assets["clip_config"])
        tab.fill("lora_trainer_caption_pretrained", assets["clip_weights"])
        assert "captioned 7 image(s)" in tab.status_after("lora_trainer_caption_run", "captioned", timeout=90_000)
        assert all(c.startswith("ltdemo") for c in captions_on_disk(data).values())
        tab.mark("auto-captioned")
        tab.open("lora_trainer_edit_section")  # folded away: the common path needs no caption editing
        page.locator("#lora_trainer_dataset_gallery .thumbnail-item").nth(1).click()
        tab.wait_value("lora_trainer_caption_image", "v === 'shape_01.png'")
        tab.wait_value("lora_trainer_caption_text", f"v === {json.dumps(captions_on_disk(data)['shape_01.png'])}")
        tab.fill("lora_trainer_caption_text", "ltdemo, an edited caption")
        tab.status_after("lora_trainer_caption_save", "saved the caption of shape_01.png")
        assert captions_on_disk(data)["shape_01.png"] == "ltdemo, an edited caption"
        tab.fill("lora_trainer_bulk_tag", "flat style")
        tab.status_after("lora_trainer_bulk_apply", "7 caption(s) changed")
        assert captions_on_disk(data)["shape_01.png"] == "flat style, ltdemo, an edited caption"
        tab.click("lora_trainer_dataset_list_refresh")
        tab.wait_value("lora_trainer_dataset_choice", "v === 'shapes — 7 images, 7 captioned (100%)'")
        tab.shot("dataset")

        # Settings from a YAML file (the CLI's schema), then Start; a second Start is refused.
        page.set_input_files("#lora_trainer_yaml_upload input[type=file]", str(config_file))
        page.wait_for_timeout(500)
        tab.status_after("lora_trainer_yaml_load", "loaded uitest.yaml")
        assert tab.value("lora_trainer_cfg_output_name") == "uitest"
        assert float(tab.value("lora_trainer_cfg_max_train_steps")) == 1000
        tab.status_after("lora_trainer_yaml_save", "config saved as uitest.yaml")
        job_id = tab.status_after("lora_trainer_start", "started: uitest").split("(run ")[1].rstrip(")")
        tab.mark("started")
        # At 1280x800, scrolled down to the YAML buttons at the foot of the settings, Start, the progress and the
        # result are in view beside them (the right column stays on screen).
        page.locator("#lora_trainer_yaml_load").scroll_into_view_if_needed()
        assert tab.off_screen("lora_trainer_yaml_load", "lora_trainer_start", "lora_trainer_progress",
                              "lora_trainer_result") == []
        tab.shot("started")
        assert "Estimate" in tab.value("lora_trainer_estimate")
        assert "already in progress" in tab.status_after("lora_trainer_start", "Error:")

        # Live progress: three updates, the loss chart, a sample; the same after a page reload.
        steps = progress_steps(tab, 3)
        assert steps == sorted(steps)
        page.wait_for_selector("#lora_trainer_loss_chart canvas, #lora_trainer_loss_chart svg")
        page.wait_for_selector("#lora_trainer_samples img")
        tab.shot("training")
        page.reload(wait_until="domcontentloaded")
        page.wait_for_selector("#lora_trainer_dataset_dir")
        progress_steps(tab, 2)
        page.wait_for_selector("#lora_trainer_samples img")
        assert "running · started: uitest" in tab.value("lora_trainer_status")  # Status after the reload too
        tab.fill("lora_trainer_dataset_dir", data)  # the form starts empty again; the run went on
        tab.status_after("lora_trainer_dataset_load", "loaded 7 images")

        tab.mark("progress seen, also after a reload")
        # Stop and save, then Extend by 4 steps.
        tab.status_after("lora_trainer_stop_save", "stopping after this step")
        stopped = tab.wait_value("lora_trainer_progress", "v.includes('stopped')", 60_000)
        stop_step = int(stopped.split(" step ")[1].split("/")[0])
        assert stop_step < 1000
        tab.wait_value("lora_trainer_result", "v.includes('uitest.safetensors')")
        tab.mark("stopped and saved")
        tab.fill("lora_trainer_extend_steps", 4)
        tab.status_after("lora_trainer_extend", "extending uitest by 4 steps")
        done = tab.wait_value("lora_trainer_progress", "v.includes('finished')", 90_000)
        assert f"step {stop_step + 4}/{stop_step + 4}" in done
        tab.wait_value("lora_trainer_status", "v.includes('finished')")  # Status tells the end state too
        assert (tmp_path / "runs" / "uitest" / "uitest.safetensors").is_file()

        tab.mark("extended")
        # The Try panel renders an image with the trained LoRA; past runs list the run with its config.
        tab.fill("lora_trainer_try_prompt", "ltdemo, a red circle")
        tab.status_after("lora_trainer_try_run", "uitest at weight 0.7", timeout=90_000)
        page.wait_for_selector("#lora_trainer_try_image img")
        tab.mark("tried")
        tab.click("lora_trainer_runs_refresh")

        # Downloads: the LoRA, byte for byte, and the run folder as a .zip (samples, config, metrics).
        run = tmp_path / "runs" / "uitest"
        assert download(tab, "lora_trainer_download_lora", "uitest.safetensors") == \
            (run / "uitest.safetensors").read_bytes()
        with zipfile.ZipFile(io.BytesIO(download(tab, "lora_trainer_download_zip", "uitest.zip"))) as zf:
            names = set(zf.namelist())
        assert {"uitest/config.yaml", "uitest/metrics.csv", "uitest/uitest.safetensors"} <= names
        assert any(n.startswith("uitest/samples/") for n in names) and not any("checkpoint" in n for n in names)
        tab.mark("downloaded")
        tab.shot("result")

        # The API on the same server and host: it lists the run and knows the job the tab started.
        with urllib.request.urlopen(f"{url}lora-trainer/v1/runs", timeout=30) as response:
            assert "uitest" in [r["name"] for r in json.loads(response.read())["runs"]]
        with urllib.request.urlopen(f"{url}lora-trainer/v1/jobs/{job_id}", timeout=30) as response:
            assert json.loads(response.read())["state"] == "stopped"

        # Pick the dataset from the list, rename it, delete it (only with its name typed).
        tab.fill("lora_trainer_dataset_new_name", "scratch")
        tab.status_after("lora_trainer_dataset_create", "created dataset scratch")
        tab.choose("lora_trainer_dataset_choice", "shapes — 7 images")
        tab.wait_value("lora_trainer_dataset_dir", f"v === {json.dumps(str(data))}")
        tab.open("lora_trainer_dataset_manage")
        tab.fill("lora_trainer_dataset_rename_to", "shapes v2")
        tab.status_after("lora_trainer_dataset_rename", "renamed dataset shapes to shapes v2")
        assert tab.value("lora_trainer_dataset_dir") == str(data.parent / "shapes v2")
        tab.fill("lora_trainer_dataset_delete_confirm", "shapes")
        assert "Error: type the dataset's name" in tab.status_after("lora_trainer_dataset_delete", "to confirm")
        tab.fill("lora_trainer_dataset_delete_confirm", "shapes v2")
        tab.status_after("lora_trainer_dataset_delete", "deleted dataset shapes v2")
        assert sorted(p.name for p in data.parent.iterdir()) == ["scratch"]
        assert tab.value("lora_trainer_dataset_dir") == ""
        tab.mark("dataset renamed and deleted")
        # A narrow window stacks the columns: the run's column goes under the settings, not off to the side.
        page.set_viewport_size({"width": 720, "height": 800})
        page.wait_for_timeout(300)
        settings = page.locator("#lora_trainer_settings").first.bounding_box()
        output = page.locator("#lora_trainer_output").first.bounding_box()
        assert abs(output["x"] - settings["x"]) < 40 and output["y"] >= settings["y"] + settings["height"] - 1
        page.close()
