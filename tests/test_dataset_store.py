"""Uploads into named datasets: what is kept, what is refused, and that nothing half-done remains."""

import io
import zipfile

import pytest
from PIL import Image

from lora_trainer.dataset import scan_dataset
from lora_trainer.dataset_store import DatasetStore, UploadLimits, safe_file_name, zip_run_folder
from lora_trainer.errors import DatasetError


def png_bytes(colour="red", size=(32, 32)):
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def put(tmp_path, name, data):
    path = tmp_path / "incoming" / name.replace("/", "_")
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    return (name, path)


def tree(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


@pytest.fixture
def store(tmp_path):
    return DatasetStore(tmp_path / "datasets", UploadLimits(max_file_bytes=100_000, max_total_bytes=1_000_000))


def test_images_captions_and_a_zip_make_a_trainable_dataset(store, tmp_path):
    store.create("Brand shots")
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("set/c.png", png_bytes("green"))
        zf.writestr("set/c.txt", "a green square")
        zf.writestr("__MACOSX/._c.png", b"junk")
    report = store.add_files("Brand shots", [
        put(tmp_path, "a.png", png_bytes("red")), put(tmp_path, "a.txt", b"a red square"),
        put(tmp_path, "b.png", png_bytes("blue")), put(tmp_path, "b.txt", b"a blue square"),
        put(tmp_path, "shots.zip", archive.getvalue())])
    assert sorted(report.added) == ["a.png", "a.txt", "b.png", "b.txt", "c.png", "c.txt"] and not report.refused
    [info] = store.list()
    assert (info.name, info.images, info.captioned, info.coverage) == ("Brand shots", 3, 3, 1.0)
    scan = scan_dataset(str(info.path))
    assert sorted(r.caption for r in scan.records) == ["a blue square", "a green square", "a red square"]


def test_zip_slip_refuses_the_whole_archive(store, tmp_path):
    store.create("d")
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ok.png", png_bytes())
        zf.writestr("../../escaped.png", png_bytes())
    report = store.add_files("d", [put(tmp_path, "evil.zip", archive.getvalue())])
    assert report.added == [] and "outside the dataset folder" in report.refused[0][1]
    assert tree(store.root) == ["d"]
    assert not list(tmp_path.rglob("escaped.png"))


def test_each_bad_file_is_refused_with_a_reason(store, tmp_path):
    store.create("d")
    report = store.add_files("d", [
        put(tmp_path, "fake.png", b"this is text, not a picture"),
        put(tmp_path, "huge.png", png_bytes(size=(400, 400)) + b"\0" * 200_000),
        put(tmp_path, "../up.png", png_bytes()),
        put(tmp_path, "dir/name.png", png_bytes()),
        put(tmp_path, "script.sh", b"rm -rf /"),
        put(tmp_path, "good.png", png_bytes())])
    reasons = dict(report.refused)
    assert report.added == ["good.png"]
    assert "not an image" in reasons["fake.png"]
    assert "limit per file" in reasons["huge.png"]
    assert "'..'" in reasons["../up.png"] and "'/'" in reasons["dir/name.png"]
    assert "only images" in reasons["script.sh"]
    assert "refused 5" in report.message()
    assert tree(store.root) == ["d", "d/good.png"]


def test_cancelled_or_oversized_upload_leaves_nothing(store, tmp_path):
    store.create("d")
    calls = {"n": 0}

    def cancelled():
        calls["n"] += 1
        return calls["n"] > 2

    files = [put(tmp_path, f"{i}.png", png_bytes()) for i in range(4)]
    with pytest.raises(DatasetError, match="cancelled"):
        store.add_files("d", files, cancelled=cancelled)
    assert tree(store.root) == ["d"]
    small = DatasetStore(store.root, UploadLimits(max_file_bytes=100_000, max_total_bytes=len(png_bytes()) * 2))
    with pytest.raises(DatasetError, match="larger than the limit"):
        small.add_files("d", files)
    assert tree(store.root) == ["d"]


def test_names_rename_delete_and_run_zip(store, tmp_path):
    assert safe_file_name("ümlaut photo.PNG") == "ümlaut photo.PNG"
    assert safe_file_name("a<b>.png") == "a_b_.png"
    with pytest.raises(DatasetError):
        store.create("../x")
    store.create("old")
    store.rename("old", "new")
    with pytest.raises(DatasetError, match="confirm"):
        store.delete("new", confirm="nope")
    store.delete("new", confirm="new")
    assert store.list() == []

    run = tmp_path / "run"
    (run / "samples").mkdir(parents=True)
    (run / "checkpoints" / "checkpoint-000001").mkdir(parents=True)
    (run / "run.safetensors").write_bytes(b"x")
    (run / "samples" / "s.png").write_bytes(png_bytes())
    (run / "checkpoints" / "checkpoint-000001" / "training_state.pt").write_bytes(b"state")
    with zipfile.ZipFile(zip_run_folder(run, tmp_path / "run.zip")) as zf:
        assert sorted(zf.namelist()) == ["run/run.safetensors", "run/samples/s.png"]


def test_limits_in_megabytes_from_flags_and_settings(caplog):
    from lora_trainer.errors import ConfigError

    assert UploadLimits.from_mb(0.05, 2) == UploadLimits(max_file_bytes=52428, max_total_bytes=2 * 2**20)
    with pytest.raises(ConfigError, match="above 0"):
        UploadLimits.from_mb(0, 10)  # a flag: refused
    assert UploadLimits.from_mb("lots", 10, fallback=UploadLimits()) == UploadLimits()  # a setting: the defaults
    assert "using 50 MiB and 4 GiB" in caplog.text


def test_cancel_in_the_middle_of_a_zip_adds_nothing(store, tmp_path):
    store.create("d")
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        for i in range(5):
            zf.writestr(f"{i}.png", png_bytes())
    checks = {"n": 0}

    def cancelled():  # between files, then per zip entry: cancel after the archive's second entry
        checks["n"] += 1
        return checks["n"] > 3

    with pytest.raises(DatasetError, match="cancelled; nothing was added"):
        store.add_files("d", [put(tmp_path, "a.png", png_bytes()), put(tmp_path, "set.zip", archive.getvalue())],
                        cancelled=cancelled)
    assert tree(store.root) == ["d"]


def test_the_tabs_cancel_stops_a_running_upload(tmp_path):
    """The Cancel upload button (DatasetManager.cancel_upload) while files are being staged: the upload fails with
    one line, Cancel answers once it has rolled back, and the dataset is as before."""
    import threading

    from lora_trainer.host import StandaloneHost
    from lora_trainer.ui.context import TabContext
    from lora_trainer.ui.dataset_manager import DatasetManager

    manager = DatasetManager(TabContext(StandaloneHost, tmp_path / "runs", datasets_dir=tmp_path / "datasets"))
    assert manager.cancel_upload() == "no upload is running; nothing to cancel"
    manager.create("d")
    manager.upload("d", [put(tmp_path, "kept.png", png_bytes())])
    staged_one = threading.Event()

    def slow_files():  # a long upload: the second file comes only once Cancel has been pressed
        yield put(tmp_path, "a.png", png_bytes())
        staged_one.set()
        assert manager._cancel.wait(30)
        yield put(tmp_path, "b.png", png_bytes())

    failure = {}

    def run():
        try:
            manager.upload("d", slow_files())
        except DatasetError as exc:
            failure["error"] = str(exc)

    thread = threading.Thread(target=run)
    thread.start()
    assert staged_one.wait(30)
    assert manager.cancel_upload() == "upload cancelled: nothing was added"
    thread.join(30)
    assert failure == {"error": "the upload was cancelled; nothing was added"}
    assert tree(tmp_path / "datasets") == ["d", "d/kept.png"]
    assert manager.cancel_upload() == "no upload is running; nothing to cancel"
