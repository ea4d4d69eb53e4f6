"""Bad input through ``python -m lora_trainer train``: one ``error: `` line, exit status 2, nothing damaged.

Every case runs the real command line: most call ``cli.main`` in this process (a subprocess spends seconds
importing torch), and the ones marked ``subprocess`` start ``python -m lora_trainer`` to prove that no
traceback reaches a terminal. Each case checks:

* exit status 2 (130 for Ctrl-C), and no "Traceback" anywhere in the output;
* the last line of stderr is ONE line starting with ``error: ``, naming the key or file and saying what to do;
* every file under the case's folder, the model and the dataset has the same bytes afterwards, no file was
  added (a run that fails before its first step removes its run folder), and nothing ``.tmp-*`` is left.

Errors in the data fail before any model loads. Cases that need a model but are not about the model
use the session's tiny backbone instead of loading it from disk, to keep the file fast.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib.util
import io
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from lora_trainer import cli, files, runner
from lora_trainer.checkpoints import list_checkpoints, save_checkpoint
from lora_trainer.demo import make_demo_dataset
from lora_trainer.errors import StorageError
from lora_trainer.lora_file import save_lora_file
from lora_trainer.network import LoraNetwork
from lora_trainer.run_folder import RunFolder

ROOT = Path(__file__).resolve().parents[1]

TINY = {  # a run of the tiny model that takes a second or two on a CPU
    "output_name": "t", "resolution": 64, "min_bucket_reso": 32, "max_bucket_reso": 128, "bucket_reso_steps": 32,
    "lora_rank": 4, "learning_rate": 1e-3, "batch_size": 2, "max_train_steps": 1, "sample_steps": 1, "seed": 3,
    "device": "cpu",
}


class NotATensor:
    """Pickled into a .ckpt: loading it would run code, so weights_only refuses it."""


# ---- fixtures ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """Four captioned images, and two for the cases that train (a step of the tiny model costs more per image)."""
    root = tmp_path_factory.mktemp("bad_inputs_data")
    return make_demo_dataset(root / "shapes", count=4), make_demo_dataset(root / "pair", count=2)


@pytest.fixture(scope="module")
def fakes(tmp_path_factory, tiny_sd1):
    """Files that are not an SD1 model, made once: each a way a user's base_model or init_lora goes wrong."""
    folder = tmp_path_factory.mktemp("bad_inputs_models")
    (folder / "zero.safetensors").write_bytes(b"")
    save_file({f"model.diffusion_model.w{i}": torch.randn(64, 64) for i in range(4)}, str(folder / "full.tmp"))
    data = (folder / "full.tmp").read_bytes()
    (folder / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (folder / "full.tmp").unlink()
    unet_in = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3)}
    save_file({"conditioner.embedders.1.model.ln_final.weight": torch.zeros(8), **unet_in},
              str(folder / "sdxl_like.safetensors"))
    save_file({"cond_stage_model.model.ln_final.weight": torch.zeros(8), **unet_in},
              str(folder / "sd2_like.safetensors"))
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(2)}, "callback": NotATensor()},
               str(folder / "pickled.ckpt"))
    rank2 = LoraNetwork(tiny_sd1.lora_targets(), rank=2, seed=1)
    save_lora_file(folder / "rank2.safetensors", rank2.kohya_state_dict(), {"ss_network_dim": "2"})
    return folder


@dataclass
class Result:
    rc: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def last_line(self) -> str:
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        return lines[-1] if lines else ""


def hash_files(*roots: Path) -> Dict[str, str]:
    out = {}
    for root in roots:
        for path in ([root] if root.is_file() else sorted(root.rglob("*"))):
            if path.is_file():
                out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@dataclass
