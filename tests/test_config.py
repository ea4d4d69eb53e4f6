"""TrainConfig: one schema for YAML, CLI flags and the UI, validated once with one-line errors."""

import pytest
import yaml

from lora_trainer.cli import build_parser, config_from_args
from lora_trainer.config import FIELDS, TrainConfig, config_to_yaml, load_config_file
from lora_trainer.errors import ConfigError

BASE = {"base_model": "model.safetensors", "train_data_dir": "data"}


def test_brief_keys_work_exactly_as_written(tmp_path):
    path = tmp_path / "brand_lora.yaml"
    path.write_text(
        "train_data_dir: ./data/brand_images\nmetadata_path: ./data/brand_images/metadata.csv\n"
        "base_model: ./models/v1-5.safetensors\nlora_rank: 16\nbatch_size: 2\nepochs: 10\n"
        "learning_rate: 1e-4\noutput_dir: ./output\nsave_steps: 200\n")
    config = load_config_file(path)
    assert (config.lora_rank, config.batch_size, config.epochs, config.save_steps) == (16, 2, 10, 200)
    assert config.learning_rate == pytest.approx(1e-4)  # PyYAML reads 1e-4 as a string; we accept it
    assert config.metadata_path.endswith("metadata.csv")


def test_shipped_example_config_loads():
    config = load_config_file("configs/brand_lora.yaml")
    assert config.lora_rank == 16 and config.save_steps == 200


def test_round_trip_through_dict_and_yaml(tmp_path):
    config = TrainConfig.from_dict({**BASE, "lora_rank": 8, "lora_alpha": 4, "sample_prompts": ["a", "b"],
                                    "device": "cpu"})
    assert TrainConfig.from_dict(config.to_dict(include_runtime=True)) == config
    path = tmp_path / "c.yaml"
    path.write_text(config_to_yaml(config))
    assert load_config_file(path) == config.replace(device="auto")


def test_runtime_fields_are_never_saved():
    config = TrainConfig.from_dict({**BASE, "device": "cpu", "resume": "x"})
    assert "device" not in config.to_dict() and "resume" not in config.to_dict()
    assert "device:" not in config_to_yaml(config)


def test_nested_sections_are_accepted():
    config = TrainConfig.from_dict({"model": {"base_model": "m"}, "data": {"train_data_dir": "d", "repeats": 3}})
    assert config.repeats == 3
    with pytest.raises(ConfigError, match="belongs in section 'data'"):
        TrainConfig.from_dict({**BASE, "optim": {"repeats": 3}})


@pytest.mark.parametrize("values, message", [
    ({"lora_rnak": 8}, "unknown option 'lora_rnak'; did you mean 'lora_rank'?"),
    ({"batch_size": "two"}, "'batch_size' must be a whole number, got 'two'"),
    ({"batch_size": 2.5}, "'batch_size' must be a whole number"),
    ({"batch_size": 0}, "'batch_size' must be between 1 and 1024, got 0"),
    ({"learning_rate": "fast"}, "'learning_rate' must be a number"),
    ({"learning_rate": float("nan")}, "'learning_rate' must be a finite number"),
    ({"caption_dropout_rate": 1.5}, "'caption_dropout_rate' must be between 0 and 1"),
    ({"optimizer": "adam"}, "did you mean 'adamw'?"),
    ({"mixed_precision": "fp8"}, "'mixed_precision' must be one of no, fp16, bf16"),
    ({"enable_bucket": "maybe"}, "'enable_bucket' must be true or false"),
    ({"output_name": "../escape"}, "'output_name' '../escape' must be a plain file name"),
    ({"output_name": "a/b"}, "must be a plain file name"),
    ({"resolution": 500}, "'resolution' must be a multiple of 8"),
    ({"min_bucket_reso": 1024, "max_bucket_reso": 512}, "min_bucket_reso (1024) is larger than max_bucket_reso"),
    ({"trigger_word": ["a", "b"]}, "'trigger_word' must be text"),
    ({"base_model": ""}, "'base_model' is required"),
])
def test_bad_values_give_one_line_naming_the_key(values, message):
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_dict({**BASE, **values}, source="x.yaml")
    text = str(info.value)
    assert message in text and text.startswith("x.yaml: ") and "\n" not in text


def test_kohya_key_names_map_with_a_warning(caplog):
    config = TrainConfig.from_dict({**BASE, "network_dim": 32, "train_batch_size": 4})
    assert (config.lora_rank, config.batch_size) == (32, 4)
    assert "'network_dim' is read as 'lora_rank'" in caplog.text


def test_same_key_twice_is_refused():
    with pytest.raises(ConfigError, match="given twice"):
        TrainConfig.from_dict({**BASE, "network_dim": 32, "lora_rank": 8})


def test_yaml_errors_name_the_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("base_model: x\nlora_rank: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+: not valid YAML"):
        load_config_file(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config_file(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected 'key: value' lines"):
        load_config_file(tmp_path / "list.yaml")


def test_every_field_is_a_documented_cli_flag():
    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    help_text = train.format_help()
    for name, f in FIELDS.items():
        assert f"--{name}" in help_text
        assert f.metadata["help"].split()[0] in help_text


def test_cli_flags_override_the_file(tmp_path):
    path = tmp_path / "brand.yaml"
    path.write_text(yaml.safe_dump({**BASE, "lora_rank": 16, "flip_aug": False}))
    ns = build_parser().parse_args(["train", "--config", str(path), "--lora-rank", "4", "--flip_aug",
                                    "--sample_prompts", "a cat", "--sample_prompts", "a dog"])
    config, resume = config_from_args(ns)
    assert (config.lora_rank, config.flip_aug, config.sample_prompts) == (4, True, ["a cat", "a dog"])
    assert config.output_name == "brand" and resume is None


def test_the_dreambooth_example_config_loads():
    config = load_config_file("configs/dreambooth_kohya.yaml")
    assert (config.reg_data_dir, config.validation_split, config.log_with) == ("./data/dog_class", 0.1, "tensorboard")
    assert config.cache_latents_to_disk and config.prior_loss_weight == 1.0
