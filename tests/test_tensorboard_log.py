"""TensorBoard logging: values read back, a resume shows each step once, a missing package, a failing disk."""

import logging
import math
import sys

import pytest

from lora_trainer.config import TrainConfig
from lora_trainer.errors import ConfigError
from lora_trainer.tensorboard_log import TensorBoardLog, require_tensorboard

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def read_scalars(log_dir, tag):
    """(step, value) as TensorBoard shows them (its default purge_orphaned_data=True applies the purges)."""
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, round(e.value, 6)) for e in acc.Scalars(tag)]


def tb_config(**changes):
    return TrainConfig(**{"log_with": "tensorboard", **changes})


def test_scalars_read_back_in_the_run_folder(tmp_path):
    log = TensorBoardLog.open(tb_config(), tmp_path / "run", "run", start_step=0)
    for step in range(1, 6):
        log.scalars(step, {"loss/train": step / 10, "lr": 1e-4, "loss/validation": None, "loss/average": math.nan})
    log.close()
    assert log.log_dir == tmp_path / "run" / "tensorboard"
    assert read_scalars(log.log_dir, "loss/train") == [(s, s / 10) for s in range(1, 6)]
    assert read_scalars(log.log_dir, "lr") == [(s, 1e-4) for s in range(1, 6)]
    tags = EventAccumulator(str(log.log_dir)).Reload().Tags()["scalars"]
    assert sorted(tags) == ["loss/train", "lr"]  # None and NaN are left out


def test_logging_dir_gets_one_folder_per_run(tmp_path):
    log = TensorBoardLog.open(tb_config(logging_dir=str(tmp_path / "logs")), tmp_path / "run", "cat-2", 0)
    log.scalars(1, {"loss/train": 0.5})
    log.close()
    log.close()  # a second close is harmless
    assert log.log_dir == tmp_path / "logs" / "cat-2"
    assert read_scalars(log.log_dir, "loss/train") == [(1, 0.5)]


@pytest.mark.parametrize("file_counter", ["any", "9 then 10"])
def test_resume_replaces_the_steps_after_the_checkpoint(tmp_path, file_counter):
    if file_counter == "9 then 10":
        # Event file names end in a per-process counter; in the same second ...9 sorts after ...10, so TensorBoard
        # would read the resumed file first and the old one would undo its purge, unless open() waits a second.
        from tensorboard.summary.writer.event_file_writer import _global_uid
        while _global_uid.get() % 10 != 8:
            pass
    config = tb_config()
    first = TensorBoardLog.open(config, tmp_path, "run", start_step=0)
    for step in range(1, 7):  # interrupted at step 6, last checkpoint at step 3
        first.scalars(step, {"loss/train": float(step)})
    first.close()
    resumed = TensorBoardLog.open(config, tmp_path, "run", start_step=3)
    for step in range(4, 7):
        resumed.scalars(step, {"loss/train": 10.0 + step})
    resumed.close()
    assert len(list(resumed.log_dir.glob("events.out.tfevents.*"))) == 2  # the old file stays on disk
    assert read_scalars(resumed.log_dir, "loss/train") == [(1, 1), (2, 2), (3, 3), (4, 14), (5, 15), (6, 16)]


def test_log_with_none_opens_nothing(tmp_path):
    assert TensorBoardLog.open(TrainConfig(), tmp_path, "run", 0) is None
    assert not (tmp_path / "tensorboard").exists()


def test_missing_tensorboard_is_one_config_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    message = ("log_with: tensorboard needs the tensorboard package (pip install tensorboard), "
               "or set log_with: none")
    with pytest.raises(ConfigError) as info:
        require_tensorboard()
    assert str(info.value) == message
    with pytest.raises(ConfigError, match="needs the tensorboard package"):
        TensorBoardLog.open(tb_config(), tmp_path, "run", 0)


def test_write_error_warns_once_and_stops_logging(tmp_path, monkeypatch, caplog):
    log = TensorBoardLog.open(tb_config(), tmp_path, "run", 0)
    log.scalars(1, {"loss/train": 0.5})

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(log._writer, "add_scalar", full_disk)
    with caplog.at_level(logging.WARNING, logger="lora_trainer"):
        for step in range(2, 5):
            log.scalars(step, {"loss/train": 0.5, "lr": 1e-4})
        log.flush()
        log.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "No space left on device" in warnings[0] and "\n" not in warnings[0]
    assert not log.enabled


def test_writer_thread_error_warns_once(tmp_path, monkeypatch, caplog):
    """A full disk seen by tensorboard's background writer surfaces on a later call, and is caught there."""
    log = TensorBoardLog.open(tb_config(), tmp_path, "run", 0)
    record_writer = log._writer.file_writer.event_writer._async_writer._writer

    def full_disk(data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(record_writer, "write", full_disk)
    monkeypatch.setattr("threading.excepthook", lambda args: None)  # the thread's own traceback
    with caplog.at_level(logging.WARNING, logger="lora_trainer"):
        for step in range(1, 4):
            log.scalars(step, {"loss/train": 0.5})
            log.flush()
        log.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "No space left on device" in warnings[0]


def test_unwritable_log_dir_warns_and_trains_without_log(tmp_path, caplog):
    (tmp_path / "tensorboard").write_text("a file where the folder should be")
    with caplog.at_level(logging.WARNING, logger="lora_trainer"):
        assert TensorBoardLog.open(tb_config(), tmp_path, "run", 0) is None
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