class Workspace:
    """One case: its own folder (the working directory), the shared model and dataset, and a spy on loading."""
    tmp: Path
    model: Path
    data: Path
    pair: Path
    fakes: Path
    loads: List[str] = field(default_factory=list)
    preloaded: Optional[object] = None

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    def config(self, name: str = "c.yaml", text: Optional[str] = None, **changes) -> str:
        values = {"base_model": str(self.model), "train_data_dir": str(self.data), "output_dir": str(self.out),
                  **TINY, **changes}
        path = self.tmp / name
        path.write_text(yaml.safe_dump(values) if text is None else text, encoding="utf-8")
        return str(path)

    def copy_data(self, name: str, captions: bool = True) -> Path:
        folder = self.tmp / name
        shutil.copytree(self.data, folder)
        if not captions:
            (folder / "metadata.csv").unlink()
        return folder

    def load(self, config):
        """Stands in for runner.load_standalone_backbone: records the call, then loads (or hands over)."""
        self.loads.append(config.base_model)
        if self.preloaded is not None:
            return self.preloaded
        return _REAL_LOADER(config)

    def cli(self, *args: str, in_subprocess: bool = False) -> Result:
        argv = ["train", *args]
        started = time.perf_counter()
        if in_subprocess:
            env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
            proc = subprocess.run([sys.executable, "-m", "lora_trainer", *argv], cwd=self.tmp, env=env,
                                  capture_output=True, text=True, timeout=300)
            return Result(proc.returncode, proc.stdout, proc.stderr, time.perf_counter() - started)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = cli.main(argv)
            except SystemExit as exc:  # argparse
                rc = exc.code
        return Result(rc, out.getvalue(), err.getvalue(), time.perf_counter() - started)

    def snapshot(self) -> Dict[str, str]:
        return hash_files(self.tmp, self.model, self.data, self.pair, self.fakes)

    def fails(self, args: List[str], *expected: str, rc: int = 2, in_subprocess: bool = False,
              may_change: tuple = (), prefix: str = "error: ") -> Result:
        """Run the CLI; assert it fails cleanly, with ``expected`` in its one error line, and changes nothing."""
        before = self.snapshot()
        result = self.cli(*args, in_subprocess=in_subprocess)
        after = self.snapshot()
        everything = result.stdout + result.stderr
        assert result.rc == rc, everything
        assert "Traceback" not in everything, everything
        line = result.last_line
        assert line.startswith(prefix), everything
        for text in expected:  # a tuple: any one of its texts (wordings that differ between model families)
            assert any(t in line for t in ((text,) if isinstance(text, str) else text)), f"{text!r} not in {line!r}"
        if in_subprocess:  # what the terminal shows: the message once, not also as a log line above it
            assert result.stderr.count(line[len(prefix):]) == 1, result.stderr
        changed = {p for p in before.keys() | after.keys() if before.get(p) != after.get(p)}
        allowed = {p for p in changed if any(p.startswith(str(self.tmp / a)) for a in may_change)}
        assert changed == allowed, f"files added, changed or removed: {sorted(changed - allowed)}"
        assert not list(self.tmp.rglob(".tmp-*")), "temporary files left behind"
        return result


_REAL_LOADER = runner.load_standalone_backbone


@pytest.fixture
def ws(tmp_path, monkeypatch, tiny_sd1_files, datasets, fakes):
    monkeypatch.chdir(tmp_path)
    space = Workspace(tmp_path, tiny_sd1_files["folder"], *datasets, fakes)
    monkeypatch.setattr(runner, "load_standalone_backbone", space.load)
    return space


@pytest.fixture
def ready(ws, tiny_sd1):
    """A workspace whose "loaded" model is the session's tiny backbone (for cases not about the model)."""
    ws.preloaded = tiny_sd1
    ws.data = ws.pair
    return ws


def trained_files(folder: Path) -> List[Path]:
    return [p for p in folder.rglob("*.safetensors") if "checkpoints" not in p.parts]


