"""What the engine needs from whoever hosts it (the WebUI, or our standalone app).

The WebUI's services reach the engine only through this small protocol: the lock that guards the
model, where the model comes from, where finished LoRAs go, and the host's own progress display.
``scripts/`` implements it with the WebUI's objects; tests pass stand-ins.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import ContextManager, Optional, Protocol

from .backbones.base import Backbone
from .config import TrainConfig
from .events import Progress


class Host(Protocol):
    def model_lock(self) -> ContextManager:
        """Held for the whole run, so nothing generates on a half-trained model."""

    def load_backbone(self, config: TrainConfig) -> Backbone:
        """The model to train (called with the lock held)."""

    def check_model(self) -> None:
        """Raise ModelError, before a run is accepted, when the model it would train cannot be trained."""

    def lora_dir(self) -> Optional[Path]:
        """Where finished LoRAs are published, or None to leave them in the run folder only."""

    def progress_started(self, job_name: str, total_steps: int) -> None: ...

    def progress(self, event: Progress) -> None: ...

    def progress_finished(self) -> None: ...

    def phase(self, text: str) -> None:
        """Work after the last step ("checking the LoRA 3/8", "saving", "publishing"; "" when done)."""

    def sample_saved(self, paths: list) -> None:
        """New sample images (the WebUI shows the first as its live preview)."""

    def interrupted(self) -> bool:
        """True when the host's own Interrupt button was pressed."""

    def published(self, paths: list) -> None:
        """Called after files were copied into ``lora_dir`` (refresh the host's LoRA list)."""


class StandaloneHost:
    """Our own app: a plain lock, checkpoints from disk, no LoRA folder unless one is given."""

    def __init__(self, lora_dir: Optional[Path] = None):
        self._lock = threading.Lock()
        self._lora_dir = Path(lora_dir) if lora_dir else None

    def model_lock(self) -> ContextManager:
        return self._lock

    def load_backbone(self, config: TrainConfig) -> Backbone:
        from .runner import load_standalone_backbone

        return load_standalone_backbone(config)

    def check_model(self) -> None:
        pass  # the checkpoint file is checked when it loads, in the run

    def lora_dir(self) -> Optional[Path]:
        return self._lora_dir

    def progress_started(self, job_name: str, total_steps: int) -> None:
        pass

    def progress(self, event: Progress) -> None:
        pass

    def progress_finished(self) -> None:
        pass

    def phase(self, text: str) -> None:
        pass

    def sample_saved(self, paths: list) -> None:
        pass

    def interrupted(self) -> bool:
        return False

    def published(self, paths: list) -> None:
        pass

