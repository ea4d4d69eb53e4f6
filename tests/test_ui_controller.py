"""What the tab's buttons do, without a browser: the controller, the generated form, presets, checks, estimate."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
from PIL import Image

from lora_trainer import job as jobs
from lora_trainer.config import FIELDS, TrainConfig
from lora_trainer.demo import make_demo_dataset
from lora_trainer.errors import ConfigError, DatasetError, UserError
from lora_trainer.events import Progress
from lora_trainer.ui.context import TabContext
from lora_trainer.ui.controller import TabController
from lora_trainer.ui.dataset_checks import dataset_warnings
from lora_trainer.ui.estimate import estimate_run
from lora_trainer.ui.fields import ADVANCED_FIELDS, FORM_FIELDS, MAIN_FIELDS, field_specs, form_values
from lora_trainer.ui.presets import PRESET_DIR, list_presets, load_preset, read_partial_config


class BlockingHost:
    """A host whose backbone never finishes loading until released: a run that stays active."""

    def __init__(self):
        self.release = threading.Event()

    def model_lock(self):
        return threading.Lock()

    def load_backbone(self, config):
        self.release.wait(30)
        raise UserError("released")

    def check_model(self):
        pass

    def lora_dir(self):
        return None

    def progress_started(self, job_name, total_steps):
        pass

    def progress(self, event: Progress):
        pass

    def progress_finished(self):
        pass

    def phase(self, text):
        pass

    def sample_saved(self, paths):
        pass

    def interrupted(self):
        return False

    def published(self, paths):
        pass


@pytest.fixture
def data(tmp_path) -> Path:
    return make_demo_dataset(tmp_path / "shapes", count=6)


def controller(tmp_path, host=None, **kwargs) -> TabController:
    return TabController(TabContext(host_factory=lambda: host, output_dir=tmp_path / "runs", **kwargs))


def form(**changes) -> dict:
    """The form's values as gradio hands them over (numbers as floats, optional numbers as text)."""
    values = dict(zip(FORM_FIELDS, form_values(TrainConfig.from_dict({"base_model": "-", "train_data_dir": "-"}))))
    values.update(changes)
    return values


# -- the form is the schema ------------------------------------------------------------------------

def test_every_config_field_but_the_tab_owned_ones_is_a_form_field():
    assert set(MAIN_FIELDS) | set(ADVANCED_FIELDS) | {"task_type", "base_model", "train_data_dir", "trigger_word",
                                                     "resume", "max_seq_length", "target_modules"} == set(FIELDS)
    kinds = {s.name: s.kind for s in field_specs(FORM_FIELDS, {})}
    assert kinds["optimizer"] == "dropdown" and kinds["flip_aug"] == "checkbox" and kinds["lora_rank"] == "number"
    assert kinds["sample_prompts"] == "lines" and kinds["lora_alpha"] == "text"  # empty = "same as the rank"


def test_form_values_round_trip_to_the_same_config(tmp_path, data):
    config = TrainConfig.from_dict({"base_model": "m.safetensors", "train_data_dir": str(data), "lora_alpha": 8,
                                    "sample_prompts": ["a", "b c"], "learning_rate": 3e-4, "flip_aug": True,
                                    "output_dir": str(tmp_path / "runs")})
    values = dict(zip(FORM_FIELDS, form_values(config)))
    values = {k: float(v) if isinstance(v, int) and not isinstance(v, bool) else v for k, v in values.items()}
    rebuilt = controller(tmp_path).build_config(str(data), "m.safetensors", "", values)
    assert rebuilt == config


def test_yaml_save_and_load_use_the_cli_schema(tmp_path, data):
    c = controller(tmp_path)
    config = c.build_config(str(data), "m.safetensors", "brandx", form(lora_rank=8.0, output_name="brand"))
    values = c.read_yaml(c.config_yaml(config), "saved.yaml")
    assert TrainConfig.from_dict(values) == config
    with pytest.raises(ConfigError, match="unknown option 'lora_rnak'; did you mean 'lora_rank'"):
        c.read_yaml("lora_rnak: 4\n", "bad.yaml")


def test_presets_are_valid_partial_configs():
    assert {"character", "object", "style"} <= set(list_presets())
    for name in list_presets():
        values = load_preset(name)
        assert {"lora_rank", "lora_alpha", "learning_rate", "max_train_steps", "batch_size"} <= set(values)
        assert "base_model" not in values and "train_data_dir" not in values
    assert load_preset("character")["lora_rank"] == 32
    with pytest.raises(ConfigError, match="no preset named 'anime'"):
        load_preset("anime", PRESET_DIR)
    with pytest.raises(ConfigError, match="'lora_rank' must be between"):
        read_partial_config("lora_rank: 0\n", "x.yaml")