# ---- the config: fails before anything is read or created -------------------------------------------------------
CONFIG_CASES = {
    "wrong-type": ({"lora_rank": "abc"}, ["'lora_rank'", "must be a whole number", "'abc'"]),
    "out-of-range": ({"learning_rate": 50}, ["'learning_rate'", "between 0 and 10", "50"]),
    "invalid-choice": ({"optimizer": "adamx"}, ["'optimizer'", "one of adamw", "did you mean 'adamw'"]),
    "text-given-a-list": ({"trigger_word": ["a", "b"]}, ["'trigger_word'", "must be text"]),
    "output-name-with-slash": ({"output_name": "brand/v1"}, ["'output_name'", "'brand/v1'", "without '/'"]),
    "output-name-dotdot": ({"output_name": ".."}, ["'output_name'", "'..'", "plain file name"]),
    "output-name-escapes": ({"output_name": "../../etc"}, ["'output_name'", "'../../etc'", "plain file name"]),
    "min-bucket-above-max": ({"min_bucket_reso": 256, "max_bucket_reso": 128}, ["min_bucket_reso (256)",
                                                                                 "max_bucket_reso (128)"]),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_config_value(ws, case):
    changes, expected = CONFIG_CASES[case]
    path = ws.config(**changes)
    ws.fails(["--config", path], path, *expected)
    assert not ws.out.exists() and not ws.loads


def test_unknown_key_suggests_the_right_one(ws):
    path = ws.config(text=yaml.safe_dump({"base_model": str(ws.model), "train_data_dir": str(ws.data),
                                          "lerning_rate": 1e-4}))
    ws.fails(["--config", path], path, "unknown option 'lerning_rate'", "did you mean 'learning_rate'?",
             in_subprocess=True)


def test_key_in_the_wrong_section(ws):
    path = ws.config(text=f"model:\n  base_model: {ws.model}\n  learning_rate: 0.001\n")
    ws.fails(["--config", path], "'learning_rate' belongs in section 'optim', not 'model'")


def test_unknown_flag_and_wrong_flag_value(ws):
    path = ws.config()
    ws.fails(["--config", path, "--lora_rnak", "8"], "unknown option --lora_rnak", "did you mean --lora_rank?")
    ws.fails(["--config", path, "--max-train-steps", "ten"], "command line: 'max_train_steps'", "'ten'")


def test_yaml_syntax_error_names_the_line(ws):
    path = ws.config(text=f"base_model: {ws.model}\nlearning_rate: 1e-4\n  lora_rank: 8\nseed: 1\n")
    result = ws.fails(["--config", path], path, "line 3", "not valid YAML", in_subprocess=True)
    assert result.seconds < 30


def test_config_file_missing(ws):
    ws.fails(["--config", "brand_lora.yaml"], "brand_lora.yaml", "does not exist", "check the path")


def test_required_key_missing(ws):
    path = ws.config(text=f"train_data_dir: {ws.data}\n")
    ws.fails(["--config", path], "'base_model' is required", "--base_model")


# ---- the base model ---------------------------------------------------------------------------------------------
MODEL_CASES = {
    "missing": ("nowhere/model.safetensors", ["no such file or folder", "check the path"]),
    "zero-bytes": ("zero.safetensors", ["empty (0 bytes)", "get the file again"]),
    "truncated": ("truncated.safetensors", ["truncated", "get the file again"]),
    "a-lora-file": ("rank2.safetensors", ["a LoRA file, not a base model", "LoRA files go in models/Lora"]),
    # Only the identifying keys of the family: unsupported, or an incomplete checkpoint of it; either way refused.
    "sd2-like": ("sd2_like.safetensors", [("SD2", "Stable Diffusion 2"), "choose"]),
    "pickle-with-code": ("pickled.ckpt", ["Python objects besides tensors", ".safetensors"]),
    "not-a-diffusers-folder": (".", ["model_index.json", "give a .safetensors/.ckpt checkpoint"]),
}


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_bad_base_model(ws, case):
    name, expected = MODEL_CASES[case]
    model = str(ws.tmp / name) if case in ("missing", "not-a-diffusers-folder") else str(ws.fakes / name)
    ws.fails(["--config", ws.config(base_model=model)], model, *expected)
    assert ws.loads == [model], "the model is checked after the data"
    assert not trained_files(ws.tmp) and not (ws.out / "t").exists(), "a run that never started left its folder"


def test_sdxl_model_through_the_terminal(ws):
    model = str(ws.fakes / "sdxl_like.safetensors")
    result = ws.fails(["--config", ws.config(base_model=model)], model, "SDXL", "— choose", in_subprocess=True)
    assert sum(line.startswith("error: ") for line in result.stderr.splitlines()) == 1
    assert "removed" in result.stderr and not (ws.out / "t").exists(), "the failed run's folder is removed"


# ---- the dataset: fails in the scan, before a run folder or a model --------------------------------------------
def _unreadable_only(ws: Workspace) -> Path:
    folder = ws.tmp / "unreadable"
    folder.mkdir()
    (folder / "photo.png").write_text("this is text, renamed to .png")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "photo.txt").write_text("a caption")
    return folder


