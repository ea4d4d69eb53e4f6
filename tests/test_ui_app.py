"""``python -m lora_trainer ui`` as a user starts it: the tab and the HTTP API on one server, over real HTTP.

Current gradio only; the browser flows (test_ui_browser.py) also call the API on gradio 4.40.0 and 3.41.2.
"""

from __future__ import annotations

import base64
import json
import socket
import urllib.error
import urllib.request

import pytest
from standins.ui_servers import ROOT, free_port, running_server, server_env, ui_command

from lora_trainer.api import PREFIX
from lora_trainer.demo import make_demo_dataset

pytestmark = pytest.mark.slow


def call(url: str, body: dict = None, auth: tuple = None) -> tuple:
    """(HTTP status, JSON answer) of a GET, or of a POST when there is a body."""
    request = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"})
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def test_the_standalone_app_serves_the_api_behind_its_login(tmp_path):
    data = make_demo_dataset(tmp_path / "pictures" / "shapes", count=5)
    outside = make_demo_dataset(tmp_path / "elsewhere", count=5)
    port = free_port()
    command = ui_command(port, tmp_path / "runs") + ["--auth", "alice:s3cret", "--allow", str(tmp_path / "pictures")]
    with running_server(command, server_env("current"), ROOT / "test-artifacts" / "server-api.log", port) as url:
        api = url.rstrip("/") + PREFIX
        assert call(f"{api}/runs")[0] == 401
        assert call(f"{api}/runs", auth=("alice", "wrong"))[0] == 401
        assert call(f"{api}/runs", auth=("alice", "s3cret")) == (200, {"runs": []})
        status, answer = call(f"{api}/jobs", {"train_data_dir": str(outside)}, auth=("alice", "s3cret"))
        assert status == 403 and str(tmp_path / "pictures") in answer["error"]
        assert str(tmp_path / "datasets") in answer["error"]  # the tab's datasets folder, beside the runs folder
        status, answer = call(f"{api}/jobs", {"train_data_dir": str(data)}, auth=("alice", "s3cret"))
        assert status == 422 and "base_model" in answer["error"]  # an allowed folder: only the model is missing

        # A client that gives up half-way through sending images (a cancelled upload): nothing is written, and
        # the server goes on answering.
        image = base64.b64encode((data / "shape_00.png").read_bytes()).decode()
        body = json.dumps({"output_name": "cut", "images": [{"name": f"{i}.png", "data": image, "caption": "x"}
                                                            for i in range(40)]}).encode()
        login = base64.b64encode(b"alice:s3cret").decode()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(f"POST {PREFIX}/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Basic {login}\r\n"
                         f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                         + body[: len(body) // 2])
        assert call(f"{api}/runs", auth=("alice", "s3cret")) == (200, {"runs": []})
        datasets = tmp_path / "datasets"
        assert not datasets.exists() or not any(datasets.iterdir()), list(datasets.iterdir())