# -- dataset ---------------------------------------------------------------------------------------

def test_dataset_warnings_name_each_problem(tmp_path):
    folder = make_demo_dataset(tmp_path / "few", count=3)
    shutil.copyfile(folder / "shape_00.png", folder / "shape_copy.png")
    Image.new("RGB", (512, 384), "white").save(folder / "big.png")
    view = controller(tmp_path).load_dataset(str(folder))
    text = view.warnings_text
    assert "only" not in text  # 5 images
    assert "smaller than 256 px" in text and "big.png" not in text.split("smaller")[1].split("\n")[0]
    assert "shape_00.png = shape_copy.png" in text
    assert "without a caption: big.png, shape_copy.png" in text
    entries = [e for e in view.gallery]
    assert len(entries) == 5
    from lora_trainer.caption_editing import load_captions

    assert "only 3 image(s)" in dataset_warnings(load_captions(folder).images()[:3])[0]


def test_bad_folders_are_one_line_errors(tmp_path):
    c = controller(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="does not exist"):
        c.load_dataset(str(tmp_path / "missing"))
    with pytest.raises(DatasetError, match="no images found"):
        c.load_dataset(str(tmp_path / "empty"))
    with pytest.raises(DatasetError, match="give the folder"):
        c.load_dataset("  ")


def test_caption_edit_and_bulk_edits_are_saved(tmp_path, data):
    c = controller(tmp_path)
    view, message = c.save_caption(str(data), "shape_01.png", "brandx, a new caption")
    assert message.startswith("saved the caption of shape_01.png")
    assert dict(zip(view.names, (cap for _, cap in view.gallery)))["shape_01.png"] == "brandx, a new caption"
    view, message = c.bulk_edit(str(data), "prepend", "flat style")
    assert message == "prepend: 6 caption(s) changed and saved"
    view, message = c.bulk_edit(str(data), "replace", "flat style", "vector art")
    assert all(cap.startswith("vector art, ") for _, cap in view.gallery)
    view, message = c.bulk_edit(str(data), "remove", "vector art")
    assert not any("vector art" in cap for _, cap in view.gallery)
    with pytest.raises(UserError, match="unknown tag edit"):
        c.bulk_edit(str(data), "shout", "x")
    with pytest.raises(DatasetError, match="select an image"):
        c.save_caption(str(data), "", "x")


# -- starting, refusing, estimating ------------------------------------------------------------------

def test_invalid_name_missing_model_and_a_second_start(tmp_path, data):
    host = BlockingHost()
    c = controller(tmp_path, host)
    with pytest.raises(UserError, match="give the base checkpoint"):
        c.build_config(str(data), "", "", form())
    with pytest.raises(ConfigError, match="settings: 'output_name' 'a/b' must be a plain file name"):
        c.build_config(str(data), "m.safetensors", "", form(output_name="a/b"))
    with pytest.raises(UserError, match="base checkpoint .*missing.safetensors does not exist"):
        c.start(c.build_config(str(data), str(tmp_path / "missing.safetensors"), "", form()))
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"x")
    config = c.build_config(str(data), str(model), "", form(output_dir=str(tmp_path / "runs")))
    try:
        assert c.start(config).startswith("started: shapes")
        with pytest.raises(jobs.JobBusy, match="already in progress"):
            c.start(config)
        with pytest.raises(UserError, match="auto-captioning waits until training has finished"):
            c.caption(str(data), "ViT-B-32", "none", 0.2, "skip", "")
        assert c.progress().state in ("queued", "running")
    finally:
        c.stop(save=False)
        host.release.set()
        jobs.current_job().wait(30)
    assert c.progress().state == "failed" and "released" in c.progress().summary


def test_estimate_is_labelled_and_grows_with_steps_and_resolution():
    small = estimate_run("sd1", "gpu", 20, 1000, 512, 16)
    assert small.text.startswith("Estimate (a rough guess")
    assert estimate_run("sd1", "gpu", 20, 2000, 512, 16).seconds > small.seconds
    assert estimate_run("sd1", "gpu", 20, 1000, 768, 16).memory_gib > small.memory_gib
    assert estimate_run("sdxl", "gpu", 20, 1000, 1024, 16).memory_gib > small.memory_gib
    assert estimate_run("sd1", "cpu", 20, 1000, 512, 16).seconds > 10 * small.seconds