def _bad_jsonl(ws: Workspace) -> Path:
    folder = ws.copy_data("jsonl", captions=False)
    (folder / "metadata.jsonl").write_text('{"file_name": "shape_00.png", "text": "a red circle"}\n'
                                           '{"file_name": "shape_01.png", "text": "a square"\n')
    return folder


def _bad_csv(ws: Workspace) -> Path:
    folder = ws.copy_data("csv", captions=False)
    (folder / "metadata.csv").write_text("image_path,description\nshape_00.png,a red circle\n")
    return folder


def _empty(ws: Workspace) -> Path:
    (ws.tmp / "empty").mkdir()
    (ws.tmp / "empty" / "notes.txt").write_text("no images here")
    return ws.tmp / "empty"


DATA_CASES = {
    "missing": (lambda ws: ws.tmp / "no_such_folder", ["does not exist", "check train_data_dir"]),
    "a-file": (lambda ws: Path(ws.config("data.yaml")), ["is a file", "train_data_dir must be a folder"]),
    "empty": (_empty, ["no images found in", ".png, .jpg"]),
    "no-captions": (lambda ws: ws.copy_data("nocaps", captions=False),
                    ["no captions found", "metadata.csv", "python -m lora_trainer caption"]),
    "jsonl-bad-line": (_bad_jsonl, ["metadata.jsonl line 2", "not valid JSON"]),
    "csv-wrong-columns": (_bad_csv, ["metadata.csv", "filename,prompt", "found: image_path,description"]),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_bad_dataset(ws, case):
    make, expected = DATA_CASES[case]
    folder = make(ws)
    ws.fails(["--config", ws.config(train_data_dir=str(folder))], folder.name, *expected)
    assert not ws.loads, "a dataset error must not load the model"
    assert not ws.out.exists(), "a dataset error must not create a run folder"


def test_only_unreadable_images_through_the_terminal(ws):
    folder = _unreadable_only(ws)
    result = ws.fails(["--config", ws.config(train_data_dir=str(folder))], str(folder), "no readable images",
                      "photo.png", "empty.jpg", in_subprocess=True)
    assert "run folder:" not in result.stderr and not ws.out.exists(), "the scan must fail before the run starts"
    assert result.seconds < 60


def test_empty_dataset_through_the_terminal(ws):
    folder = _empty(ws)
    result = ws.fails(["--config", ws.config(train_data_dir=str(folder))], str(folder), "no images found",
                      in_subprocess=True)
    assert "run folder:" not in result.stderr and not ws.out.exists()


def test_missing_metadata_path(ws):
    path = ws.tmp / "captions.csv"
    ws.fails(["--config", ws.config(metadata_path=str(path))], str(path), "does not exist", "metadata_path")
    assert not ws.loads


@pytest.mark.slow  # trains the tiny model for a step or two
def test_mixed_folder_trains_and_names_the_bad_files(ready, caplog):
    folder = ready.copy_data("mixed")
    (folder / "broken.png").write_text("not an image at all")
    (folder / "empty.jpg").write_bytes(b"")
    before = hash_files(folder)
    result = ready.cli("--config", ready.config(train_data_dir=str(folder)))
    assert result.rc == 0, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert hash_files(folder) == before, "the dataset folder was written to"
    assert (ready.out / "t" / "t.safetensors").is_file()
    log = (ready.out / "t" / "train.log").read_text()
    warnings = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    for name in ("broken.png", "empty.jpg"):
        assert name in log, f"train.log does not name {name}"
        assert any(name in w for w in warnings)


@pytest.mark.slow  # trains the tiny model for a step
def test_image_damaged_past_its_header_is_skipped_by_name(ready, caplog):
    """A partly downloaded PNG among good ones: its header reads fine, its pixels are missing. It is listed and
    skipped like any unreadable file, and the run trains on the rest."""
    folder = ready.copy_data("cut")
    noise = Image.frombytes("RGB", (64, 64), os.urandom(64 * 64 * 3))
    noise.save(folder / "cut.png")
    data = (folder / "cut.png").read_bytes()
    (folder / "cut.png").write_bytes(data[: len(data) * 2 // 3])  # header fine, pixels missing
    result = ready.cli("--config", ready.config(train_data_dir=str(folder)))
    assert result.rc == 0, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert (ready.out / "t" / "t.safetensors").is_file()
    log = (ready.out / "t" / "train.log").read_text()
    assert "cut.png" in log and "truncated" in log, "train.log must name the skipped file and why"
    assert any("cut.png" in r.getMessage() and "unreadable" in r.getMessage() for r in caplog.records)


# ---- init_lora, resume --------------------------------------------------------------------------------------------
def test_init_lora_missing(ws):
    path = ws.tmp / "brand_v1.safetensors"
    ws.fails(["--config", ws.config(init_lora=str(path))], "init_lora", str(path), "no such file",
             "check the path")
    assert not ws.loads, "a missing init_lora is found before the model loads"


def test_init_lora_with_another_rank_says_which_rank_to_set(ready):
    path = str(ready.fakes / "rank2.safetensors")
    ready.fails(["--config", ready.config(init_lora=path, lora_rank=4)], path, "rank 2", "lora_rank 4",
                "set lora_rank: 2")
    assert not (ready.out / "t").exists()


def test_resume_a_folder_that_is_not_a_run(ws):
    (ws.tmp / "photos").mkdir()
    (ws.tmp / "photos" / "a.txt").write_text("x")
    ws.fails(["--resume", "photos"], "photos", "not a run folder", "give the folder a run was written to",
             in_subprocess=True)
    ws.fails(["--resume", "out/brand"], "out/brand", "no such run folder")


def test_resume_a_run_without_checkpoint(ready):
    from lora_trainer.config import load_config_file

    run = RunFolder.create(load_config_file(ready.config()))
    ready.fails(["--resume", str(run.path)], str(run.path), "no checkpoint to resume from", "save_steps",
                may_change=(f"out/{run.name}/train.log",))
    assert sorted(p.name for p in run.path.iterdir()) == ["config.yaml", "train.log"], "the run was not kept"


# ---- the machine: optimizer, device, disk, NaN, Ctrl-C -------------------------------------------------------------
@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed")
def test_adamw8bit_without_bitsandbytes(ready):
    ready.fails(["--config", ready.config(optimizer="adamw8bit")], "adamw8bit", "bitsandbytes",
                "optimizer: adamw")
    assert not (ready.out / "t").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu(ws):
    ws.fails(["--config", ws.config(), "--device", "cuda"], "'device'", "cuda", "no CUDA GPU", "device: cpu")
    assert not (ws.out / "t").exists()


def test_output_dir_below_a_file(ws):
    (ws.tmp / "notes").write_text("a file where a folder should be")
    target = ws.tmp / "notes" / "runs"
    ws.fails(["--config", ws.config(output_dir=str(target))], str(target), "is a file, not a folder",
             "choose another output_dir")


def test_full_disk_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "brand.safetensors"
    target.write_bytes(b"the previous LoRA")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    def half_then_full(tmp: Path) -> None:
        tmp.write_bytes(b"the ne")
        full()

    with monkeypatch.context() as m:
        m.setattr(files.os, "replace", full)
        with pytest.raises(StorageError) as info:
            files.write_bytes_atomic(target, b"the new LoRA")
    with pytest.raises(StorageError) as info2:
        files.write_atomic(target, half_then_full)
    for message in (str(info.value), str(info2.value)):
        assert "disk is full" in message and str(target) in message and "\n" not in message
    assert target.read_bytes() == b"the previous LoRA"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["brand.safetensors"], "a temporary file was left"

    # A checkpoint written again on a full disk: the complete one stays, no half folder appears.
    run = tmp_path / "run"
    save_checkpoint(run, 5, {"step": 5}, lambda folder: (folder / "lora.safetensors").write_bytes(b"ok"))
    with pytest.raises(StorageError, match="disk is full"):
        save_checkpoint(run, 5, {"step": 5}, lambda folder: full())
    [(step, folder)] = list_checkpoints(run)
    assert step == 5 and (folder / "lora.safetensors").read_bytes() == b"ok"
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["checkpoint-000005"]

    # The disk fills while torch writes the training state (the real Forge suite, with CI filling the disk): torch
    # reports "unexpected pos"; the run says the disk is full, and nothing is left half-written.
    real_open = open

    class FillingFile:
        def __init__(self, path, mode):
            self.fh, self.written = real_open(path, mode), 0

        def write(self, data):
            self.written += len(data)
            if self.written > 1000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.fh.write(data)

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    monkeypatch.setattr("lora_trainer.checkpoints.open", FillingFile, raising=False)
    with pytest.raises(StorageError, match="disk is full"):
        save_checkpoint(run, 6, {"step": 6, "x": torch.zeros(10_000)}, lambda folder: None)
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["checkpoint-000005"]


@pytest.mark.slow  # trains the tiny model for a step or two
def test_full_disk_at_the_final_save(ready, monkeypatch):
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(dst).name == "t.safetensors":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(files.os, "replace", replace)
    ready.fails(["--config", ready.config()], "t.safetensors", "the disk is full", "free some space",
                may_change=("out/t/",))
    assert not (ready.out / "t" / "t.safetensors").exists()
    assert list_checkpoints(ready.out / "t"), "the checkpoint written before the failure is kept"


@pytest.mark.slow  # trains the tiny model for a step or two
def test_nan_loss_names_the_step_and_the_last_good_checkpoint(ready):
    backbone = ready.preloaded
    original, calls = backbone.predict, {"n": 0}

    def diverging(noisy, t, cond):
        out = original(noisy, t, cond)
        if torch.is_grad_enabled():  # training steps only
            calls["n"] += 1
            if calls["n"] > 1:
                return out * float("nan")
        return out

    backbone.predict = diverging
    try:
        ready.fails(["--config", ready.config(max_train_steps=4, save_steps=1)],
                    "the loss became nan at step 2", "checkpoint-000001", "Lower learning_rate",
                    may_change=("out/t/",))
    finally:
        del backbone.predict
    assert not trained_files(ready.out), "a failed run must not leave a final LoRA"
    assert [step for step, _ in list_checkpoints(ready.out / "t")] == [1]


def test_ctrl_c_before_the_first_step_leaves_nothing(ws, monkeypatch):
    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "load_standalone_backbone", interrupted)
    ws.fails(["--config", ws.config()], "stopped by the user", rc=130, prefix="stopped by the user")
    assert not (ws.out / "t").exists()
