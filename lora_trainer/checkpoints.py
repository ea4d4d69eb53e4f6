"""Resumable checkpoints: ``<run>/checkpoints/checkpoint-<step>/`` holding the LoRA file and its state.

The LoRA file inside is the same format as the final one (usable in the WebUI as it is); the
state file carries what a bit-identical resume needs: fp32 LoRA weights, optimizer, scheduler,
step. Data order and noise are functions of (seed, step), so no RNG state has to be stored.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from .errors import TrainingError
from .files import atomic_dir
from .tensor_files import load_tensors

STATE_FILE = "training_state.pt"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"checkpoint-{step:06d}"


def save_checkpoint(run_dir: Path, step: int, state: dict, write_lora) -> Path:
    """Write the state and (through ``write_lora(folder)``) the LoRA file into a new checkpoint folder."""
    target = checkpoint_dir(run_dir, step)
    with atomic_dir(target) as tmp:
        # Through a Python file: on a full disk that raises OSError (ENOSPC), which atomic_dir turns into a
        # StorageError; torch.save(path) would raise a cryptic RuntimeError from its C++ writer instead.
        with open(tmp / STATE_FILE, "wb") as fh:
            sink = _WriteErrors(fh)
            try:
                torch.save(state, sink)
            except RuntimeError:
                # torch's zip writer turns the file's ENOSPC into "unexpected pos ..."; give the real reason
                if sink.error is not None:
                    raise sink.error from None
                raise
        write_lora(tmp)
    return target


class _WriteErrors:
    """A binary file that remembers the OSError a write raised (torch.save hides it behind a RuntimeError)."""

    def __init__(self, fh):
        self.fh, self.error = fh, None

    def write(self, data) -> int:
        try:
            return self.fh.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.fh.flush()


def list_checkpoints(run_dir: Path) -> List[Tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = []
    for entry in folder.iterdir():
        match = _NAME.match(entry.name)
        if match and (entry / STATE_FILE).is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def load_checkpoint_state(folder: Path) -> dict:
    try:
        state = load_tensors(Path(folder) / STATE_FILE)
    except Exception as exc:  # a damaged file can fail in many ways inside torch.load
        raise TrainingError(f"{folder}: the checkpoint cannot be read ({type(exc).__name__}); "
                            "delete this folder to resume from the one before") from None
    if not isinstance(state, dict) or "step" not in state:
        raise TrainingError(f"{folder}: the checkpoint cannot be read (no training state in {STATE_FILE}); "
                            "delete this folder to resume from the one before")
    return state


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (0 keeps all)."""
    if keep <= 0:
        return
    for _, folder in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(folder, ignore_errors=True)
