"""Metadata inside the LoRA file and the WebUI's ``name.json`` sidecar.

A1111 and Forge decide from these keys which model a LoRA belongs to (hiding it otherwise), show
its training tags and size, and Forge needs ``modelspec.architecture`` (webui_internals.md §3.6).
Every value is a string, as kohya writes them.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from .config import TrainConfig

# family -> (ss_base_model_version, ss_v2, modelspec.architecture, sidecar "sd version")
FAMILY_KEYS = {
    "sd1": ("sd_v1", "False", "stable-diffusion-v1/lora", "SD1"),
    "sd2": ("sd_v2", "True", "stable-diffusion-v2-512/lora", "SD2"),
    "sd2-v": ("sd_v2", "True", "stable-diffusion-v2-768-v/lora", "SD2"),
    "sdxl": ("sdxl_base_v1-0", "False", "stable-diffusion-xl-v1-base/lora", "SDXL"),
}


def family_key(family: str, prediction_type: str) -> str:
    return "sd2-v" if family == "sd2" and prediction_type == "v_prediction" else family


@dataclass(frozen=True)
class RunFacts:
    """What the metadata records beyond the config: the model, the data and the schedule as trained."""
    name: str
    family: str
    prediction_type: str
    model_name: str
    model_hash: Optional[str]
    num_images: int
    num_samples: int  # images x repeats
    batches_per_epoch: int
    total_steps: int
    tag_frequency: Dict[str, Dict[str, int]]
    dataset_dirs: Dict[str, Dict[str, int]]
    bucket_counts: Dict[str, int]  # "512x512" -> images
    started_at: float
    session_id: str = ""
    processes: int = 1  # data-parallel processes, each with batch_size images per micro-batch
    num_reg_images: int = 0
    reg_dataset_dirs: Dict[str, Dict[str, int]] = field(default_factory=dict)
    num_validation_images: int = 0
    datasets: Optional[list] = None  # kohya's ss_datasets, for runs of several folders
    masked_loss: bool = False  # some image's loss is weighted by a mask


def new_session_id() -> str:
    return uuid.uuid4().hex[:16]


def trigger_words(config: TrainConfig) -> List[str]:
    return [w for w in (config.trigger_word.strip(),) if w]


def lora_metadata(config: TrainConfig, facts: RunFacts, step: int, epoch: int, rank: int, alpha: float,
                  conv_rank: Optional[int] = None, conv_alpha: Optional[float] = None) -> Dict[str, str]:
    version, v2, architecture, _ = FAMILY_KEYS[family_key(facts.family, facts.prediction_type)]
    network_module, network_args = network_description(config, rank, conv_rank, conv_alpha)
    text_lr = config.learning_rate if config.text_encoder_lr is None else config.text_encoder_lr
    resolution = f"{config.resolution},{config.resolution}"
    bucket_info = {"buckets": {str(i): {"resolution": [int(x) for x in key.split("x")], "count": count}
                               for i, (key, count) in enumerate(sorted(facts.bucket_counts.items()))},
                   "mean_img_ar_error": 0.0}
    now = time.time()
    meta = {
        "ss_session_id": facts.session_id,
        "ss_training_started_at": f"{facts.started_at:.0f}",
        "ss_training_finished_at": f"{now:.0f}",
        "ss_output_name": facts.name,
        "ss_sd_model_name": facts.model_name,
        "ss_base_model_version": version,
        "ss_v2": v2,
        "ss_network_module": network_module,
        "ss_network_dim": str(rank),
        "ss_network_alpha": _num(alpha),
        "ss_network_args": json.dumps(network_args),
        "ss_learning_rate": _num(config.learning_rate),
        "ss_unet_lr": _num(config.learning_rate),
        "ss_text_encoder_lr": _num(text_lr) if config.train_text_encoder else "0",
        "ss_optimizer": config.optimizer,
        "ss_lr_scheduler": config.lr_scheduler,
        "ss_lr_warmup_steps": str(config.lr_warmup_steps),
        "ss_max_train_steps": str(facts.total_steps),
        "ss_steps": str(step),
        "ss_epoch": str(epoch),
        "ss_num_epochs": str(max(1, -(-facts.total_steps * config.gradient_accumulation_steps
                                       // max(1, facts.batches_per_epoch)))),
        "ss_num_batches_per_epoch": str(facts.batches_per_epoch),
        "ss_num_train_images": str(facts.num_samples),
        "ss_batch_size_per_device": str(config.batch_size),
        "ss_total_batch_size": str(config.batch_size * facts.processes * config.gradient_accumulation_steps),
        "ss_gradient_accumulation_steps": str(config.gradient_accumulation_steps),
        "ss_gradient_checkpointing": str(config.gradient_checkpointing),
        "ss_mixed_precision": config.mixed_precision,
        "ss_max_grad_norm": _num(config.max_grad_norm),
        "ss_seed": str(config.seed),
        "ss_resolution": f"({resolution})",
        "ss_clip_skip": str(config.clip_skip),
        "ss_noise_offset": _num(config.noise_offset),
        "ss_min_snr_gamma": _num(config.min_snr_gamma),
        "ss_ip_noise_gamma": _num(config.ip_noise_gamma),
        "ss_network_dropout": _num(config.network_dropout),
        "ss_scale_weight_norms": _num(config.scale_weight_norms),
        "ss_multires_noise_iterations": str(config.multires_noise_iterations),
        "ss_multires_noise_discount": _num(config.multires_noise_discount),
        "ss_cache_latents": str(config.cache_latents),
        "ss_flip_aug": str(config.flip_aug),
        "ss_shuffle_caption": str(config.shuffle_caption),
        "ss_keep_tokens": str(config.keep_tokens),
        "ss_caption_dropout_rate": _num(config.caption_dropout_rate),
        "ss_enable_bucket": str(config.enable_bucket),
        "ss_min_bucket_reso": str(config.min_bucket_reso),
        "ss_max_bucket_reso": str(config.max_bucket_reso),
        "ss_bucket_no_upscale": str(config.bucket_no_upscale),
        "ss_bucket_info": json.dumps(bucket_info),
        "ss_tag_frequency": json.dumps(facts.tag_frequency, ensure_ascii=False),
        "ss_dataset_dirs": json.dumps(facts.dataset_dirs, ensure_ascii=False),
        "ss_training_comment": config.description,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": architecture,
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if facts.family == "sdxl"
        else "diffusers",
        "modelspec.title": facts.name,
        "modelspec.resolution": f"{config.resolution}x{config.resolution}",
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now)),
        "modelspec.prediction_type": "v" if facts.prediction_type == "v_prediction" else "epsilon",
        "modelspec.trigger_phrase": ", ".join(trigger_words(config)),
        "modelspec.description": config.description,
    }
    meta.update({
        "ss_num_reg_images": str(facts.num_reg_images),
        "ss_reg_dataset_dirs": json.dumps(facts.reg_dataset_dirs, ensure_ascii=False),
        "ss_prior_loss_weight": _num(config.prior_loss_weight),
        "ss_num_validation_images": str(facts.num_validation_images),
        "ss_validation_split": _num(config.validation_split),
        "ss_validate_every_n_steps": str(config.validate_every_n_steps or "None"),
        "ss_validation_seed": str(config.seed if config.validation_seed is None else config.validation_seed),
        "ss_loss_type": config.loss_type,
        "ss_huber_c": _num(config.huber_c),
        "ss_huber_schedule": config.huber_schedule,
        "ss_min_timestep": str(config.min_timestep),
        "ss_max_timestep": str(config.max_timestep),
        "ss_debiased_estimation": str(config.debiased_estimation_loss),
        "ss_zero_terminal_snr": str(config.zero_terminal_snr),
        "ss_masked_loss": str(facts.masked_loss),
    })
    if facts.datasets is not None:
        meta["ss_datasets"] = json.dumps(facts.datasets, ensure_ascii=False)
    if facts.model_hash:
        meta["ss_sd_model_hash"] = facts.model_hash
    if config.init_lora:
        meta["ss_init_lora"] = config.init_lora
    return meta


def network_description(config: TrainConfig, rank: int, conv_rank: Optional[int] = None,
                        conv_alpha: Optional[float] = None) -> Tuple[str, Dict[str, str]]:
    """``ss_network_module`` and ``ss_network_args`` as kohya / LyCORIS write them for ``config.network``."""
    conv = {"conv_dim": str(conv_rank or rank), "conv_alpha": str(conv_alpha or conv_rank or rank)}
    dropouts = {k: _num(getattr(config, k)) for k in ("rank_dropout", "module_dropout") if getattr(config, k)}
    if config.network == "locon":
        return "networks.lora", {"algo": "locon", **conv, **dropouts}
    if config.network in ("loha", "lokr"):
        args = {"algo": config.network, **conv}
        if config.network == "lokr":
            args["factor"] = str(config.lokr_factor)
        return "lycoris.kohya", args
    if config.network == "dora":
        return "lycoris.kohya", {"algo": "lora", "dora_wd": "True", "wd_on_output": "False"}
    return "networks.lora", dropouts


def sidecar_json(config: TrainConfig, facts: RunFacts) -> Dict[str, object]:
    """The WebUI's user-metadata file ``name.json`` (A1111's ui_edit_user_metadata fields)."""
    sd_version = FAMILY_KEYS[family_key(facts.family, facts.prediction_type)][3]
    return {
        "description": config.description or f"Trained with lora_trainer on {facts.num_images} images.",
        "sd version": sd_version,
        "activation text": ", ".join(trigger_words(config)),
        "preferred weight": config.preferred_weight,
        "negative text": "",
        "notes": f"base model: {facts.model_name}; {facts.total_steps} steps; rank {config.lora_rank}",
    }


def _num(value: float) -> str:
    return f"{value:g}"
