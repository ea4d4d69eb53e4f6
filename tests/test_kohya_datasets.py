"""kohya's dataset features: regularization images, several folders in one run, kohya's dataset config (TOML), and
their bad inputs. Training runs use the tiny SD1 model."""

import json
import textwrap

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from lora_trainer.backbones.single_file import load_backbone_from_path
from lora_trainer.config import TrainConfig
from lora_trainer.dataset_layout import balanced_reg_repeats, build_layout
from lora_trainer.errors import ConfigError, DatasetError
from lora_trainer.events import EventBus, Started
from lora_trainer.runner import run_training
from lora_trainer.training_data import EpochOrder, caption_for, caption_rng, prepare_data

TINY = {"resolution": 64, "min_bucket_reso": 32, "max_bucket_reso": 128, "bucket_reso_steps": 32, "lora_rank": 4,
        "learning_rate": 2e-3, "batch_size": 2, "max_train_steps": 4, "sample_steps": 2, "seed": 3, "device": "cpu",
        "output_name": "k"}


def folder_of(path, count, caption=None, seed=0, size=(64, 64)):
    """``count`` images with .txt captions (``caption`` for all, else "img N"), or without captions if ``caption``
    is False."""
    path.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    for i in range(count):
        pixels = (torch.rand(size[1], size[0], 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(path / f"img{i}.png")
        if caption is not False:
            (path / f"img{i}.txt").write_text(caption or f"img {i}")
    return path


def config_of(tmp_path, model, **values):
    return TrainConfig.from_dict({"base_model": str(model), "output_dir": str(tmp_path / "out"), **TINY, **values})


# -- kohya's rule for regularization images ----------------------------------------------------------------------------
@pytest.mark.parametrize("train, reg, expected", [
    (10, [1, 1, 1], [4, 3, 3]),  # too few: one more round each, in order, until they match
    (2, [1, 1, 1, 1], [1, 1, 0, 0]),  # too many: the later ones are not used
    (5, [2, 2], [3, 2]),
    (6, [3, 3], [3, 3]),
])
def test_regularization_images_balance_the_training_samples_as_kohya(train, reg, expected):
    assert balanced_reg_repeats(train, reg) == expected
    assert sum(expected) >= train


def test_reg_data_dir_doubles_the_epoch_and_is_counted(tmp_path):
    train = folder_of(tmp_path / "train" / "5_sks dog", 2, "sks dog")
    reg = folder_of(tmp_path / "reg" / "1_dog", 3, False, seed=1)
    config = config_of(tmp_path, "unused", train_data_dir=str(train.parent), reg_data_dir=str(reg.parent),
                       max_train_steps=0, epochs=1, batch_size=1)
    data = prepare_data(config)
    roles = [r.role for r in data.scan.records]
    assert roles.count("train") == 2 and roles.count("reg") == 3
    assert data.scan.num_samples() == 10
    assert sum(r.repeats for r in data.scan.of_role("reg")) == 10  # as many reg samples as training samples
    assert data.plan.batches_per_epoch == 20 and data.plan.total_steps == 20
    order = EpochOrder(data, 1, config.seed)
    seen = [data.scan.records[order.micro_batch(m)[0]].role for m in range(20)]
    assert seen.count("reg") == 10 and seen.count("train") == 10
    assert all(data.loss_weight(i, 0.3) == 0.3 for i in data.indices("reg"))
    assert all(data.loss_weight(i, 0.3) == 1.0 for i in data.indices("train"))


def test_regularization_run_end_to_end(tiny_sd1_files, tmp_path):
    train = folder_of(tmp_path / "train" / "2_sks", 3, "sks thing")
    reg = folder_of(tmp_path / "reg" / "1_thing", 4, "a thing", seed=2)
    results = {}
    for weight in (0.0, 1.0):
        events = EventBus()
        started = []
        events.subscribe(lambda e, started=started: started.append(e) if isinstance(e, Started) else None)
        config = config_of(tmp_path / str(weight), tiny_sd1_files["folder"], train_data_dir=str(train.parent),
                           reg_data_dir=str(reg.parent), prior_loss_weight=weight, max_train_steps=0, epochs=1)
        result = run_training(config, lambda c: load_backbone_from_path(c.base_model), events)
        assert started[0].total_steps == 6  # 6 training + 6 regularization samples, batch 2
        with safe_open(str(result.lora_path), "pt") as fh:
            meta = fh.metadata()
            results[weight] = {k: fh.get_tensor(k) for k in fh.keys()}
        assert meta["ss_num_reg_images"] == "4" and meta["ss_prior_loss_weight"] == f"{weight:g}"
        assert json.loads(meta["ss_reg_dataset_dirs"])["1_thing"]["img_count"] == 4
        assert json.loads(meta["ss_dataset_dirs"]) == {"2_sks": {"n_repeats": 2, "img_count": 3}}
        assert meta["ss_num_train_images"] == "6"
    changed = [k for k in results[0.0] if not torch.equal(results[0.0][k], results[1.0][k])]
    assert changed, "prior_loss_weight changed nothing: the regularization images' loss is not used"


def test_a_folder_of_only_regularization_images_is_refused(tmp_path):
    reg = folder_of(tmp_path / "reg", 2, "a thing")
    config = config_of(tmp_path, "unused", subsets=[{"image_dir": str(reg), "is_reg": True}])
    with pytest.raises(DatasetError, match="no training images"):
        prepare_data(config)


# -- several folders -------------------------------------------------------------------------------------------------
def test_each_subset_keeps_its_own_options(tmp_path):
    cats = folder_of(tmp_path / "cats", 2, "cat, sitting")
    dogs = folder_of(tmp_path / "dogs", 3, False, seed=1)
    config = config_of(tmp_path, "unused", trigger_word="global", subsets=[
        {"image_dir": str(cats), "num_repeats": 3, "trigger_word": "mycat", "flip_aug": True},
        {"image_dir": str(dogs), "class_tokens": "a dog", "caption_prefix": "photo", "caption_suffix": "detailed"},
    ])
    data = prepare_data(config)
    assert data.scan.num_samples() == 2 * 3 + 3
    first_cat, first_dog = data.indices("train")[0], data.indices("train")[2]
    assert data.scan.records[first_dog].caption == "a dog", "class_tokens is the caption of an uncaptioned image"
    rng = caption_rng(0, 0)
    assert caption_for(config, data.scan.records[first_cat].caption, rng, data.subset(first_cat)) == \
        "mycat, cat, sitting"
    assert caption_for(config, data.scan.records[first_dog].caption, rng, data.subset(first_dog)) == \
        "global, photo, a dog, detailed"
    assert data.flips_of(first_cat, config) == (False, True) and data.flips_of(first_dog, config) == (False,)


def test_subsets_with_unknown_or_misplaced_keys_fail_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match="unknown option 'num_repeat'; did you mean 'num_repeats'"):
        build_layout(config_of(tmp_path, "x", subsets=[{"image_dir": "a", "num_repeat": 2}]))
    with pytest.raises(ConfigError, match="'image_dir' is required"):
        build_layout(config_of(tmp_path, "x", subsets=[{"num_repeats": 2}]))
    with pytest.raises(ConfigError, match="applies to the whole run"):
        build_layout(config_of(tmp_path, "x", subsets=[{"image_dir": "a", "batch_size": 2}]))
    with pytest.raises(ConfigError, match="must be a list of mappings"):
        config_of(tmp_path, "x", subsets=["a/folder"])
    with pytest.raises(ConfigError, match="'flip_aug' must be true or false"):
        build_layout(config_of(tmp_path, "x", subsets=[{"image_dir": "a", "flip_aug": "maybe"}]))


# -- kohya's dataset config ------------------------------------------------------------------------------------------
# The example of kohya-ss/sd-scripts docs/config_README-en.md, as it is there but for the folder paths (and the
# fine-tuning subset's metadata file, which kohya's own scripts would have written).
KOHYA_EXAMPLE = """\
[general]
shuffle_caption = true
caption_extension = '.txt'
keep_tokens = 1

# This is a DreamBooth-style dataset
[[datasets]]
resolution = 512
batch_size = 4
keep_tokens = 2

  [[datasets.subsets]]
  image_dir = '{hoge}'
  class_tokens = 'hoge girl'
  # This subset uses keep_tokens = 2 (the value of the parent datasets)

  [[datasets.subsets]]
  image_dir = '{fuga}'
  class_tokens = 'fuga boy'
  keep_tokens = 3

  [[datasets.subsets]]
  is_reg = true
  image_dir = '{reg}'
  class_tokens = 'human'
  keep_tokens = 1

# This is a fine-tuning dataset
[[datasets]]
resolution = [768, 768]
batch_size = 2

  [[datasets.subsets]]
  image_dir = '{piyo}'
  metadata_file = '{piyo_md}'
  # This subset uses keep_tokens = 1 (the value of [general])
"""


# This project's defaults (the tests' TINY settings are for 64 px).
KOHYA_BUCKETS = {"resolution": 512, "min_bucket_reso": 256, "max_bucket_reso": 1024, "bucket_reso_steps": 64}


@pytest.fixture
def kohya_folders(tmp_path):
    folders = {"hoge": folder_of(tmp_path / "hoge", 2, False), "fuga": folder_of(tmp_path / "fuga", 2, "fuga, boy"),
               "reg": folder_of(tmp_path / "reg", 3, False, seed=5),
               "piyo": folder_of(tmp_path / "piyo", 2, False, seed=7)}
    metadata = {str(folders["piyo"] / "img0.png"): {"caption": "a frog", "tags": "green, smiling"},
                "img1": {"caption": "a toad"}}  # kohya keys by full path, or by name without extension
    (tmp_path / "piyo_md.json").write_text(json.dumps(metadata))
    path = tmp_path / "dataset.toml"
    path.write_text(KOHYA_EXAMPLE.format(**{k: v.as_posix() for k, v in folders.items()},
                                         piyo_md=(tmp_path / "piyo_md.json").as_posix()))
    return path


def test_kohyas_documented_dataset_config_is_read_as_kohya_reads_it(kohya_folders, tmp_path):
    config = config_of(tmp_path, "unused", dataset_config=str(kohya_folders), max_train_steps=0, epochs=1,
                       **KOHYA_BUCKETS)
    layout = build_layout(config)
    assert [(g.resolution, g.batch_size) for g in layout.groups] == [(512, 4), (768, 2)]
    hoge, fuga, reg, piyo = layout.subsets
    assert (hoge.keep_tokens, fuga.keep_tokens, reg.keep_tokens, piyo.keep_tokens) == (2, 3, 1, 1)
    assert all(s.shuffle_caption for s in layout.subsets)
    assert (reg.role, hoge.role, piyo.group) == ("reg", "train", 1)
    data = prepare_data(config)
    captions = {(r.path.parent.name, r.path.name): r.caption for r in data.scan.records}
    assert captions[("hoge", "img0.png")] == "hoge girl"  # class_tokens: no caption file
    assert captions[("fuga", "img0.png")] == "fuga, boy"
    assert captions[("piyo", "img0.png")] == "a frog, green, smiling"
    assert captions[("piyo", "img1.png")] == "a toad"
    assert {data.buckets[i] for i in data.indices("train") if data.group_of(i) == 1} == {(768, 768)}
    # Batches never mix datasets, and each dataset batches with its own size.
    order = EpochOrder(data, 1, config.seed)
    for m in range(data.plan.batches_per_epoch):
        batch = order.micro_batch(m)
        groups = {data.group_of(i) for i in batch}
        assert len(groups) == 1
        assert len(batch) <= (4 if groups == {0} else 2)
    # 4 training samples in dataset 1 balanced by 4 regularization samples, batch 4: 2 batches; dataset 2: 1 batch.
    assert data.plan.batches_per_epoch == 3


@pytest.mark.slow
def test_kohyas_documented_dataset_config_trains_unchanged(kohya_folders, tiny_sd1_files, tmp_path):
    config = config_of(tmp_path, tiny_sd1_files["folder"], dataset_config=str(kohya_folders), max_train_steps=3,
                       final_check="off", sample_at_end=False, **{**KOHYA_BUCKETS, "resolution": 256})
    result = run_training(config, lambda c: load_backbone_from_path(c.base_model))
    with safe_open(str(result.lora_path), "pt") as fh:
        meta = fh.metadata()
    datasets = json.loads(meta["ss_datasets"])
    assert [d["batch_size_per_device"] for d in datasets] == [4, 2]
    assert [s["image_dir"] for s in datasets[0]["subsets"]] == ["hoge", "fuga", "reg"]
    assert datasets[0]["subsets"][2]["is_reg"] is True
    assert meta["ss_num_reg_images"] == "3"
    assert meta["modelspec.resolution"] == "512x512", "the dataset config's resolution, not the run's default"


@pytest.mark.parametrize("text, expected", [
    ("[[datasets]]\nresolution = 512\n", "has no [[datasets.subsets]]"),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'\ncolor_aug = true\n", "'color_aug' = True is a kohya "
     "option this trainer does not implement"),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'\nnum_repeats = 'ten'\n", "'num_repeats' must be a whole"),
    ("[general]\nimage_dir = 'a'\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'\n",
     "'image_dir' belongs in a [[datasets.subsets]] table"),
    ("[[datasets]\n", "not valid TOML"),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dri = 'a'\n", "did you mean 'image_dir'"),
])
def test_a_bad_dataset_config_fails_in_one_line_naming_the_place(tmp_path, text, expected):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as raised:
        build_layout(config_of(tmp_path, "x", dataset_config=str(path)))
    assert expected in str(raised.value) and str(path) in str(raised.value)
    assert "\n" not in str(raised.value)