def test_past_runs_and_their_results(tmp_path):
    runs = tmp_path / "runs"
    (runs / "old").mkdir(parents=True)
    (runs / "old" / "config.yaml").write_text("base_model: m\ntrain_data_dir: d\ntrigger_word: brandx\n",
                                              encoding="utf-8")
    (runs / "not-a-run").mkdir()
    c = controller(tmp_path)
    assert c.runs() == ["old"]
    assert "trigger_word: brandx" in c.run_config_text("old")
    result = c.result(str(c.run_path("old")))
    assert result.lora_path is None and "no LoRA file yet" in result.text and result.trigger == "brandx"
    with pytest.raises(UserError):
        c.run_path("../etc")


def test_ui_command_refuses_a_malformed_login(capsys):
    pytest.importorskip("gradio")
    from lora_trainer import cli

    assert cli.main(["ui", "--auth", "admin"]) == 2
    assert "--auth must be USER:PASSWORD" in capsys.readouterr().err
    assert cli.main(["ui", "--max-file-mb", "0"]) == 2
    assert "upload limits must be numbers of MB above 0" in capsys.readouterr().err


# -- named datasets and downloads --------------------------------------------------------------------

def upload(tmp_path, name, data) -> tuple:
    """A file as the browser sends it: (its name, the temporary file gradio wrote)."""
    import tempfile

    path = Path(tempfile.mkdtemp(dir=tmp_path)) / "file"
    path.write_bytes(data)
    return name, path


def png(colour="red") -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_named_datasets_create_upload_rename_delete(tmp_path):
    c = controller(tmp_path, datasets_dir=tmp_path / "datasets")
    m = c.datasets
    assert m.choices() == []
    with pytest.raises(UserError, match="choose a dataset"):
        m.upload(None, [upload(tmp_path, "a.png", png())])
    view = m.create("brand")
    assert view.selected == "brand — empty" and view.folder == str(tmp_path / "datasets" / "brand")
    with pytest.raises(DatasetError, match="already exists"):
        m.create("brand")
    with pytest.raises(DatasetError):
        m.create("../outside")
    view = m.upload(view.selected, [upload(tmp_path, "a.png", png()), upload(tmp_path, "a.txt", b"a red square"),
                                    upload(tmp_path, "b.png", png("blue")),
                                    upload(tmp_path, "../escape.png", png()),  # no browser sends this: the API could
                                    upload(tmp_path, "notes.pdf", b"%PDF")])
    assert view.selected == "brand — 2 images, 1 captioned (50%)"
    assert view.message == "brand: added 3 file(s), refused 2: ../escape.png: file names must not contain '/', " \
                           "'\\' or '..'; notes.pdf: only images, .txt captions and metadata.csv/.jsonl are kept"
    assert view.report.splitlines() == ["added 3 file(s): a.png, a.txt, b.png",
                                        "refused ../escape.png: file names must not contain '/', '\\' or '..'",
                                        "refused notes.pdf: only images, .txt captions and metadata.csv/.jsonl are "
                                        "kept"]
    assert sorted(p.name for p in (tmp_path / "datasets").rglob("*")) == ["a.png", "a.txt", "b.png", "brand"]
    assert not list(tmp_path.glob("escape*"))
    assert c.load_dataset(view.folder).names == ["a.png", "b.png"]

    picked = m.select(view.selected)
    assert picked.folder == view.folder and picked.message.startswith("dataset brand:")
    other = m.create("other")
    renamed = m.rename(picked.selected, "brand v2", folder=view.folder)  # the folder box showed it: it follows
    assert renamed.folder == str(tmp_path / "datasets" / "brand v2") and renamed.selected.startswith("brand v2 — ")
    assert m.rename(other.selected, "other2", folder=renamed.folder).folder is None  # the box showed another one
    with pytest.raises(DatasetError, match="type the dataset's name"):
        m.delete(renamed.selected, "brand", folder=renamed.folder)
    gone = m.delete(renamed.selected, "brand v2", folder=renamed.folder)
    assert gone.folder == "" and gone.selected is None and gone.choices == ["other2 — empty"]
    assert sorted(p.name for p in (tmp_path / "datasets").iterdir()) == ["other2"]


def test_a_dataset_in_training_is_not_renamed_or_deleted(tmp_path):
    host = BlockingHost()
    c = controller(tmp_path, host, datasets_dir=tmp_path / "datasets")
    view = c.datasets.create("shapes")
    make_demo_dataset(Path(view.folder), count=5)
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"x")
    c.start(c.build_config(view.folder, str(model), "", form(output_dir=str(tmp_path / "runs"))))
    try:
        with pytest.raises(DatasetError, match="being trained on"):
            c.datasets.rename("shapes", "other", "")
        with pytest.raises(DatasetError, match="being trained on"):
            c.datasets.delete("shapes", "shapes", "")
    finally:
        c.stop(save=False)
        host.release.set()
        jobs.current_job().wait(30)
    assert (tmp_path / "datasets" / "shapes").is_dir()


