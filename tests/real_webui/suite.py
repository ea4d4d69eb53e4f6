"""The real-WebUI suite: the extension in real AUTOMATIC1111 1.10.1 and Forge installs, through their own routes.

    python tests/real_webui/suite.py --a1111 /work/webuis/a1111 --forge /work/webuis/forge
    (or: make webui-test A1111_DIR=... FORGE_DIR=...)

Build the installs first (build_a1111.sh, build_forge.sh; they need the fetched snapshots named there). For each
WebUI the suite installs the working tree as a user would (a copy in extensions/, install.py run the way the WebUI
runs it) beside a probe extension of its own (probe/), starts the WebUI in API mode and checks, with every training
option at its default except the dataset, the step count and a small resolution: the start, training on the loaded
model, the lock, txt2img before, during and after, the file in the WebUI's own LoRA loader, the model given back,
refusals, stop, Extend; in Forge also a Flux.1-dev checkpoint, which must be refused by name. Then it starts the UI
and drives the tab in Chromium (ui_checks.py). Each check and its
figure go into a dated report (--report, default tests/real_webui/REPORT.md). Exit status 1 if a check failed.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
API = "/lora-trainer/v1"
PROBE = "/lora-trainer-probe/v1"
LAUNCH = ["--skip-prepare-environment", "--skip-install", "--skip-torch-cuda-test", "--skip-version-check",
          "--no-download-sd-model", "--server-name", "127.0.0.1"]
FLAVOURS = {"a1111": ["--use-cpu", "all", "--no-half", "--no-half-vae", "--precision", "full"],
            "forge": ["--always-cpu"]}
PORTS = {"a1111": 7861, "forge": 7862}
TXT2IMG = {"prompt": "a red circle", "negative_prompt": "", "seed": 7, "steps": 4, "width": 64, "height": 64,
           "cfg_scale": 5, "sampler_name": "Euler", "batch_size": 1}


class Report:
    def __init__(self) -> None:
        self.rows: list = []  # (webui, check, ok, figure)

    def check(self, webui: str, name: str, ok: bool, figure: str = "") -> bool:
        self.rows.append((webui, name, bool(ok), figure))
        print(f"[{webui}] {'PASS' if ok else 'FAIL'} {name}: {figure}", flush=True)
        return bool(ok)

    def failed(self) -> list:
        return [r for r in self.rows if not r[2]]


# -- HTTP ------------------------------------------------------------------------------------------------------------
def call(port: int, method: str, path: str, body=None, timeout: float = 600):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, json.loads(answer.read() or b"null")
    except urllib.error.HTTPError as exc:
        text = exc.read()
        try:
            return exc.code, json.loads(text)
        except ValueError:
            return exc.code, {"error": text.decode(errors="replace")[:300]}


def txt2img(port: int, prompt: str = TXT2IMG["prompt"]) -> bytes:
    """The pixels of the generated image (the PNG's text chunks hold the prompt, which differs with a LoRA tag)."""
    import io

    from PIL import Image

    status, body = call(port, "POST", "/sdapi/v1/txt2img", {**TXT2IMG, "prompt": prompt})
    if status != 200:
        raise RuntimeError(f"txt2img answered {status}: {str(body)[:300]}")
    with Image.open(io.BytesIO(base64.b64decode(body["images"][0]))) as image:
        return image.convert("RGB").tobytes()


def wait_job(port: int, job_id: str, states=("finished", "stopped", "failed"), timeout: float = 1800) -> dict:
    deadline, body = time.time() + timeout, {}
    while time.time() < deadline:
        _, body = call(port, "GET", f"{API}/jobs/{job_id}")
        if body.get("state") in states:
            return body
        time.sleep(0.5)
    raise TimeoutError(f"job {job_id} did not reach {states}: {body.get('state')}")


# -- the install and the server --------------------------------------------------------------------------------------
def install_extension(webui: Path) -> str:
    """Copy the working tree into extensions/ (as a clone would hold it) with the probe, run install.py as the WebUI
    does; return what install.py printed."""
    target = webui / "extensions" / "lora_trainer"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(ROOT, target, ignore=shutil.ignore_patterns(
        ".venv*", ".git", "test-artifacts", ".pytest_cache", ".ruff_cache", "__pycache__", "demo_output"))
    probe = webui / "extensions" / "lora_trainer_probe"
    shutil.rmtree(probe, ignore_errors=True)
    shutil.copytree(HERE / "probe", probe)
    env = {**os.environ, **webui_env(webui), "PYTHONPATH": str(webui)}
    python = str(webui / "venv" / "bin" / "python")
    # As on a user's first install: what install.py adds is not there yet.
    subprocess.run([python, "-m", "pip", "uninstall", "-y", "-q", "lycoris-lora", "toml"], capture_output=True,
                   timeout=300)
    before = installed_packages(python)
    done = subprocess.run([python, str(target / "install.py")], cwd=webui, env=env, capture_output=True, text=True,
                          timeout=900)
    after = installed_packages(python)
    changed = sorted(k for k in before if after.get(k) != before[k])
    added = sorted(f"{k}=={v}" for k, v in after.items() if k not in before)
    return (done.stdout + done.stderr).strip(), added, changed


def installed_packages(python: str) -> dict:
    listed = subprocess.run([python, "-m", "pip", "list", "--format=freeze", "--disable-pip-version-check"],
                            capture_output=True, text=True, timeout=300).stdout
    return dict(line.lower().split("==", 1) for line in listed.splitlines() if "==" in line)


def webui_env(webui: Path) -> dict:
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    if (webui / "hf_home").is_dir():
        env["HF_HOME"] = str(webui / "hf_home")
    return env


class Server:
    def __init__(self, webui: Path, flavour: str, api_only: bool, extra: Optional[list] = None):
        self.webui, self.flavour, self.port = webui, flavour, PORTS[flavour]
        self.log = webui / f"suite-{'api' if api_only else 'ui'}{'-extra' if extra else ''}.log"
        args = LAUNCH + FLAVOURS[flavour] + ["--port", str(self.port), "--api"] + (["--nowebui"] if api_only else [])
        args += extra or []
        self.started = time.time()
        self.process = subprocess.Popen([str(webui / "venv" / "bin" / "python"), "launch.py", *args], cwd=webui,
                                        env={**os.environ, **webui_env(webui)}, stdout=open(self.log, "w"),
                                        stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 300) -> float:
        """Seconds until the WebUI logged 'Startup time' and its API answers (a request before that line kills A1111's
        UI start); raises with the log's tail if it died or never came up."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the WebUI exited ({self.process.returncode}): {self.tail()}")
            if "Startup time" in self.log.read_text(errors="replace"):
                try:
                    if call(self.port, "GET", "/sdapi/v1/sd-models", timeout=10)[0] == 200:
                        return time.time() - self.started
                except OSError:
                    pass
            time.sleep(1)
        raise RuntimeError(f"the WebUI did not come up in {timeout:.0f} s: {self.tail()}")

    def tail(self, lines: int = 12) -> str:
        return " | ".join(self.log.read_text(errors="replace").strip().splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)


# -- the checks ------------------------------------------------------------------------------------------------------
def make_datasets(webui: Path) -> dict:
    sys.path.insert(0, str(ROOT))
    from lora_trainer.demo import make_demo_dataset

    root = webui / "outputs" / "suite-data"
    shutil.rmtree(root, ignore_errors=True)
    shapes = make_demo_dataset(root / "shapes", count=6)
    (root / "empty").mkdir(parents=True)
    (root / "uncaptioned").mkdir()
    shutil.copy(next(shapes.glob("*.png")), root / "uncaptioned" / "a.png")
    reg = make_demo_dataset(root / "reg" / "1_shape", count=3, seed=4).parent
    toml = root / "kohya_dataset.toml"  # kohya's dataset config: a DreamBooth dataset with a regularization subset
    toml.write_text(f"[general]\nshuffle_caption = true\nkeep_tokens = 1\n\n[[datasets]]\nresolution = 64\n"
                    f"batch_size = 2\n\n  [[datasets.subsets]]\n  image_dir = '{shapes.as_posix()}'\n"
                    f"  num_repeats = 2\n\n  [[datasets.subsets]]\n  is_reg = true\n"
                    f"  image_dir = '{(reg / '1_shape').as_posix()}'\n  class_tokens = 'shape'\n")
    return {"shapes": shapes, "empty": root / "empty", "uncaptioned": root / "uncaptioned", "reg": reg,
            "toml": toml}


def api_checks(report: Report, flavour: str, webui: Path) -> None:
    r = lambda name, ok, figure="": report.check(flavour, name, ok, figure)  # noqa: E731
    printed, added, changed = install_extension(webui)
    r("install.py adds only what is missing (at most lycoris-lora, toml) and changes no installed package",
      not changed and {a.split("==")[0] for a in added} <= {"lycoris-lora", "lycoris_lora", "toml"},
      f"added {added or 'nothing'}, changed {changed or 'nothing'}; it said: "
      f"{printed.splitlines()[-1] if printed else '(nothing)'}")
    data = make_datasets(webui)
    server = Server(webui, flavour, api_only=True)
    try:
        try:
            seconds = server.wait_ready()
            r("starts in API mode with the extension", True, f"API up after {seconds:.0f} s")
        except RuntimeError as exc:
            r("starts in API mode with the extension", False, str(exc)[:600])
            return
        port = server.port
        before_image = txt2img(port)  # also makes Forge load its model
        _, before = call(port, "GET", f"{PROBE}/model")
        r("the Model box names the loaded checkpoint", "tiny-sd1" in before["model_box"] and
          "no checkpoint" not in before["model_box"], before["model_box"])
        train = {"train_data_dir": str(data["shapes"]), "resolution": 64, "min_bucket_reso": 64,
                 "max_train_steps": 8}
        refusals = {
            "an empty folder": ({**train, "train_data_dir": str(data["empty"])}, 422),
            "images without captions": ({**train, "train_data_dir": str(data["uncaptioned"])}, 422),
            "resolution 64 with the default min_bucket_reso": ({**train, "min_bucket_reso": 256}, 422),
            "an output name with ..": ({**train, "output_name": "../evil"}, 422),
            "a folder outside the allowed ones": ({**train, "train_data_dir": "/etc"}, 403),
            "a wrong type": ({**train, "max_train_steps": "many"}, 422),
        }
        runs = webui / "outputs" / "lora_trainer"
        runs_before = sorted(p.name for p in runs.glob("*")) if runs.is_dir() else []
        for what, (body, expected) in refusals.items():
            status, answer = call(port, "POST", f"{API}/jobs", body)
            r(f"refuses {what} ({expected})", status == expected and len(str(answer.get("error", "")).splitlines())
              == 1, f"{status}: {answer.get('error')}")
        runs_after = sorted(p.name for p in runs.glob("*")) if runs.is_dir() else []
        r("refused requests leave no run folder", runs_after == runs_before,
          f"{len(runs_after) - len(runs_before)} new run folders")

        name = f"suite-{flavour}-{int(time.time())}"
        status, job = call(port, "POST", f"{API}/jobs", {**train, "output_name": name})
        if not r("starts a run on the loaded model with the defaults (201)", status == 201, f"{status} {job}"[:300]):
            return
        busy_status, busy = call(port, "POST", f"{API}/jobs", {**train, "output_name": name + "-b"})
        r("a second run while one trains gets 409", busy_status == 409, f"{busy_status}: {busy.get('error')}")
        during = {}

        def generate_during() -> None:
            during["image"] = txt2img(port)
            during["at"] = time.time()

        thread = threading.Thread(target=generate_during)
        time.sleep(1.0)
        thread.start()
        last_step_at, phases, textinfo = [None], [], []
        while True:
            _, body = call(port, "GET", f"{API}/jobs/{job['id']}")
            if body["step"] == body["total_steps"] and body["total_steps"] and last_step_at[0] is None:
                last_step_at[0] = time.time()
            if body.get("phase") and body["phase"] not in phases:
                phases.append(body["phase"])
            if last_step_at[0] is not None:  # the WebUI's own progress bar (shared.state) after the last step
                info = call(port, "GET", "/sdapi/v1/progress?skip_current_image=true")[1].get("textinfo") or ""
                if info.startswith("Training LoRA:") and info not in textinfo:
                    textinfo.append(info)
            if body["state"] in ("finished", "stopped", "failed"):
                done, finished_at = body, time.time()
                break
            time.sleep(0.25)
        thread.join(600)
        r("training with every other option at its default finishes", done["state"] == "finished",
          f"{done['state']} at step {done['step']}/{done['total_steps']}; {done.get('error') or ''}")
        if done["state"] != "finished":
            return
        log_lines = done["log"]
        train_s = finished_at - (last_step_at[0] or finished_at)
        r("txt2img sent during training waits for it, then matches the image before training",
          during.get("image") == before_image and during.get("at", 0) >= (last_step_at[0] or 0),
          f"returned {during.get('at', 0) - (last_step_at[0] or 0):+.1f} s after the last step; identical: "
          f"{during.get('image') == before_image}")
        r("after the last step: bounded, and its phases shown in the job and the WebUI's progress",
          train_s < 60 and phases and textinfo, f"{train_s:.1f} s from the last step to finished; phases seen "
          f"{phases}; WebUI progress {textinfo}; {[line[9:] for line in log_lines if 'fixed-batch' in line][-1:]}")
        _, after = call(port, "GET", f"{PROBE}/model")
        r("model weights bit-identical after training", (after["unet_hash"], after["text_hash"]) ==
          (before["unet_hash"], before["text_hash"]), f"UNet {after['unet_hash']}, text {after['text_hash']}")
        r("requires_grad flags as before", (after["unet_requires_grad"], after["text_requires_grad"]) ==
          (before["unet_requires_grad"], before["text_requires_grad"]),
          f"{before['unet_requires_grad']}/{before['text_requires_grad']} -> "
          f"{after['unet_requires_grad']}/{after['text_requires_grad']}")
        lora_dir = webui / "models" / "Lora"
        published = sorted(lora_dir.glob(f"{name}*"))
        modes = {oct(p.stat().st_mode & 0o777) for p in published}
        r("published to models/Lora with the usual file mode", len(published) >= 2 and modes == {"0o644"},
          f"{[p.name for p in published]} {modes}")
        lora_file = lora_dir / f"{name}.safetensors"
        with_lora = txt2img(port, f"{TXT2IMG['prompt']} <lora:{name}:1>")
        if flavour == "a1111":
            _, loaded = call(port, "GET", f"{PROBE}/lora")
            matched = loaded["loaded"][0]["matched"] if loaded["loaded"] else 0
        else:
            _, loaded = call(port, "GET", f"{PROBE}/lora?file={lora_file}")
            matched = loaded["matched"]
        in_file = len({k.split(".", 1)[0] for k in _safetensors_keys(lora_file)})
        r("every LoRA module is matched by the WebUI's own loader", matched == in_file and matched > 0,
          f"{matched}/{in_file}")
        r("the LoRA at weight 1 changes the image", with_lora != before_image,
          f"{sum(a != b for a, b in zip(with_lora, before_image))} of {len(before_image)} pixel values differ")
        zero = txt2img(port, f"{TXT2IMG['prompt']} <lora:{name}:0>")
        r("weight 0 is identical to no LoRA", zero == before_image,
          f"{sum(a != b for a, b in zip(zero, before_image))} pixel values differ")
        txt2img(port)
        _, clean = call(port, "GET", f"{PROBE}/model")
        r("model weights as before once a generation without the LoRA ran", (clean["unet_hash"],
          clean["text_hash"]) == (before["unet_hash"], before["text_hash"]), clean["unet_hash"])

        # Stop and save, then Extend; a failed Extend changes no file.
        status, long_job = call(port, "POST", f"{API}/jobs", {**train, "output_name": name + "-long",
                                                              "max_train_steps": 300})
        wait_until_step(port, long_job["id"], 2)
        call(port, "POST", f"{API}/jobs/{long_job['id']}/stop", {"save": True})
        stopped = wait_job(port, long_job["id"])
        r("stop-and-save keeps the LoRA trained so far", stopped["state"] == "stopped" and stopped["lora_path"],
          f"stopped at step {stopped['step']}: {Path(stopped['lora_path'] or '-').name}")
        status, extended = call(port, "POST", f"{API}/jobs/{long_job['id']}/extend", {"steps": 2})
        extended_done = wait_job(port, extended["id"]) if status == 201 else {"state": f"HTTP {status}"}
        r("Extend continues the stopped run", extended_done.get("state") == "finished" and
          extended_done.get("step") == stopped["step"] + 2,
          f"{extended_done.get('state')} at step {extended_done.get('step')}; {extended_done.get('error') or ''}")
        run_dir = Path(stopped["run_dir"])
        states = sorted(run_dir.glob("checkpoints/*/training_state.pt"))
        states[-1].write_bytes(b"damaged")
        kept = {p.name: p.read_bytes() for p in (run_dir / "config.yaml", run_dir / "metrics.csv")}
        status, broken = call(port, "POST", f"{API}/jobs/{extended['id']}/extend", {"steps": 5})
        broken_done = wait_job(port, broken["id"]) if status == 201 else {"state": f"HTTP {status}", **broken}
        r("a failed Extend leaves config.yaml and metrics.csv as they were",
          kept == {p.name: p.read_bytes() for p in (run_dir / "config.yaml", run_dir / "metrics.csv")},
          f"{broken_done.get('state')}: {broken_done.get('error')}")
        kohya_checks(r, port, webui, data, train, name, before)
    finally:
        server.stop()


def kohya_checks(r, port: int, webui: Path, data: dict, train: dict, name: str, before: dict) -> None:
    """kohya's dataset features on the WebUI's loaded model: regularization images, validation loss, loss options,
    disk caches (reused by a second run), a kohya dataset TOML; tensorboard, absent from both WebUIs' venvs, is
    refused before the start."""
    features = {**train, "reg_data_dir": str(data["reg"]), "validation_split": 0.2, "validate_every_n_steps": 4,
                "loss_type": "huber", "min_timestep": 50, "debiased_estimation_loss": True,
                "cache_latents_to_disk": True, "cache_text_encoder_outputs_to_disk": True}
    results = []
    for n in (1, 2):
        status, job = call(port, "POST", f"{API}/jobs", {**features, "output_name": f"{name}-kohya{n}"})
        results.append(wait_job(port, job["id"]) if status == 201 else {"state": f"HTTP {status}", **job})
    first, second = results
    reused = [line[9:] for line in second.get("log", []) if "latent cache" in line]
    r("regularization, validation loss, huber, debiased, disk caches: trains; a second run reuses the caches",
      first["state"] == second["state"] == "finished" and [s for s, _ in first.get("val_losses", [])] == [4, 8]
      and reused and " 0 encoded" in reused[-1],
      f"{first['state']}/{second['state']}; validation at {[s for s, _ in first.get('val_losses', [])]}; "
      f"{reused[-1:] or second.get('error')}")
    status, job = call(port, "POST", f"{API}/jobs", {"dataset_config": str(data["toml"]), "max_train_steps": 4,
                                                     "min_bucket_reso": 64, "output_name": f"{name}-toml"})
    done = wait_job(port, job["id"]) if status == 201 else {"state": f"HTTP {status}", **job}
    lora = webui / "models" / "Lora" / f"{name}-toml.safetensors"
    in_file = len({k.split(".", 1)[0] for k in _safetensors_keys(lora)}) if lora.is_file() else 0
    image = txt2img(port, f"{TXT2IMG['prompt']} <lora:{name}-toml:1>") if lora.is_file() else b""
    r("a kohya dataset TOML trains, and its LoRA changes the WebUI's image", done["state"] == "finished" and
      in_file > 0 and image != txt2img(port), f"{done['state']}: {done.get('error') or lora.name}, {in_file} modules")
    status, answer = call(port, "POST", f"{API}/jobs", {**train, "log_with": "tensorboard"})
    r("log_with: tensorboard without the package is refused in one line (422)", status == 422 and
      "tensorboard" in str(answer.get("error")) and len(str(answer.get("error")).splitlines()) == 1,
      f"{status}: {answer.get('error')}")
    _, after = call(port, "GET", f"{PROBE}/model")
    r("model weights bit-identical after these runs", (after["unet_hash"], after["text_hash"]) ==
      (before["unet_hash"], before["text_hash"]), after["unet_hash"])


def wait_until_step(port: int, job_id: str, step: int, timeout: float = 900) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        _, body = call(port, "GET", f"{API}/jobs/{job_id}")
        if body["step"] >= step or body["state"] in ("finished", "stopped", "failed"):
            return
        time.sleep(0.25)


def _safetensors_keys(path: Path) -> list:
    with open(path, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(size))
    return [k for k in header if k != "__metadata__"]


def flux_checks(report: Report, webui: Path) -> None:
    """Forge with a Flux.1-dev checkpoint (build_forge.sh makes one Forge loads as Flux): a run is refused in one
    line, first in the job (the model loads when the run starts), then with 422 before anything starts."""
    r = lambda name, ok, figure="": report.check("forge", f"Flux: {name}", ok, figure)  # noqa: E731
    flux = webui / "flux" / "tiny-flux.ckpt"
    if not flux.is_file():
        r("a Flux checkpoint to load", False, f"{flux} is missing: run build_forge.sh")
        return
    expected = "the loaded checkpoint is Flux.1-dev; training supports SD1, SD2 and SDXL checkpoints in this version"
    server = Server(webui, "forge", api_only=True, extra=["--ckpt", str(flux)])
    runs = webui / "outputs" / "lora_trainer"
    before = sorted(p.name for p in runs.glob("*")) if runs.is_dir() else []
    try:
        server.wait_ready()
        body = {"train_data_dir": str(webui / "outputs" / "suite-data" / "shapes"), "resolution": 64,
                "min_bucket_reso": 64, "max_train_steps": 2}
        status, job = call(server.port, "POST", f"{API}/jobs", body)
        done = wait_job(server.port, job["id"]) if status == 201 else {"state": f"HTTP {status}", **job}
        r("a run while Flux is not loaded yet fails in one line once the run loads it",
          done.get("state") == "failed" and done.get("error") == expected, f"{done.get('state')}: {done.get('error')}")
        _, family = call(server.port, "GET", f"{PROBE}/family")
        r("Forge really loaded its Flux engine (no is_flux attribute; every is_* flag False)",
          family["engine"] == "Flux" and family["model_config"] == "Flux" and not any(family["flags"].values()),
          f"engine {family['engine']}, model_config {family['model_config']}, flags {family['flags']}")
        r("the Model box names the family Forge detected", "Flux.1-dev: cannot be trained" in family["model_box"],
          family["model_box"])
        status, refused = call(server.port, "POST", f"{API}/jobs", body)
        r("with Flux loaded, a run is refused with 422 before anything starts",
          status == 422 and refused.get("error") == expected, f"{status}: {refused.get('error')}")
        r("the model untouched (its tensors still Forge's inference tensors)",
          family["first_unet_tensor_is_inference"] is True, str(family["first_unet_tensor_is_inference"]))
        after = sorted(p.name for p in runs.glob("*")) if runs.is_dir() else []
        r("no run folder left behind", after == before, f"{len(after) - len(before)} new")
        r("the refusal is in the WebUI's console", expected in server.log.read_text(errors="replace"), "")
    finally:
        server.stop()


def ui_checks(report: Report, flavour: str, webui: Path) -> None:
    from ui_checks import run_tab_checks

    server = Server(webui, flavour, api_only=False)
    try:
        try:
            seconds = server.wait_ready()
            report.check(flavour, "starts with the UI and the extension", True, f"up after {seconds:.0f} s")
        except RuntimeError as exc:
            report.check(flavour, "starts with the UI and the extension", False, str(exc)[:600])
            return
        run_tab_checks(report, flavour, webui, server.port)
    finally:
        server.stop()


# -- the report ------------------------------------------------------------------------------------------------------
def webui_commit(webui: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(webui), "rev-parse", "--short=8", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or "?"
    except OSError:
        return "?"


def write_report(report: Report, path: Path, installs: dict, started: float) -> None:
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=8", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    changed = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                             capture_output=True, text=True).stdout.splitlines()
    written_here = ("docs/screenshot_", "tests/real_webui/REPORT.md")  # this suite's own output is not a change
    dirty = [line for line in changed if not line[3:].startswith(written_here)]
    lines = [f"# Real-WebUI suite report, {datetime.date.today().isoformat()}", "",
             f"Extension at `{commit}`{' (with uncommitted changes)' if dirty else ''}; "
             f"{platform.node() and 'machine'}: {os.cpu_count()} CPU cores, Python "
             f"{platform.python_version()} (suite), {time.time() - started:.0f} s in all. "
             f"{len(report.rows) - len(report.failed())} of {len(report.rows)} checks passed.", ""]
    for flavour, webui in installs.items():
        label = "AUTOMATIC1111 1.10.1" if flavour == "a1111" else "Forge 2.0.1v1.10.1"
        lines += [f"## {label} (`{webui_commit(webui)}`, {webui})", "", "| check | result | figure |", "|---|---|---|"]
        for who, name, ok, figure in report.rows:
            if who == flavour:
                figure = str(figure).replace("|", "/").replace("\n", " ")
                lines.append(f"| {name} | {'pass' if ok else '**FAIL**'} | {figure} |")
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a1111", type=Path, help="a real AUTOMATIC1111 1.10.1 install (build_a1111.sh)")
    parser.add_argument("--forge", type=Path, help="a real Forge install (build_forge.sh)")
    parser.add_argument("--report", type=Path, default=HERE / "REPORT.md")
    parser.add_argument("--skip-ui", action="store_true", help="API checks only")
    parser.add_argument("--update-screenshots", action="store_true",
                        help="copy the tab's 1280x800 screenshots into docs/ (the README's pictures)")
    options = parser.parse_args(argv)
    installs = {k: v for k, v in (("a1111", options.a1111), ("forge", options.forge)) if v}
    if not installs:
        parser.error("give --a1111 DIR and/or --forge DIR (build them with build_a1111.sh / build_forge.sh)")
    for flavour, webui in installs.items():
        if not (webui / "launch.py").is_file() or not (webui / "venv" / "bin" / "python").is_file():
            parser.error(f"{webui}: not a built {flavour} install (no launch.py or venv); run build_{flavour}.sh")
    sys.path.insert(0, str(HERE))
    report, started = Report(), time.time()
    for flavour, webui in installs.items():
        api_checks(report, flavour, webui)
        if flavour == "forge":
            flux_checks(report, webui)
        if not options.skip_ui:
            ui_checks(report, flavour, webui)
    write_report(report, options.report, installs, started)
    if options.update_screenshots and not options.skip_ui:
        for flavour in installs:
            shot = ROOT / "test-artifacts" / f"real-{flavour}-screenshot.png"
            if shot.is_file():
                shutil.copyfile(shot, ROOT / "docs" / f"screenshot_{flavour}.png")
    print(f"report: {options.report}; {len(report.failed())} failed of {len(report.rows)}")
    return 1 if report.failed() else 0


if __name__ == "__main__":
    sys.exit(main())