def test_a_missing_dataset_config_says_so(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        build_layout(config_of(tmp_path, "x", dataset_config=str(tmp_path / "none.toml")))


def test_a_dataset_config_in_json_works_too(tmp_path):
    folder = folder_of(tmp_path / "a", 2, "x")
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"datasets": [{"batch_size": 1, "subsets": [{"image_dir": str(folder),
                                                                            "num_repeats": 4}]}]}))
    data = prepare_data(config_of(tmp_path, "x", dataset_config=str(path), max_train_steps=0, epochs=1))
    assert data.plan.batches_per_epoch == 8


def test_ten_name_folders_still_set_repeats(tmp_path):
    folder_of(tmp_path / "data" / "10_brand", 2, "brand")
    data = prepare_data(config_of(tmp_path, "x", train_data_dir=str(tmp_path / "data"), max_train_steps=0, epochs=1))
    assert data.scan.num_samples() == 20


def test_yaml_subsets_in_the_tab_round_trip(tmp_path):
    from lora_trainer.ui.fields import from_form_value, to_form_value

    value = [{"image_dir": "/data/cats", "num_repeats": 3}, {"image_dir": "/data/reg", "is_reg": True}]
    text = to_form_value("subsets", value)
    assert "image_dir: /data/cats" in text
    assert from_form_value("subsets", text) == value
    with pytest.raises(ConfigError, match="not valid YAML"):
        from_form_value("subsets", "- image_dir: [unclosed")
    assert textwrap.dedent(text)


