"""Inside A1111 neither diffusers nor peft can be imported (its pins forbid them): the WebUI path must not need them.

A subprocess makes both imports fail, then trains on the A1111 stand-in model through the WebUI host and the
background job, exactly as the tab does.
"""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("ldm", reason="needs stable-diffusion-sdkit (installed with --no-deps by `make test`)")
pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import sys, types
    for name in ("diffusers", "peft"):
        sys.modules[name] = None  # `import diffusers` now raises ImportError, as in A1111's environment
    sys.path[:0] = [{root!r}, {tests!r}]
    from standins.a1111 import Networks, QueueLock, State, load_ldm_model
    from lora_trainer.config import TrainConfig
    from lora_trainer.demo import make_demo_dataset
    from lora_trainer.job import start_job
    from lora_trainer.webui_host import WebUIHost
    from pathlib import Path

    work = Path({work!r})
    model = load_ldm_model(Path({checkpoint!r}))
    shared = types.SimpleNamespace(sd_model=model, state=State(), cmd_opts=types.SimpleNamespace(lowvram=False))
    host = WebUIHost(shared, QueueLock(), work / "Lora", networks=Networks())
    config = TrainConfig.from_dict({{
        "base_model": "tiny.safetensors", "train_data_dir": str(make_demo_dataset(work / "data", count=4)),
        "output_dir": str(work / "runs"), "output_name": "noimports", "resolution": 64, "min_bucket_reso": 32,
        "max_bucket_reso": 128, "bucket_reso_steps": 32, "lora_rank": 4, "max_train_steps": 3, "sample_steps": 2}})
    job = start_job(config, host)
    job.wait(300)
    snap = job.snapshot()
    assert snap["state"] == "finished", snap["error"]
    assert "diffusers" not in sys.modules or sys.modules["diffusers"] is None
    print("trained", snap["published"])
""")


def test_webui_path_trains_without_diffusers_or_peft(tiny_sd1_files, tmp_path):
    script = SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests"), work=str(tmp_path),
                           checkpoint=str(tiny_sd1_files["safetensors"]))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "trained" in done.stdout and "noimports.safetensors" in done.stdout
