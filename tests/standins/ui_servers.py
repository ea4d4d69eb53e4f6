"""Start the Train LoRA UI under a given gradio version, and drive it with Playwright and Debian's chromium.

Older gradio versions live in overlay folders (``.venv-gradio3``, ``.venv-gradio4``, made by ``make overlays``)
that are put in front of the main venv with PYTHONPATH, so torch and the engine are not installed twice.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator, List, Optional

import pytest

from lora_trainer.api import PREFIX

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
OVERLAYS = {"current": None, "4.40.0": ROOT / ".venv-gradio4", "3.41.2": ROOT / ".venv-gradio3"}
API_READY_PATH = PREFIX.lstrip("/") + "/runs"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_env(version: str, extra_paths: List[Path] = (), cache: Optional[Path] = None) -> dict:
    overlay = OVERLAYS[version]
    if overlay is not None and not (overlay / "gradio").is_dir():
        pytest.skip(f"gradio {version} overlay {overlay.name} is missing: run `make overlays`")
    if overlay is None:
        pytest.importorskip("gradio")
    env = dict(os.environ)
    paths = [str(p) for p in ([overlay] if overlay else []) + list(extra_paths) + [ROOT]]
    env.update(PYTHONPATH=os.pathsep.join(paths), GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1",
               PYTHONUNBUFFERED="1", NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    if cache is not None:
        env["LORA_TRAINER_CACHE"] = str(cache)
    return env


def answers(url: str) -> Optional[int]:
    """The HTTP status ``url`` answers with, or None when nothing answers yet."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


@contextlib.contextmanager
def running_server(command: List[str], env: dict, log_path: Path, port: int, timeout: float = 120,
                   ready_path: str = API_READY_PATH) -> Iterator[str]:
    """Run ``command`` (which serves on ``port``) until the block ends; yields its URL once the page and
    ``ready_path`` answer. The API routes join gradio's app just after gradio starts serving (there is no hook
    before), so the page alone answering does not mean the API is there yet: a 401 or 200 on ``ready_path``
    does."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{port}/"
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(command, cwd=str(ROOT), env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise AssertionError(f"server exited with {proc.returncode}:\n{log_tail(log_path)}")
                if answers(url) == 200 and answers(url + ready_path.lstrip("/")) not in (None, 404):
                    break
                if time.monotonic() > deadline:
                    raise AssertionError(f"server did not answer in {timeout:.0f} s:\n{log_tail(log_path)}")
                time.sleep(0.5)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def ui_command(port: int, output_dir: Path) -> List[str]:
    return [sys.executable, "-m", "lora_trainer", "ui", "--port", str(port), "--output-dir", str(output_dir)]


@contextlib.contextmanager
def browser(profile: Path) -> Iterator[object]:
    """A Playwright browser context on Debian's chromium (never ``playwright install``)."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium (make test does)")
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(str(profile), executable_path=CHROMIUM, headless=True,
                                                       args=CHROMIUM_ARGS, viewport={"width": 1280, "height": 900})
        context.set_default_timeout(30_000)
        try:
            yield context
        finally:
            context.close()


class TabPage:
    """The tab in a page: fill, click and read components by their lora_trainer_ ids in any gradio version."""

    def __init__(self, page, name: str):
        self.page, self.name = page, name
        self.shots = 0
        self.started = time.monotonic()

    def mark(self, label: str) -> None:
        """Note how long the flow took to get here (test-artifacts/<name>-timings.txt)."""
        ARTIFACTS.mkdir(exist_ok=True)
        with open(ARTIFACTS / f"{self.name}-timings.txt", "a", encoding="utf-8") as fh:
            fh.write(f"{time.monotonic() - self.started:7.1f} s  {label}\n")

    def box(self, elem_id: str):
        return self.page.locator(f"#{elem_id} textarea, #{elem_id} input:not([type=file])").first

    def fill(self, elem_id: str, text) -> None:
        box = self.box(elem_id)
        box.fill(str(text))
        box.press("Tab")  # gradio 3 and 4 commit a number or text on blur

    def value(self, elem_id: str) -> str:
        return self.box(elem_id).input_value()

    def click(self, elem_id: str) -> None:
        self.page.locator(f"button#{elem_id}, #{elem_id} button").first.click()

    def choose(self, elem_id: str, option: str) -> None:
        """Pick ``option`` in a dropdown as a user does (the options list is the same in gradio 3, 4 and 6)."""
        self.box(elem_id).click()
        self.page.locator(f"#{elem_id} li[data-testid=dropdown-option]").filter(has_text=option).first.click()

    def off_screen(self, *elem_ids: str) -> list:
        """The ids whose top part (up to 40 px) is outside the viewport, where the page is scrolled now."""
        height = self.page.viewport_size["height"]
        out = []
        for elem_id in elem_ids:
            box = self.page.locator(f"#{elem_id}").first.bounding_box()
            if box is None or box["y"] < 0 or box["y"] + min(box["height"], 40) > height:
                out.append(elem_id)
        return out

    def open(self, accordion_id: str) -> None:
        """Unfold an accordion as a user does (a click on its header; gradio 3, 4 and 6 all draw a .label-wrap)."""
        header = self.page.locator(f"#{accordion_id} .label-wrap").first
        if "open" not in (header.get_attribute("class") or "").split():
            header.click()
        self.page.wait_for_timeout(200)

    def wait_value(self, elem_id: str, predicate_js: str, timeout: float = 60_000) -> str:
        """Wait until the text box's value satisfies ``predicate_js`` (a JS expression over ``v``)."""
        self.page.wait_for_function(
            f"""() => {{ const el = document.querySelector('#{elem_id} textarea, #{elem_id} input');
                         const v = el ? el.value : ''; return {predicate_js}; }}""", timeout=timeout)
        return self.value(elem_id)

    def status_after(self, button: str, expect: str, timeout: float = 60_000) -> str:
        """Click ``button`` and wait for the status line to contain ``expect``."""
        before = self.value("lora_trainer_status")
        assert expect not in before, f"the status already says {before!r}: the test cannot see a new message"
        self.click(button)
        return self.wait_value("lora_trainer_status", f"v.includes({expect!r})", timeout)

    def shot(self, label: str) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        self.shots += 1
        path = ARTIFACTS / f"{self.name}-{self.shots:02d}-{label}.png"
        self.page.screenshot(path=str(path), full_page=True)
        self.mark(f"screenshot {label}")
        return path