def test_the_dataset_config_reads_the_same_without_tomllib(kohya_folders, tmp_path, monkeypatch):
    """Python 3.10 (A1111) has no tomllib; the toml package (which lycoris-lora requires) reads the file there."""
    config = config_of(tmp_path, "unused", dataset_config=str(kohya_folders), **KOHYA_BUCKETS)
    expected = build_layout(config)
    monkeypatch.setitem(__import__("sys").modules, "tomllib", None)  # import tomllib now raises ImportError
    assert build_layout(config) == expected


def test_subsets_and_the_new_keys_as_command_line_flags(tmp_path):
    from lora_trainer.config import load_config_file

    path = tmp_path / "c.yaml"
    path.write_text(f"base_model: m\noutput_dir: {tmp_path}\n")
    config = load_config_file(path, {"subsets": ["{image_dir: a, num_repeats: 2}", "{image_dir: r, is_reg: true}"],
                                     "loss_type": "huber", "prior_loss_weight": "0.5", "validation_split": "0.1"})
    assert config.subsets == [{"image_dir": "a", "num_repeats": 2}, {"image_dir": "r", "is_reg": True}]
    assert (config.loss_type, config.prior_loss_weight, config.validation_split) == ("huber", 0.5, 0.1)
    with pytest.raises(ConfigError, match="is not a mapping"):
        load_config_file(path, {"subsets": ["{image_dir: [a"]})
    with pytest.raises(ConfigError, match="must be a list of mappings"):
        load_config_file(path, {"subsets": ["just/a/folder"]})
