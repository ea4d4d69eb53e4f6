"""The Host for AUTOMATIC1111 and Forge, built from WebUI objects that ``scripts/`` passes in.

Nothing here imports the WebUI: ``scripts/lora_trainer_tab.py`` hands over ``shared``, the
``queue_lock``, ``devices`` and the Lora extension's ``networks`` module, so this class can be
tested with stand-ins (tests/standins/a1111.py).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import ContextManager, Optional

from .backbones.base import Backbone, UnsupportedFamily
from .config import TrainConfig
from .errors import ModelError
from .events import Progress

logger = logging.getLogger("lora_trainer")


def forge_hooks(sd_models) -> dict:
    """Forge's lazy model load (``sd_models.forge_model_reload``) and its memory manager's ``load_model_gpu``, as
    WebUIHost keyword arguments; both None in A1111, which has neither (nor a ``backend`` package)."""
    try:
        from backend.memory_management import load_model_gpu
    except ImportError:
        load_model_gpu = None
    return {"forge_reload": getattr(sd_models, "forge_model_reload", None), "load_model_gpu": load_model_gpu}


def describe_model(model_data, selected: Optional[str]) -> str:
    """The Model box: "tiny-sd1.safetensors [2be795a74e] (SD1)", or "... (loads when training starts)".

    ``model_data`` is ``sd_models.model_data``; ``selected`` the ``sd_model_checkpoint`` setting. Forge holds a
    placeholder model (``forge_objects`` None) until its first generation, keeps the checkpoint to load in
    ``forge_loading_parameters``, and sets ``sd_model_checkpoint`` only when its checkpoint list is built or changed
    (never in API mode).
    """
    model = getattr(model_data, "sd_model", None)
    loaded = model is not None and getattr(model, "forge_objects", True) is not None
    info = getattr(model, "sd_checkpoint_info", None) if loaded else None
    if info is None:
        info = (getattr(model_data, "forge_loading_parameters", None) or {}).get("checkpoint_info")
    name = (getattr(info, "title", None) or getattr(info, "name", None) if info is not None else None) or selected
    name = name or "no checkpoint selected"
    if not loaded:
        return f"{name} (loads when training starts)"
    try:
        return f"{name} ({model_family(model).upper()})"
    except UnsupportedFamily as exc:
        return f"{name} ({exc.name}: cannot be trained)"


def model_family(sd_model) -> str:
    """The family of the WebUI's loaded model, as its backbone will see it; ModelError for one that cannot train."""
    if hasattr(sd_model, "forge_objects"):
        from .backbones.forge import forge_family

        return forge_family(sd_model)
    from .backbones.a1111 import detect_family

    return detect_family(sd_model)


class WebUIHost:
    def __init__(self, shared, queue_lock, lora_dir: Path, devices=None, networks=None, render=None,
                 forge_reload=None, load_model_gpu=None, model_data=None):
        """``forge_reload``: Forge's ``sd_models.forge_model_reload`` (its model loads lazily);
        ``load_model_gpu``: Forge's ``memory_management.load_model_gpu``; ``model_data``: ``sd_models.model_data``
        (the loaded model, read without loading one)."""
        self.model_data = model_data
        self.shared, self.queue_lock, self.devices = shared, queue_lock, devices
        self.networks, self.render = networks, render
        self.forge_reload, self.load_model_gpu = forge_reload, load_model_gpu
        self._lora_dir = Path(lora_dir)
        self._begun = False
        self._total = 0

    def model_lock(self) -> ContextManager:
        return self.queue_lock

    def load_backbone(self, config: TrainConfig) -> Backbone:
        if self.forge_reload is not None:
            self.forge_reload()  # Forge holds a placeholder until the first generation loads the model
        sd_model = self.shared.sd_model  # A1111 loads it lazily, under its own lock
        if sd_model is None or getattr(sd_model, "forge_objects", True) is None:
            raise ModelError("no checkpoint is loaded in the WebUI; pick one in the checkpoint list first")
        device = getattr(self.devices, "device", None)
        if hasattr(sd_model, "forge_objects"):
            from .backbones.forge import ForgeBackbone

            return ForgeBackbone(sd_model, device=device, load_model_gpu=self.load_model_gpu, render=self.render)
        from .backbones.a1111 import A1111Backbone

        cmd_opts = getattr(self.shared, "cmd_opts", None)
        return A1111Backbone(sd_model, device=device, networks=self.networks, render=self.render,
                             lowvram=bool(getattr(cmd_opts, "lowvram", False)))

    def check_model(self) -> None:
        """Refuse, before a run is accepted, a loaded model that cannot train (Flux, SD3, a refiner, ...). A model
        not loaded yet (A1111 and Forge load lazily) is checked when the run loads it."""
        model = getattr(self.model_data, "sd_model", None)
        if model is not None and getattr(model, "forge_objects", True) is not None:
            model_family(model)

    def lora_dir(self) -> Optional[Path]:
        return self._lora_dir

    # -- the WebUI's own progress bar, ETA and Interrupt button (shared.state) ------------------------
    def progress_started(self, job_name: str, total_steps: int) -> None:
        state = self.shared.state
        state.begin(job="train-lora")
        state.job_count, state.job_no, self._total = total_steps, 0, total_steps
        state.textinfo = job_name
        self._begun = True

    def progress(self, event: Progress) -> None:
        state = self.shared.state
        state.job_no = event.step
        state.textinfo = (f"Training LoRA: step {event.step}/{event.total_steps}, loss {event.avg_loss:.4f}, "
                          f"{event.it_per_s:.2f} it/s")

    def phase(self, text: str) -> None:
        if self._begun and text:  # the WebUI's progress bar says what runs after the last step
            self.shared.state.textinfo = f"Training LoRA: {text}"

    def progress_finished(self) -> None:
        if self._begun:
            self.shared.state.end()
            self._begun = False

    def sample_saved(self, paths: list) -> None:
        """The WebUI's live preview (``shared.state.assign_current_image``) shows the newest sample."""
        if not paths:
            return
        from PIL import Image

        with Image.open(paths[0]) as image:
            self.shared.state.assign_current_image(image.copy())

    def interrupted(self) -> bool:
        return bool(getattr(self.shared.state, "interrupted", False))

    def published(self, paths: list) -> None:
        """Make ``<lora:name>`` and the Lora cards see the new file without a restart."""
        networks = self.networks
        if networks is None:
            return
        cached_loader = getattr(networks, "load_lora_state_dict", None)
        if hasattr(cached_loader, "cache_clear"):  # Forge caches tensors by file name
            cached_loader.cache_clear()
        if hasattr(networks, "list_available_networks"):
            networks.list_available_networks()
