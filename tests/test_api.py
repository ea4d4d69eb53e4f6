"""The HTTP API over FastAPI's test client: standalone (tiny model from disk) and on the A1111 stand-in."""

import base64
import io
import time
import types

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from lora_trainer.api import PREFIX, PathRules, build_router, parse_credentials
from lora_trainer.demo import make_demo_dataset
from lora_trainer.host import StandaloneHost
from lora_trainer.webui_host import WebUIHost

pytestmark = pytest.mark.slow

TRAIN = {"resolution": 64, "min_bucket_reso": 32, "max_bucket_reso": 128, "bucket_reso_steps": 32,
         "lora_rank": 4, "learning_rate": 2e-3, "batch_size": 2, "max_train_steps": 4, "sample_steps": 2,
         "device": "cpu"}


def wait_for(client, job_id, states=("finished", "stopped", "failed"), timeout=300, auth=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        body = client.get(f"{PREFIX}/jobs/{job_id}", auth=auth).json()
        if body["state"] in states:
            return body
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not reach {states}: {body}")


@pytest.fixture
def standalone(tiny_sd1_files, tmp_path):
    data = make_demo_dataset(tmp_path / "allowed" / "shapes", count=6)
    rules = PathRules([tmp_path / "allowed"], tmp_path / "allowed" / "runs", tmp_path / "allowed" / "uploads")
    app = FastAPI()
    app.include_router(build_router(StandaloneHost(), rules, defaults={"base_model": str(tiny_sd1_files["folder"])},
                                    credentials=parse_credentials("alice:s3cret")))
    return TestClient(app), data, tmp_path


def test_train_poll_download_stop_extend(standalone):
    client, data, tmp_path = standalone
    auth = ("alice", "s3cret")
    assert client.get(f"{PREFIX}/runs").status_code == 401
    assert client.get(f"{PREFIX}/runs", auth=("alice", "wrong")).status_code == 401

    started = client.post(f"{PREFIX}/jobs", json={**TRAIN, "train_data_dir": str(data), "output_name": "api"},
                          auth=auth)
    assert started.status_code == 201, started.text
    job_id = started.json()["id"]
    busy = client.post(f"{PREFIX}/jobs", json={**TRAIN, "train_data_dir": str(data)}, auth=auth)
    assert busy.status_code == 409 and "already in progress" in busy.json()["error"]
    done = wait_for(client, job_id, auth=auth)
    assert done["state"] == "finished", done["error"]
    assert done["step"] == done["total_steps"] == 4 and len(done["losses"]) == 4
    assert done["snippet"] == "<lora:api:0.7>" and done["samples"]
    file = client.get(f"{PREFIX}/jobs/{job_id}/file", auth=auth)
    assert file.status_code == 200 and file.content == (tmp_path / "allowed/runs/api/api.safetensors").read_bytes()

    extended = client.post(f"{PREFIX}/jobs/{job_id}/extend", json={"steps": 3}, auth=auth)
    assert extended.status_code == 201, extended.text
    again = wait_for(client, extended.json()["id"], auth=auth)
    assert again["state"] == "finished" and again["step"] == 7

    long_run = client.post(f"{PREFIX}/jobs", json={**TRAIN, "train_data_dir": str(data), "max_train_steps": 500},
                           auth=auth).json()
    wait_for(client, long_run["id"], states=("running",), auth=auth)
    while client.get(f"{PREFIX}/jobs/{long_run['id']}", auth=auth).json()["step"] < 1:
        time.sleep(0.1)
    stopped = client.post(f"{PREFIX}/jobs/{long_run['id']}/stop", json={"save": True}, auth=auth)
    assert stopped.json()["state"] in ("stopping", "stopped")
    final = wait_for(client, long_run["id"], auth=auth)
    assert final["state"] == "stopped" and final["lora_path"] and final["step"] < 500

    runs = client.get(f"{PREFIX}/runs", auth=auth).json()["runs"]
    assert {r["name"] for r in runs} >= {"api"} and "lora_rank: 4" in runs[0]["config"]


def test_images_in_the_request_body(standalone):
    client, _, tmp_path = standalone
    images = []
    for i, colour in enumerate(("red", "blue", "green")):
        buffer = io.BytesIO()
        Image.new("RGB", (64, 64), colour).save(buffer, format="PNG")
        images.append({"name": f"img{i}.png", "data": base64.b64encode(buffer.getvalue()).decode(),
                       "caption": f"a {colour} square"})
    started = client.post(f"{PREFIX}/jobs", json={**TRAIN, "images": images, "output_name": "sent"},
                          auth=("alice", "s3cret"))
    assert started.status_code == 201, started.text
    done = wait_for(client, started.json()["id"], auth=("alice", "s3cret"))
    assert done["state"] == "finished", done["error"]
    uploads = list((tmp_path / "allowed" / "uploads").iterdir())
    assert len(uploads) == 1 and (uploads[0] / "metadata.csv").read_text().count("square") == 3


@pytest.mark.parametrize("body, status, field", [
    ({"lora_rnak": 4}, 422, "lora_rnak"),
    ({"lora_rank": "four"}, 422, "lora_rank"),
    ({"train_data_dir": "__missing__"}, 422, "train_data_dir"),
    ({"train_data_dir": "/etc"}, 403, "train_data_dir"),
    ({"output_name": "../escape"}, 422, "output_name"),
    ({"init_lora": "/etc/passwd"}, 403, "init_lora"),
    ({"images": [{"name": "../x.png", "data": ""}]}, 422, "images[0].name"),
    ({"images": [{"name": "x.png", "data": "not base64!"}]}, 422, "images[0].data"),
    ({"images": [{"name": "x.png", "data": "dGV4dA=="}]}, 422, "images[0].data"),
])
def test_bad_bodies_name_the_field(standalone, body, status, field):
    client, data, tmp_path = standalone
    values = {**TRAIN, "train_data_dir": str(data), **body}
    if values["train_data_dir"] == "__missing__":
        values["train_data_dir"] = str(tmp_path / "allowed" / "nope")
    if "images" in body:
        values.pop("train_data_dir")
    response = client.post(f"{PREFIX}/jobs", json=values, auth=("alice", "s3cret"))
    assert response.status_code == status, response.text
    assert field in response.json()["error"]
    assert not (tmp_path / "allowed" / "runs").exists() or not any((tmp_path / "allowed" / "runs").iterdir())


def test_routes_on_the_a1111_standin(tiny_sd1_files, tmp_path):
    pytest.importorskip("ldm")
    from standins.a1111 import Networks, QueueLock, State, load_ldm_model

    model = load_ldm_model(tiny_sd1_files["safetensors"])
    shared = types.SimpleNamespace(sd_model=model, state=State(), cmd_opts=types.SimpleNamespace(lowvram=False))
    host = WebUIHost(shared, QueueLock(), tmp_path / "webui" / "models" / "Lora", networks=Networks())
    data = make_demo_dataset(tmp_path / "webui" / "datasets" / "shapes", count=6)
    rules = PathRules([tmp_path / "webui"], tmp_path / "webui" / "outputs" / "lora", tmp_path / "webui" / "uploads")
    app = FastAPI()  # A1111: script_callbacks.on_app_started(demo, app), demo None under --nowebui
    app.include_router(build_router(host, rules, defaults={"base_model": "tiny.safetensors"}))
    client = TestClient(app)
    started = client.post(f"{PREFIX}/jobs", json={**TRAIN, "train_data_dir": str(data), "output_name": "w"})
    assert started.status_code == 201, started.text
    done = wait_for(client, started.json()["id"])
    assert done["state"] == "finished", done["error"]
    assert (tmp_path / "webui" / "models" / "Lora" / "w.safetensors").is_file()
    assert shared.state.begun == shared.state.ended == 1
    assert "/lora-trainer/v1/jobs" in client.get("/openapi.json").text


def test_a_loaded_model_that_cannot_train_is_refused_with_422(tmp_path):
    """Forge with Flux loaded (every is_* flag False, huggingface_guess's Flux as model_config) and A1111 with SD3:
    422 in one line naming the family, nothing started or written, the model untouched."""
    from standins.a1111 import QueueLock, State
    from standins.forge import engine_flags

    from lora_trainer.job import current_job

    flux = types.SimpleNamespace(forge_objects=types.SimpleNamespace(unet=None))
    engine_flags(flux, "Flux")
    sd3 = types.SimpleNamespace(is_sd3=True, model=None)
    data = make_demo_dataset(tmp_path / "webui" / "datasets" / "shapes", count=2)
    rules = PathRules([tmp_path / "webui"], tmp_path / "webui" / "outputs" / "lora", tmp_path / "webui" / "uploads")
    before = current_job()
    for model, family in ((flux, "Flux.1-dev"), (sd3, "SD3")):
        shared = types.SimpleNamespace(sd_model=model, state=State(), cmd_opts=types.SimpleNamespace(lowvram=False))
        host = WebUIHost(shared, QueueLock(), tmp_path / "webui" / "models" / "Lora",
                         model_data=types.SimpleNamespace(sd_model=model))
        app = FastAPI()
        app.include_router(build_router(host, rules, defaults={"base_model": "x.safetensors"}))
        answer = TestClient(app).post(f"{PREFIX}/jobs", json={**TRAIN, "train_data_dir": str(data)})
        assert answer.status_code == 422, answer.text
        assert answer.json()["error"] == (f"the loaded checkpoint is {family}; training supports SD1, SD2 and SDXL "
                                          "checkpoints in this version")
    assert current_job() is before and not (tmp_path / "webui" / "outputs").exists()
    assert flux.forge_objects.unet is None and shared.state.begun == 0


def test_a_host_per_job_and_defaults_read_at_each_request(tmp_path):
    """The WebUI passes a host factory (its objects change between runs) and live defaults (the checkpoint)."""
    from lora_trainer.errors import UserError
    from lora_trainer.job import get_job

    class NoModelHost(StandaloneHost):
        def load_backbone(self, config):
            raise UserError("no model in this test")

    made, current = [], {"base_model": "first.safetensors"}

    def make_host():
        made.append(NoModelHost())
        return made[-1]

    data = make_demo_dataset(tmp_path / "allowed" / "shapes", count=5)
    rules = PathRules([tmp_path / "allowed"], tmp_path / "allowed" / "runs", tmp_path / "allowed" / "uploads")
    app = FastAPI()
    app.include_router(build_router(make_host, rules, defaults=lambda: dict(current)))
    client = TestClient(app)
    for name in ("first.safetensors", "second.safetensors"):
        current["base_model"] = name
        started = client.post(f"{PREFIX}/jobs", json={**TRAIN, "train_data_dir": str(data)})
        assert started.status_code == 201, started.text
        done = wait_for(client, started.json()["id"])
        assert done["state"] == "failed" and "no model in this test" in done["error"]
        job = get_job(started.json()["id"])
        assert job.config.base_model == name and job.host is made[-1]
    assert len(made) == 2


def test_requests_that_cannot_train_are_refused_with_422_before_anything_starts(standalone):
    """An empty folder, images without captions, a resolution no bucket fits: refused in one line, no job, no run
    folder (the real WebUIs accepted all three with 201 and failed in the job)."""
    from lora_trainer.job import current_job

    client, data, tmp_path = standalone
    auth = ("alice", "s3cret")
    empty = tmp_path / "allowed" / "empty"
    empty.mkdir()
    uncaptioned = tmp_path / "allowed" / "uncaptioned"
    uncaptioned.mkdir()
    Image.new("RGB", (64, 64), "red").save(uncaptioned / "a.png")
    before = current_job()
    cases = {
        "no images found in": {**TRAIN, "train_data_dir": str(empty)},
        "no captions found in": {**TRAIN, "train_data_dir": str(uncaptioned)},
        "set min_bucket_reso to at most 64": {"resolution": 64, "max_train_steps": 2, "train_data_dir": str(data)},
    }
    for message, body in cases.items():
        answer = client.post(f"{PREFIX}/jobs", json=body, auth=auth)
        assert answer.status_code == 422 and message in answer.json()["error"], answer.text
        assert len(answer.json()["error"].splitlines()) == 1
    assert current_job() is before
    assert not (tmp_path / "allowed" / "runs").exists()
    sent = {"name": "a.png", "data": base64.b64encode((uncaptioned / "a.png").read_bytes()).decode(), "caption": ""}
    answer = client.post(f"{PREFIX}/jobs", json={**TRAIN, "images": [sent]}, auth=auth)
    assert answer.status_code == 422 and "no captions" in answer.json()["error"]
    assert not any((tmp_path / "allowed" / "uploads").glob("*/*"))  # the refused upload is not kept


def test_kohya_dataset_features_through_the_api(standalone):
    """Regularization images, a validation split and a kohya dataset config in the request body; every folder they
    name must be an allowed one (also those inside the TOML), and a bad file is 422 in one line."""
    client, data, tmp_path = standalone
    auth = ("alice", "s3cret")
    reg = make_demo_dataset(tmp_path / "allowed" / "reg" / "1_shape", count=3, seed=4).parent
    started = client.post(f"{PREFIX}/jobs", auth=auth, json={
        **TRAIN, "subsets": [{"image_dir": str(data), "num_repeats": 2}, {"image_dir": str(reg), "is_reg": True}],
        "validation_split": 0.2, "validate_every_n_steps": 2, "prior_loss_weight": 0.5, "output_name": "kohya"})
    assert started.status_code == 201, started.text
    done = wait_for(client, started.json()["id"], auth=auth)
    assert done["state"] == "finished", done["error"]
    assert [s for s, _ in done["val_losses"]] == [2, 4]

    outside = make_demo_dataset(tmp_path / "elsewhere", count=2)
    toml = tmp_path / "allowed" / "d.toml"
    toml.write_text(f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{outside.as_posix()}'\n")
    answer = client.post(f"{PREFIX}/jobs", auth=auth, json={**TRAIN, "dataset_config": str(toml)})
    assert answer.status_code == 403 and "subsets[0].image_dir" in answer.json()["error"], answer.text
    toml.write_text("[[datasets]]\n[[datasets.subsets]]\nimage_dri = 'x'\n")
    answer = client.post(f"{PREFIX}/jobs", auth=auth, json={**TRAIN, "dataset_config": str(toml)})
    assert answer.status_code == 422 and "did you mean 'image_dir'" in answer.json()["error"], answer.text
    answer = client.post(f"{PREFIX}/jobs", auth=auth, json={**TRAIN, "train_data_dir": str(data),
                                                            "reg_data_dir": str(outside)})
    assert answer.status_code == 403 and "'reg_data_dir'" in answer.json()["error"]
    assert len(answer.json()["error"].splitlines()) == 1
