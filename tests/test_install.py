"""install.py in a venv holding some of A1111's pins: it adds what is missing and changes nothing installed."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_STUB = ROOT / "tests" / "standins" / "webui_modules"
PINS = ["pillow==9.5.0", "safetensors==0.4.2", "pyyaml==6.0.1"]  # A1111 1.10's pins (pyyaml: an older one)

pytestmark = pytest.mark.slow


def freeze(python: Path) -> dict:
    out = subprocess.run([str(python), "-m", "pip", "freeze", "--all", "--disable-pip-version-check"],
                         capture_output=True, text=True, check=True).stdout
    return dict(line.split("==", 1) for line in out.splitlines() if "==" in line)


def run_install(python: Path, requirements: Path, env_extra: dict) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(env_extra)
    return subprocess.run([str(python), str(ROOT / "install.py"), str(requirements)], capture_output=True,
                          text=True, env=env, cwd=str(ROOT), timeout=300)


@pytest.fixture(scope="module")
def webui_venv(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("webui_venv")
    venv.EnvBuilder(with_pip=True).create(root / "venv")
    python = root / "venv" / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *PINS], check=True,
                   timeout=300)
    return python


def test_adds_only_what_is_missing_through_launch_run_pip(webui_venv, tmp_path):
    requirements = tmp_path / "requirements.txt"
    # pillow and pyyaml are installed in versions outside these ranges: reported, never changed.
    requirements.write_text("pillow>=10\nsafetensors>=0.4.2\npyyaml>=6.0.2\ntqdm\n# a comment\ntoml\n",
                            encoding="utf-8")
    before = freeze(webui_venv)
    log = tmp_path / "launch.log"
    result = run_install(webui_venv, requirements, {"PYTHONPATH": str(LAUNCH_STUB), "FAKE_LAUNCH_LOG": str(log)})
    assert result.returncode == 0, result.stdout + result.stderr
    after = freeze(webui_venv)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing upgraded, downgraded or removed
    assert {k.lower() for k in after} - {k.lower() for k in before} == {"tqdm", "toml"}
    assert "tqdm" in log.read_text(encoding="utf-8")  # went through launch.run_pip, as inside the WebUI
    assert "pillow 9.5.0 is installed, pillow>=10 is wanted; left as it is" in result.stdout
    assert "installed toml, tqdm; no installed package was changed" in result.stdout


def test_without_the_webui_it_runs_pip_itself_and_a_second_run_does_nothing(webui_venv, tmp_path):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("safetensors>=0.4.2\neinops\n", encoding="utf-8")
    before = freeze(webui_venv)
    result = run_install(webui_venv, requirements, {})
    assert result.returncode == 0, result.stdout + result.stderr
    after = freeze(webui_venv)
    assert {k: v for k, v in after.items() if k in before} == before
    assert {k.lower() for k in after} - {k.lower() for k in before} == {"einops"}
    again = run_install(webui_venv, requirements, {})
    assert again.returncode == 0 and "nothing to do" in again.stdout
    assert freeze(webui_venv) == after


def test_default_list_is_the_engine_requirements():
    """install.py's own list names the same packages as requirements/engine.txt (numpy comes with torch)."""
    sys.path.insert(0, str(ROOT))
    try:
        import install
    finally:
        sys.path.remove(str(ROOT))
    names = {install.canonical(install._NAME.match(r).group(1)) for r in install.REQUIREMENTS}
    engine = {install.canonical(install._NAME.match(r).group(1))
              for r in install.read_requirements(ROOT / "requirements" / "engine.txt")}
    assert names == engine - {"numpy"}
