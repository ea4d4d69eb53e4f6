"""What the tab's buttons do, in plain Python: the tab (``tab.py``) only turns these values into components.

Every method either returns plain values or raises ``UserError`` with one line for the status box. The
training run itself lives in ``job.py`` (one at a time, in a thread), so a page reload finds it again.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from .. import job as jobs
from ..caption_editing import load_captions
from ..config import TrainConfig, config_to_yaml
from ..errors import DatasetError, UserError
from ..run_folder import RunFolder
from .context import TabContext
from .dataset_checks import dataset_warnings
from .dataset_manager import DatasetManager
from .downloads import Downloads
from .estimate import estimate_run
from .fields import FORM_FIELDS, from_form_value
from .presets import read_partial_config

logger = logging.getLogger("lora_trainer")

BULK_OPS = ("prepend", "replace", "remove")
SWEEP_FILE = "strength_sweep.png"
WEBUI_MODEL = "(the WebUI's loaded model)"


@dataclass
class DatasetView:
    root: str
    gallery: List[Tuple[str, str]]  # (image path, caption)
    names: List[str]
    warnings: List[str]

    @property
    def warnings_text(self) -> str:
        if not self.warnings:
            return f"{len(self.names)} images, no problems found."
        return "\n".join("Warning: " + w for w in self.warnings)


@dataclass
class ProgressView:
    state: str  # "idle" or a JobState value
    summary: str  # "step 12/40 · loss 0.1234 · 1.5 it/s · ETA 0:18" or a short line
    losses: List[Tuple[int, float]] = field(default_factory=list)
    samples: List[str] = field(default_factory=list)
    log: str = ""
    error: Optional[str] = None
    run_dir: Optional[str] = None
    fingerprint: tuple = ()  # changes whenever anything shown changes
    status: str = ""  # the Status line for this state: "running · started: x (run 1a2b)", or how the run ended
    val_losses: List[Tuple[int, float]] = field(default_factory=list)  # (step, validation loss), where measured


@dataclass
class ResultView:
    run_dir: str
    name: str  # the LoRA's name in <lora:name:w>: the published file's stem, else the run's
    lora_path: Optional[str]
    sweep: Optional[str]
    preview: Optional[str]
    trigger: str
    weight: float
    text: str


def _eta(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60}:{seconds % 60:02d}"


class TabController:
    def __init__(self, context: TabContext):
        self.context = context
        self._captioner: Any = None
        self._captioner_key: Optional[tuple] = None
        self._try_model: Optional[tuple] = None  # (base_model, backbone)
        self._busy = threading.Lock()  # captioning and the Try panel: one at a time
        self.datasets = DatasetManager(context)  # the named datasets in context.datasets_dir
        self.downloads = Downloads(context.output_dir)
        self.action = ""  # what the last Start or Extend said, kept in the Status line while the run is active

    # -- dataset ---------------------------------------------------------------------------------
    def load_dataset(self, folder: str) -> DatasetView:
        folder = (folder or "").strip()
        if not folder:
            raise DatasetError("give the folder of training images first")
        captions = load_captions(folder)
        entries = captions.images()
        return DatasetView(str(captions.root), [(str(e.path), e.caption) for e in entries],
                           [e.name for e in entries], dataset_warnings(entries))

    def caption(self, folder: str, model: str, pretrained: str, threshold: float, mode: str,
                trigger: str) -> Tuple[DatasetView, str]:
        """Auto-caption with CLIP, before any training: refused while a run holds the model."""
        from ..caption import caption_folder

        self._refuse_while_training("auto-captioning")
        self.load_dataset(folder)  # a bad folder fails before the model loads
        if not self._busy.acquire(blocking=False):
            raise UserError("captioning or a test image is already running; wait for it")
        try:
            captioner = self._load_captioner((model or self.context.caption_model).strip(),
                                             (pretrained if pretrained is not None else "").strip())
            run = caption_folder(folder, captioner, mode=mode or "skip", trigger=(trigger or "").strip(),
                                 threshold=float(threshold))
        finally:
            self._busy.release()
        return self.load_dataset(folder), run.summary()

    def _load_captioner(self, model: str, pretrained: str):
        from ..caption import Captioner

        key = (model, pretrained)
        if self._captioner_key != key:
            self._captioner = None
            self._captioner = Captioner.load(model, pretrained)
            self._captioner_key = key
        return self._captioner

    def release_models(self) -> None:
        """Drop the caption model and the Try panel's model (before training needs the memory)."""
        self._captioner = self._captioner_key = self._try_model = None

    def save_caption(self, folder: str, name: str, caption: str) -> Tuple[DatasetView, str]:
        if not name:
            raise DatasetError("select an image in the gallery first")
        captions = load_captions(folder)
        captions.set_caption(name, caption)
        saved = captions.save()
        return self.load_dataset(folder), f"saved the caption of {name}" + (
            f" (previous version in {saved.backup_dir})" if saved.backup_dir else "")

    def bulk_edit(self, folder: str, op: str, tag: str, replacement: str = "") -> Tuple[DatasetView, str]:
        captions = load_captions(folder)
        if op == "prepend":
            count = captions.prepend_tag(tag)
        elif op == "replace":
            count = captions.replace_tag(tag, replacement)
        elif op == "remove":
            count = captions.remove_tag(tag)
        else:
            raise UserError(f"unknown tag edit {op!r}; use one of {', '.join(BULK_OPS)}")
        captions.save()
        return self.load_dataset(folder), f"{op}: {count} caption(s) changed and saved"

    # -- config ----------------------------------------------------------------------------------
    def build_config(self, folder: str, base_model: str, trigger: str, values: Dict[str, Any]) -> TrainConfig:
        """The run's config from the form; ConfigError (one line) names the bad field."""
        form = {name: from_form_value(name, values[name]) for name in FORM_FIELDS if name in values}
        form = {k: v for k, v in form.items() if v is not None}
        if self.context.webui:
            base = self.context.base_model_label or WEBUI_MODEL
        else:
            base = (base_model or "").strip()
        if not base:
            raise UserError("give the base checkpoint (a .safetensors/.ckpt file or a diffusers folder) first")
        return TrainConfig.from_dict({**form, "base_model": base, "train_data_dir": (folder or "").strip(),
                                      "trigger_word": (trigger or "").strip()}, source="settings")

    def estimate(self, config: TrainConfig) -> str:
        from ..training_data import prepare_data

        data = prepare_data(config)
        family = self._family()
        device = config.device
        if device == "auto":
            device = "gpu" if self._cuda() else "cpu"
        text = estimate_run(family, "gpu" if device.startswith("cuda") or device == "gpu" else "cpu",
                            data.scan.num_images(), data.plan.total_steps, config.resolution, config.lora_rank,
                            config.batch_size, config.gradient_checkpointing).text
        reg, val = data.scan.of_role("reg"), data.scan.of_role("val")
        if reg:
            text += (f"\nWith {len(reg)} regularization images ({sum(r.repeats for r in reg)} per epoch, as many as "
                     "training images; the steps above count them).")
        if val:
            text += f"\n{len(val)} validation image(s) held out (not trained on)."
        return text

    def _family(self) -> str:
        label = (self.context.model_info() if self.context.model_info else "").lower()
        return "sdxl" if "sdxl" in label else "sd2" if "sd2" in label else "sd1"

    @staticmethod
    def _cuda() -> bool:
        import torch

        return torch.cuda.is_available()

    @staticmethod
    def config_yaml(config: TrainConfig) -> str:
        return config_to_yaml(config)

    @staticmethod
    def read_yaml(text: str, source: str) -> Dict[str, Any]:
        return read_partial_config(text, source)

    # -- the run ---------------------------------------------------------------------------------
    def start(self, config: TrainConfig) -> str:
        load_captions(config.train_data_dir)  # a missing or empty folder fails here, in one line
        if not self.context.webui and not Path(config.base_model).expanduser().exists():
            raise UserError(f"base checkpoint {config.base_model} does not exist; give a .safetensors/.ckpt file "
                            "or a diffusers folder")
        current = jobs.current_job()
        if current is not None and current.state in jobs.ACTIVE:
            snap = current.snapshot()
            raise jobs.JobBusy(f"a training run is already in progress ({snap['name']}, step {snap['step']}/"
                               f"{snap['total_steps']}); stop it or wait for it to finish")
        self.release_models()
        job = jobs.start_job(config, self.context.host_factory())
        self.action = f"started: {config.output_name or Path(config.train_data_dir).name} (run {job.id})"
        return self.action

    def stop(self, save: bool) -> str:
        job = jobs.current_job()
        if job is None or job.state not in jobs.ACTIVE:
            raise UserError("no training run is in progress")
        job.stop(save=save)
        return "stopping after this step; the LoRA trained so far is saved" if save else \
            "stopping after this step without saving a LoRA (checkpoints are kept)"

    def extend(self, steps: Any) -> str:
        job = jobs.current_job()
        if job is None:
            raise UserError("no run to extend; train one first")
        try:
            steps = int(float(steps))
        except (TypeError, ValueError):
            raise UserError(f"extend by a whole number of steps, got {steps!r}") from None
        self.release_models()
        new = job.extend(steps)
        self.action = f"extending {new.snapshot()['name']} by {steps} steps (to step {job.step + steps})"
        return self.action

    def progress(self) -> ProgressView:
        job = jobs.current_job()
        if job is None:
            return ProgressView("idle", "No training run yet.", fingerprint=("idle",))
        snap = job.snapshot()
        state, step, total = snap["state"], snap["step"], snap["total_steps"]
        parts = [f"{state}", f"step {step}/{total or '?'}"]
        if snap["avg_loss"] is not None:
            parts.append(f"loss {snap['avg_loss']:.4f}")
        if snap["it_per_s"]:
            parts.append(f"{snap['it_per_s']:.2f} it/s")
        if snap.get("phase"):  # after the last step: what runs now, not "ETA 0:00"
            parts.append(snap["phase"])
        elif state in ("running", "stopping"):
            parts.append(f"ETA {_eta(snap['eta_s'])}")
        summary = f"{snap['name']}: " + " · ".join(parts)
        if snap["error"]:
            summary += f"\nError: {snap['error']}"
        fingerprint = (snap["id"], state, step, snap.get("phase"), len(snap["samples"]), snap["lora_path"],
                       snap["error"])
        status = summary if state in ("finished", "stopped", "failed") else f"{state} · {self.action or snap['name']}"
        return ProgressView(state, summary, self._earlier_losses(job) + [(int(s), float(v)) for s, v in snap["losses"]],
                            list(snap["samples"]), "\n".join(snap["log"]), snap["error"], snap["run_dir"],
                            fingerprint, status,
                            val_losses=[(int(s), float(v)) for s, v in snap.get("val_losses", [])])

    def _earlier_losses(self, job) -> List[Tuple[int, float]]:
        """An extended run's losses before this job (from metrics.csv), so its chart starts at step 1."""
        if not job.start_step or job.run_dir is None:
            return []
        key = (job.id, job.start_step)
        if getattr(self, "_earlier", (None,))[0] != key:
            rows = RunFolder(job.run_dir).read_metrics()
            self._earlier = (key, [(int(r["step"]), float(r["loss"])) for r in rows
                                   if int(r["step"]) <= job.start_step])
        return self._earlier[1]

    # -- results ---------------------------------------------------------------------------------
    def runs(self) -> List[str]:
        """Run folders (with a config.yaml) in the output folder, newest first."""
        root = Path(self.context.output_dir)
        if not root.is_dir():
            return []
        found = [p for p in root.iterdir() if (p / "config.yaml").is_file()]
        return [p.name for p in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)]

    def run_path(self, name: str) -> Path:
        if not name or "/" in name or "\\" in name or name in (".", ".."):
            raise UserError("choose a run from the list")
        return RunFolder.open_existing(Path(self.context.output_dir) / name).path

    def result(self, run_dir: str) -> ResultView:
        run = RunFolder.open_existing(Path(run_dir))
        config = run.load_config()
        lora = run.lora_path if run.lora_path.is_file() else None
        job = jobs.current_job()
        published = [Path(p) for p in (job.published if job and job.run_dir == run.path else [])]
        name = next((p.stem for p in published if p.suffix == ".safetensors"), run.name)
        sweep = run.path / SWEEP_FILE
        where = f"\nPublished to {published[0].parent}" if published else ""
        text = (f"{run.lora_path.name} in {run.path}{where}" if lora else
                f"{run.name}: no LoRA file yet (stopped without saving, or still training) in {run.path}")
        return ResultView(str(run.path), name, str(lora) if lora else None,
                          str(sweep) if sweep.is_file() else None,
                          str(run.preview_path) if run.preview_path.is_file() else None,
                          config.trigger_word, config.preferred_weight, text)

    def run_config_text(self, name: str) -> str:
        return RunFolder.open_existing(self.run_path(name)).config_path.read_text(encoding="utf-8")

    def try_lora(self, run_dir: str, prompt: str, weight: float):
        """Standalone Try panel: one image from the run's base model with its LoRA at ``weight``."""
        from ..lora_file import read_lora_file
        from ..network import LoraNetwork
        from ..runner import load_standalone_backbone

        self._refuse_while_training("generating a test image")
        view = self.result(run_dir)
        if not view.lora_path:
            raise UserError(f"{Path(run_dir).name} has no LoRA file to try (it was stopped without saving)")
        config = RunFolder(Path(run_dir)).load_config()
        if not self._busy.acquire(blocking=False):
            raise UserError("captioning or a test image is already running; wait for it")
        try:
            started = time.perf_counter()
            if self._try_model is None or self._try_model[0] != config.base_model:
                self._try_model = (config.base_model, load_standalone_backbone(config))
            backbone = self._try_model[1]
            network = LoraNetwork(backbone.lora_targets(conv=config.network == "locon"), config.lora_rank,
                                  config.lora_alpha, config.conv_rank, config.conv_alpha)
            network.load_kohya_state_dict(read_lora_file(Path(view.lora_path))[0], source=view.lora_path)
            network.to(backbone.device)
            with network.attached_to_model(), network.multiplier(float(weight)):
                image = backbone.generate([prompt or view.trigger], config.sample_negative_prompt,
                                          config.sample_seed, config.sample_steps, config.sample_guidance_scale,
                                          (config.resolution, config.resolution))[0]
        finally:
            self._busy.release()
        return image, f"{view.name} at weight {float(weight):g}: {time.perf_counter() - started:.1f} s"

    def _refuse_while_training(self, what: str) -> None:
        job = jobs.current_job()
        if job is not None and job.state in jobs.ACTIVE:
            raise UserError(f"{what} waits until training has finished (it needs the memory the run holds)")
