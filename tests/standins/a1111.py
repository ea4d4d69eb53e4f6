"""What AUTOMATIC1111 1.10 does to the model object, rebuilt from webui_internals.md, on the REAL ldm classes.

- ``load_ldm_model``: A1111's ``sd_models.load_model`` in short: the ``<ckpt>.yaml`` beside the checkpoint,
  ``instantiate_from_config`` with CLIP built from its config (A1111's ``DisableInitialization``: HF CLIP from
  its config, open_clip with ``pretrained=None``), weights loaded with ``strict=False``, eval mode, and the
  attributes A1111 adds (``sd_checkpoint_info``, ``sd_model_hash``, ``is_sd1/is_sd2``, ``lowvram``). Not
  reproduced: the sd_hijack of the text encoder (``FrozenCLIPEmbedderWithCustomWords`` /
  ``FrozenOpenCLIPEmbedderWithCustomWords``); our backbone only calls ``get_learned_conditioning``.
- ``write_tiny_sd2_checkpoint``: the tiny SD2-v model (tiny_families) as an original checkpoint with the
  ``<ckpt>.yaml`` A1111 would read (v2-inference-v.yaml's shape: ldm's ``FrozenOpenCLIPEmbedder`` on a tiny
  open_clip architecture registered with ``open_clip.add_model_config``, ``parameterization: "v"``).
- ``Networks``: the part of the built-in Lora extension's ``networks`` module the trainer touches: in-place
  merges with CPU backups in ``network_weights_backup`` and the two restore functions (§3.4).
- ``medvram_hooks``: ``lowvram.setup_for_low_vram``'s pattern: forward pre-hooks that move one part of
  the model "to the GPU" and the previous one back. With no second device here, a move replaces every
  parameter's storage by a copy (what ``.to(device)`` does to ``param.data``), so anything holding on to
  the old storage or registered inside the moved modules would be caught.
- ``QueueLock`` / ``State``: ``call_queue.queue_lock`` (a FIFO, non-reentrant lock) and ``shared.state``.
- ``safe_torch_load``: ``modules/safe.py``'s replacement of ``torch.load`` (an allow-list of zip members; None on a
  refusal).
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import types
import zipfile
from pathlib import Path

import torch

TINY_OPEN_CLIP = "tiny-open-clip-sd2"  # the open_clip architecture name the tiny SD2's yaml asks for


def register_tiny_open_clip(folder: Path) -> str:
    """An open_clip model config whose text tower has the dims of tiny_families' SD2 text encoder, plus the extra
    (24th-like) layer SD2 checkpoints carry; ``open_clip.add_model_config`` makes ``create_model`` know it."""
    import open_clip

    from lora_trainer.backbones.tiny_families import TINY_SD2_TEXT_ENCODER as te

    assert te["hidden_act"] == "gelu"  # open_clip's default act (QuickGELU only with quick_gelu=True)
    config = {"embed_dim": te["projection_dim"],
              "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 8, "patch_size": 16},
              "text_cfg": {"context_length": te["max_position_embeddings"], "vocab_size": te["vocab_size"],
                           "width": te["hidden_size"], "heads": te["num_attention_heads"],
                           "layers": te["num_hidden_layers"] + 1,
                           "mlp_ratio": te["intermediate_size"] / te["hidden_size"]}}
    path = Path(folder) / f"{TINY_OPEN_CLIP}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config), encoding="utf-8")
    open_clip.add_model_config(path)
    return TINY_OPEN_CLIP


def write_tiny_sd2_checkpoint(root: Path, seed: int = 0) -> dict:
    """The tiny SD2-v as a diffusers folder and an original ``.safetensors`` with A1111's ``<ckpt>.yaml`` beside it."""
    import yaml

    from lora_trainer.backbones.tiny import ldm_yaml
    from lora_trainer.backbones.tiny_families import build_tiny_sd2, save_tiny_folder, save_tiny_single_file

    root = Path(root)
    backbone = build_tiny_sd2(seed)
    folder = save_tiny_folder(backbone, root / "tiny-sd2-folder")
    checkpoint = root / "tiny-sd2.safetensors"
    config_dir = save_tiny_single_file(backbone, checkpoint)
    config = yaml.safe_load(ldm_yaml(backbone, ""))
    params = config["model"]["params"]
    assert params["parameterization"] == "v" and params["unet_config"]["params"]["use_linear_in_transformer"]
    params["cond_stage_config"] = {  # v2-inference-v.yaml's, on the tiny architecture
        "target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
        "params": {"arch": register_tiny_open_clip(root / "open_clip"), "version": "laion2b_s32b_b79k",
                   "freeze": True, "layer": "penultimate"}}
    checkpoint.with_suffix(".yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return {"folder": folder, "safetensors": checkpoint, "config": config_dir, "backbone": backbone}


@contextlib.contextmanager
def _disable_initialization():
    """A1111's DisableInitialization: CLIP text models built from their config, open_clip without downloads."""
    import open_clip
    import transformers

    original_clip = transformers.CLIPTextModel.from_pretrained
    original_open_clip = open_clip.create_model_and_transforms

    def from_config_only(path, *args, **kwargs):
        return transformers.CLIPTextModel(transformers.CLIPTextConfig.from_pretrained(path))

    def create_without_pretrained(*args, **kwargs):
        kwargs["pretrained"] = None
        return original_open_clip(*args, **kwargs)

    transformers.CLIPTextModel.from_pretrained = from_config_only
    open_clip.create_model_and_transforms = create_without_pretrained
    try:
        yield
    finally:
        transformers.CLIPTextModel.from_pretrained = original_clip
        open_clip.create_model_and_transforms = original_open_clip


def _sequence_first(open_clip_model) -> None:
    """ldm's FrozenOpenCLIPEmbedder feeds the resblocks [L, N, D], as open_clip 2.20 (A1111's pin) expects;
    open_clip >= 2.21 builds them batch-first. Flip the flags back so the embedder computes what it does in A1111."""
    open_clip_model.transformer.batch_first = False
    for block in open_clip_model.transformer.resblocks:
        block.attn.batch_first = False


def load_ldm_model(checkpoint: Path, device: str = "cpu"):
    from ldm.util import instantiate_from_config
    from omegaconf import OmegaConf
    from safetensors.torch import load_file

    config = OmegaConf.load(str(Path(checkpoint).with_suffix(".yaml")))
    config.model.params.cond_stage_config.params.device = device
    with _disable_initialization():
        model = instantiate_from_config(config.model)
    state = load_file(str(checkpoint))
    is_sd2 = hasattr(model.cond_stage_model, "model")  # A1111's set_model_type
    if is_sd2:
        _sequence_first(model.cond_stage_model.model)
    elif not hasattr(model.cond_stage_model.transformer, "text_model"):
        # transformers >= 5.6 dropped CLIPTextModel.text_model (A1111's pinned 4.30 has it): same weights, new keys.
        state = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
                 for k, v in state.items()}
    state.pop("cond_stage_model.transformer.embeddings.position_ids", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    schedule = {"betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                "posterior_mean_coef1", "posterior_mean_coef2"}  # computed from the yaml, as in A1111
    real_missing = [k for k in missing if k not in schedule and not k.startswith(("model_ema", "logvar"))
                    and k != "cond_stage_model.model.logit_scale"]  # the contrastive head's, not in our export
    assert not real_missing and not unexpected, (real_missing[:5], unexpected[:5])
    model.eval()
    model.sd_checkpoint_info = types.SimpleNamespace(name=Path(checkpoint).name, model_name=Path(checkpoint).stem,
                                                     shorthash="0123456789")
    model.sd_model_hash = "0123456789"
    model.is_sd1, model.is_sd2, model.is_sdxl, model.lowvram = not is_sd2, is_sd2, False, False
    return model


class Networks:
    """``networks`` as A1111's Lora extension leaves it after a generation with ``<lora:x:1>``."""

    def __init__(self):
        self.loaded_networks = []

    def merge(self, module: torch.nn.Module, delta: torch.Tensor) -> None:
        """network_apply_weights: back up the weight on the CPU the first time, then add the delta in place."""
        if getattr(module, "network_weights_backup", None) is None:
            module.network_weights_backup = module.weight.to("cpu", copy=True)
            module.network_bias_backup = None
        with torch.no_grad():
            module.weight.add_(delta.to(module.weight))
        module.network_current_names = (("x", 1.0, 1.0, None),)
        self.loaded_networks.append("x")

    @staticmethod
    def network_restore_weights_from_backup(module):
        backup = getattr(module, "network_weights_backup", None)
        if backup is not None:
            module.weight.copy_(backup)

    @staticmethod
    def network_reset_cached_weight(module):
        module.network_current_names = ()
        module.network_weights_backup = None
        module.network_bias_backup = None


@contextlib.contextmanager
def medvram_hooks(sd_model):
    """Move each big part 'to the GPU' before it runs and the previous one back, as --medvram does."""
    state = {"in_gpu": None, "moves": 0}
    parts = [sd_model.first_stage_model, sd_model.model, sd_model.cond_stage_model.transformer]

    def move(module):
        module._apply(lambda t: t.clone())  # new storage for every parameter, as a device move gives
        state["moves"] += 1

    def send_me_to_gpu(module, _inputs):
        if state["in_gpu"] is module:
            return
        if state["in_gpu"] is not None:
            move(state["in_gpu"])
        move(module)
        state["in_gpu"] = module

    handles = [part.register_forward_pre_hook(send_me_to_gpu) for part in parts]
    try:
        yield state
    finally:
        for handle in handles:
            handle.remove()


class QueueLock:
    """call_queue.queue_lock: FIFO and not re-entrant (a second acquire from the same thread would deadlock)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.owner = None
        self.acquired = 0

    def __enter__(self):
        if self.owner == threading.get_ident():
            raise RuntimeError("queue_lock acquired twice by one thread: A1111 would deadlock here")
        self._lock.acquire()
        self.owner = threading.get_ident()
        self.acquired += 1
        return self

    def __exit__(self, *exc):
        self.owner = None
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()


class State:
    """shared.state, the fields the trainer sets."""

    def __init__(self):
        self.job, self.job_no, self.job_count, self.textinfo = "", 0, 0, None
        self.interrupted = False
        self.begun = self.ended = 0
        self.current_image = None

    def begin(self, job="(unknown)"):
        self.job, self.job_no, self.interrupted = job, 0, False
        self.begun += 1

    def end(self):
        self.job = ""
        self.ended += 1

    def interrupt(self):
        self.interrupted = True

    def assign_current_image(self, image):
        self.current_image = image


# -- modules/safe.py: A1111 replaces torch.load at start -----------------------------------------------------------
_ALLOWED_ZIP_NAMES = re.compile(r"^([^/]+)/((data/\d+)|version|byteorder|.data/serialization_id|(data\.pkl))$")


def safe_torch_load(unsafe_load):
    """A1111 1.10's ``modules.safe.load`` around the original ``torch.load``: a zip member outside its allow-list
    (``archive/.format_version``, which torch >= 2.x writes into every file) makes it log an error and return
    None, not raise. Extend inside the real A1111 failed this way ("'NoneType' object has no attribute 'get'")."""

    def load(filename, *args, **kwargs):
        try:
            with zipfile.ZipFile(filename) as archive:
                for name in archive.namelist():
                    if not _ALLOWED_ZIP_NAMES.match(name):
                        raise Exception(f"bad file inside {filename}: {name}")
        except zipfile.BadZipFile:
            pass
        except Exception as exc:  # noqa: BLE001 - as A1111: report and return None
            print(f"Error verifying pickled file from {filename}: {exc}")
            return None
        return unsafe_load(filename, *args, **kwargs)

    return load