def test_without_a_datasets_folder_the_list_is_empty_and_actions_say_why(tmp_path):
    c = controller(tmp_path)
    assert c.datasets.choices() == []
    with pytest.raises(UserError, match="no datasets folder"):
        c.datasets.create("x")


def test_downloads_of_a_run(tmp_path):
    import zipfile

    from lora_trainer.ui import downloads

    run = tmp_path / "runs" / "brand"
    (run / "samples").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    (run / "config.yaml").write_text("base_model: m\ntrain_data_dir: d\n", encoding="utf-8")
    (run / "samples" / "step1.png").write_bytes(png())
    (run / "checkpoints" / "state.pt").write_bytes(b"big")
    c = controller(tmp_path)
    with pytest.raises(UserError, match="no LoRA file"):
        c.downloads.lora_file(str(run))
    (run / "brand.safetensors").write_bytes(b"\x00weights" * 100)
    lora = c.downloads.lora_file(str(run))
    assert lora.name == "brand.safetensors" and lora.read_bytes() == (run / "brand.safetensors").read_bytes()
    import tempfile

    assert Path(tempfile.gettempdir()) in lora.parents  # gradio serves the temp folder in every version
    with zipfile.ZipFile(c.downloads.run_zip(str(run))) as zf:
        assert sorted(zf.namelist()) == ["brand/brand.safetensors", "brand/config.yaml", "brand/samples/step1.png"]
    for _ in range(downloads.KEEP + 2):
        c.downloads.lora_file(str(run))
    assert len(list(lora.parents[1].iterdir())) <= downloads.KEEP
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(run, elsewhere)
    with pytest.raises(UserError, match="not a run folder of this tab"):
        c.downloads.lora_file(str(elsewhere))
    with pytest.raises(UserError, match="not a run folder of this tab"):
        c.downloads.run_zip(str(run / ".." / ".." / "elsewhere"))
    with pytest.raises(UserError, match="no run to download"):
        c.downloads.run_zip("")


def test_the_advanced_panel_groups_every_option_once_by_the_configs_sections():
    from lora_trainer.config import FIELDS
    from lora_trainer.ui.fields import advanced_groups

    groups = dict(advanced_groups())
    names = [n for fields in groups.values() for n in fields]
    assert sorted(names) == sorted(ADVANCED_FIELDS) and len(names) == len(set(names))
    assert list(groups)[:6] == ["Model", "Data", "Regularization, more folders, validation, masks", "Network",
                                "Optimizer", "Noise and loss"]
    assert {"noise_offset", "min_snr_gamma", "loss_type", "huber_c", "min_timestep"} <= set(groups["Noise and loss"])
    assert {"reg_data_dir", "prior_loss_weight", "subsets", "dataset_config", "validation_split",
            "masked_loss"} <= set(groups["Regularization, more folders, validation, masks"])
    assert {"final_check", "sample_at_end"} <= set(groups["Sampling and the final check"])
    assert all(FIELDS[n].metadata["help"] for n in names)  # each field shows its help text


def test_kohya_dataset_options_from_the_form_estimate_and_chart(tmp_path, data):
    """The Advanced panel's kohya options reach the config as the YAML would give them (subsets as YAML text), the
    estimate counts regularization and validation images, and the chart gets the validation loss as its own series."""
    from lora_trainer.ui.tab import _loss_frame

    reg = make_demo_dataset(tmp_path / "reg" / "1_shape", count=3, seed=4).parent
    c = controller(tmp_path)
    subsets = f"- image_dir: {data}\n  num_repeats: 2\n- image_dir: {reg}\n  is_reg: true\n"
    config = c.build_config("", "m.safetensors", "", form(subsets=subsets, validation_split=0.2, loss_type="huber",
                                                          prior_loss_weight=0.5, resolution=64.0,
                                                          min_bucket_reso=32.0, max_train_steps=0.0, epochs=1.0))
    assert config.subsets == [{"image_dir": str(data), "num_repeats": 2}, {"image_dir": str(reg), "is_reg": True}]
    assert (config.validation_split, config.loss_type, config.prior_loss_weight) == (0.2, "huber", 0.5)
    estimate = c.estimate(config)
    assert "3 regularization images (10 per epoch" in estimate and "1 validation image(s) held out" in estimate
    frame = _loss_frame([(1, 0.5), (2, 0.4)], [(2, 0.45)])
    assert list(frame["series"]) == ["training", "training", "validation"]
