"""WebUI glue for the Train LoRA tab (AUTOMATIC1111 1.10, Forge): the tab, its settings, the HTTP API routes, and
stopping a run when the script unloads. It only turns WebUI objects into plain values; the engine is ``lora_trainer/``.

Captioning runs from the tab's own button, before training and outside the WebUI's queue lock; a training
run holds ``call_queue.queue_lock`` for its whole length (lora_trainer/job.py), like the built-in Train tab.
"""

import os
import sys
from pathlib import Path

from modules import script_callbacks, shared

EXTENSION_DIR = Path(__file__).resolve().parents[1]
# The WebUI puts the extension on sys.path only while it imports this file: import the package now, so
# its sub-modules can be imported later, from the callbacks.
sys.path.insert(0, str(EXTENSION_DIR))
try:
    import lora_trainer  # noqa: F401
finally:
    sys.path.remove(str(EXTENSION_DIR))

SECTION = ("lora_trainer", "LoRA Trainer")
DEFAULTS = {
    "lora_trainer_subfolder": ("", "Sub-folder of the LoRA folder for trained LoRAs (empty: the LoRA folder)"),
    "lora_trainer_output_dir": (os.path.join("outputs", "lora_trainer"),
                                "Folder for run folders (config, log, samples, checkpoints)"),
    "lora_trainer_default_rank": (16, "Default LoRA rank"),
    "lora_trainer_default_steps": (1000, "Default number of training steps"),
    "lora_trainer_default_lr": (1e-4, "Default learning rate"),
    "lora_trainer_default_weight": (0.7, "Weight for 'Use in txt2img'"),
    "lora_trainer_caption_model": ("ViT-L-14", "Auto-caption: CLIP model (open_clip name)"),
    "lora_trainer_caption_pretrained": ("openai", "Auto-caption: pretrained tag or a local weights file"),
    "lora_trainer_datasets_dir": ("datasets", "Folder for datasets made and uploaded in the tab (one folder each)"),
    "lora_trainer_max_file_mb": (50, "Uploads: largest file accepted (MB)"),
    "lora_trainer_max_upload_mb": (4096, "Uploads: most one upload may add (MB)"),
    "lora_trainer_allowed_dirs": (f"{getattr(shared, 'models_path', 'models')}, outputs",
                                  "HTTP API: folders it may read datasets from, comma-separated (the datasets and "
                                  "run folders always)"),
}


def _opt(key):
    return shared.opts.data.get(key, DEFAULTS[key][0])


def _path(key) -> Path:
    return Path(str(_opt(key))).resolve()


def _limits():
    from lora_trainer.dataset_store import UploadLimits

    return UploadLimits.from_mb(_opt("lora_trainer_max_file_mb"), _opt("lora_trainer_max_upload_mb"), UploadLimits())


def _lora_dir() -> Path:
    base = getattr(shared.cmd_opts, "lora_dir", None) or os.path.join(getattr(shared, "models_path", "models"),
                                                                       "Lora")
    return Path(base) / str(_opt("lora_trainer_subfolder") or "").strip()


def _model_info() -> str:
    from modules import sd_models

    from lora_trainer.webui_host import describe_model

    return describe_model(sd_models.model_data, shared.opts.data.get("sd_model_checkpoint"))


def _host():
    from modules import call_queue, devices, sd_models

    from lora_trainer.webui_host import WebUIHost, forge_hooks

    return WebUIHost(shared, call_queue.queue_lock, _lora_dir(), devices=devices, networks=sys.modules.get("networks"),
                     model_data=sd_models.model_data, **forge_hooks(sd_models))


def _defaults() -> dict:
    return {"lora_rank": int(_opt("lora_trainer_default_rank")),
            "max_train_steps": int(_opt("lora_trainer_default_steps")),
            "learning_rate": float(_opt("lora_trainer_default_lr")),
            "preferred_weight": float(_opt("lora_trainer_default_weight"))}


def on_ui_tabs():
    from lora_trainer.ui.context import TabContext
    from lora_trainer.ui.tab import TrainTab

    context = TabContext(
        host_factory=_host, output_dir=_path("lora_trainer_output_dir"), webui=True, model_info=_model_info,
        caption_model=_opt("lora_trainer_caption_model"), caption_pretrained=_opt("lora_trainer_caption_pretrained"),
        preferred_weight=float(_opt("lora_trainer_default_weight")), defaults=_defaults(),
        datasets_dir=_path("lora_trainer_datasets_dir"), upload_limits=_limits())
    return [(TrainTab(context).render(), "Train LoRA", "lora_trainer")]


def _api_defaults() -> dict:  # at each request: the checkpoint may have changed
    checkpoint = str(shared.opts.data.get("sd_model_checkpoint") or "").split(" [")[0]
    return {**_defaults(), "base_model": checkpoint or "(the WebUI's loaded model)",
            "output_dir": str(_path("lora_trainer_output_dir"))}


def _caption(folder, **options):
    from lora_trainer.caption import caption_dataset

    return caption_dataset(folder, **{"model_name": _opt("lora_trainer_caption_model"),
                                      "pretrained": _opt("lora_trainer_caption_pretrained"), **options})


def on_app_started(demo, app):  # demo is None under --nowebui
    from lora_trainer.api import mount_api, parse_credentials

    allowed = [Path(p.strip()) for p in str(_opt("lora_trainer_allowed_dirs")).split(",") if p.strip()]
    # --api-auth; without it --gradio-auth, so a WebUI behind a login never serves these routes without one
    logins = getattr(shared.cmd_opts, "api_auth", None) or getattr(shared.cmd_opts, "gradio_auth", None)
    mount_api(app, _host, _path("lora_trainer_output_dir"), _path("lora_trainer_datasets_dir"), allowed,
              defaults=_api_defaults, credentials=parse_credentials(logins), upload_limits=_limits(), caption=_caption)


def on_ui_settings():
    import gradio as gr

    # A1111 1.10 and Forge build a default widget only for str, int and bool settings (ui_settings.py
    # create_setting_component raises for anything else, and the WebUI does not start): floats get one here.
    components = {"lora_trainer_default_rank": (gr.Slider, {"minimum": 1, "maximum": 128, "step": 1}),
                  "lora_trainer_default_steps": (gr.Number, {"precision": 0}),
                  "lora_trainer_default_lr": (gr.Number, {}),
                  "lora_trainer_default_weight": (gr.Slider, {"minimum": 0.0, "maximum": 2.0, "step": 0.05})}
    for key, (default, label) in DEFAULTS.items():
        component, args = components.get(key, (None, None))
        shared.opts.add_option(key, shared.OptionInfo(default, label, component, args, section=SECTION))


def on_script_unloaded():
    from lora_trainer.job import ACTIVE, current_job

    job = current_job()
    if job is not None and job.state in ACTIVE:
        job.stop(save=True)  # keeps what was trained; the thread releases the queue lock as it ends


script_callbacks.on_ui_tabs(on_ui_tabs)
script_callbacks.on_ui_settings(on_ui_settings)
script_callbacks.on_script_unloaded(on_script_unloaded)
script_callbacks.on_app_started(on_app_started)
