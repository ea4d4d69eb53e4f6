"""Shared fixtures."""

import pytest


# ---- tiny SD1 model (lora_trainer.backbones.tiny): built once per session, offline ----------------------------
@pytest.fixture(scope="session")
def tiny_sd1():
    """The tiny SD1 backbone from seed 0. Shared: tests that change flags must restore them (or build their own)."""
    from lora_trainer.backbones.tiny import build_tiny_sd1

    return build_tiny_sd1(0)


@pytest.fixture(scope="session")
def tiny_sd1_files(tiny_sd1, tmp_path_factory):
    """The tiny model on disk: a diffusers folder, an LDM .safetensors and .ckpt, and their config folder."""
    from lora_trainer.backbones.tiny import save_tiny_sd1, save_tiny_sd1_single_file

    root = tmp_path_factory.mktemp("tiny_sd1")
    save_tiny_sd1(tiny_sd1, root / "tiny-folder")
    config = save_tiny_sd1_single_file(tiny_sd1, root / "tiny.safetensors")
    ckpt_config = save_tiny_sd1_single_file(tiny_sd1, root / "tiny-ckpt.ckpt")
    return {"folder": root / "tiny-folder", "safetensors": root / "tiny.safetensors", "config": config,
            "ckpt": root / "tiny-ckpt.ckpt", "ckpt_config": ckpt_config}


@pytest.fixture(scope="session")
def tiny_sd2_files(tmp_path_factory):
    """A tiny SD2-v checkpoint in the original (ldm, open_clip text encoder) format with its A1111 yaml."""
    pytest.importorskip("ldm")
    pytest.importorskip("open_clip")
    from standins.a1111 import write_tiny_sd2_checkpoint

    return write_tiny_sd2_checkpoint(tmp_path_factory.mktemp("tiny_sd2"))
