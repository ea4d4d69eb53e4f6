"""TrainConfig: the one schema behind YAML files, CLI flags, the tab's fields and the HTTP API.

The config is flat (every key is unique), which is what kohya users and the brief's YAML expect;
each field still names its section (``model``, ``data``, ...) so help, the UI and nested YAML
(``data: {train_data_dir: ...}``) can group them. Validation happens once, in ``from_dict``;
an instance is frozen and always valid. Derived numbers (total steps, epochs) live in
``plan.TrainPlan``, never written back here.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .buckets import make_buckets
from .errors import ConfigError

logger = logging.getLogger("lora_trainer")

SECTIONS = ("model", "data", "network", "optim", "schedule", "sample", "output", "runtime")

# Keys other trainers (kohya sd-scripts, diffusers examples) use for the same thing.
# They keep working, with a warning naming the key to use instead.
DEPRECATED_KEYS = {
    "pretrained_model_name_or_path": "base_model",
    "network_dim": "lora_rank",
    "network_alpha": "lora_alpha",
    "rank": "lora_rank",
    "conv_dim": "conv_rank",
    "train_batch_size": "batch_size",
    "max_train_epochs": "epochs",
    "num_train_epochs": "epochs",
    "save_every_n_steps": "save_steps",
    "optimizer_type": "optimizer",
    "network_weights": "init_lora",
    "in_json": "metadata_path",
    "num_repeats": "repeats",
}


def option(default: Any, section: str, help: str, *, choices: tuple = (), min: float | None = None,
           max: float | None = None, runtime: bool = False, item: str = "text") -> Any:
    """A config field with its help text and limits kept beside it (as peft does); ``item`` is what a list holds
    (text, or a mapping of options)."""
    meta = {"section": section, "help": help, "choices": choices, "min": min, "max": max, "runtime": runtime,
            "item": item}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class TrainConfig:
    # -- model ---------------------------------------------------------------------------------
    task_type: str = option(
        "text-to-image", "model",
        "text-to-image: a Stable Diffusion LoRA; text-generation: an LLM LoRA (transformers + peft).",
        choices=("text-to-image", "text-generation"))
    load_in_4bit: bool = option(False, "model", "text-generation: load the base model in 4-bit NF4 (QLoRA; needs "
                                "bitsandbytes and a CUDA GPU).")
    base_model: str = option("", "model", "Base checkpoint: a .safetensors or .ckpt file, or a diffusers folder.")
    model_config: str = option(
        "", "model",
        "A diffusers folder whose config files describe the base model's architecture; "
        "empty uses the bundled config of the detected family.")
    family: str = option(
        "auto", "model", "Model family: sd1 (SD1.x), sd2 (SD2.x, 512 or 768-v) or sdxl (SDXL base); auto detects "
        "it from the checkpoint (anything else is refused with the reason).", choices=("auto", "sd1", "sd2", "sdxl"))
    prediction_type: str = option(
        "auto", "model", "What the UNet predicts. auto: what the checkpoint says (a v_pred key, the .yaml beside it, "
        "the model config; an SD2 checkpoint that says nothing is tested as A1111 does), else epsilon. Set "
        "v_prediction for SD2 768-v models.", choices=("auto", "epsilon", "v_prediction"))
    clip_skip: int = option(1, "model", "Use the output of the Nth-from-last text encoder layer (1 = last).",
                            min=1, max=12)
    # -- data ----------------------------------------------------------------------------------
    train_data_dir: str = option("", "data", "Folder of training images (sub-folders named like 10_name repeat 10x).")
    metadata_path: str = option(
        "", "data", "Captions file: metadata.csv (filename,prompt) or metadata.jsonl (file_name,text); "
        "empty looks for one in train_data_dir, then for sidecar .txt files.")
    caption_extension: str = option(".txt", "data", "Extension of sidecar caption files.")
    repeats: int = option(1, "data", "How often each image is seen per epoch (a 10_name folder overrides it).",
                          min=1, max=10000)
    resolution: int = option(512, "data", "Training resolution in pixels (the area of each bucket): 512 for SD1 "
                             "and SD2-512, 768 for SD2 768-v, 1024 for SDXL.", min=64, max=4096)
    enable_bucket: bool = option(True, "data", "Group images by aspect ratio instead of cropping them square.")
    min_bucket_reso: int = option(256, "data", "Smallest bucket side in pixels.", min=8, max=4096)
    max_bucket_reso: int = option(1024, "data", "Largest bucket side in pixels.", min=8, max=8192)
    bucket_reso_steps: int = option(64, "data", "Bucket sides are multiples of this (at least 8).", min=8, max=512)
    bucket_no_upscale: bool = option(False, "data", "Never upscale a small image to fill its bucket.")
    flip_aug: bool = option(False, "data", "Also train on horizontally mirrored images.")
    shuffle_caption: bool = option(False, "data", "Shuffle comma-separated tags of each caption every step.")
    keep_tokens: int = option(0, "data", "With shuffle_caption: keep the first N tags in place.", min=0, max=75)
    caption_dropout_rate: float = option(0.0, "data", "Probability of training a step with an empty caption.",
                                         min=0.0, max=1.0)
    trigger_word: str = option("", "data", "Word put first in every caption (and into name.json's activation text).")
    caption_prefix: str = option("", "data", "Text put before every caption (after the trigger word).")
    cache_latents: bool = option(True, "data", "Encode each image once before training (much faster).")
    cache_latents_to_disk: bool = option(
        False, "data", "Keep the encoded latents (and masks) in files under cache_dir instead of memory: memory stays "
        "flat with dataset size, and later runs and resumes reuse them. A changed image, resolution, bucket or "
        "model encodes again.")
    cache_text_encoder_outputs_to_disk: bool = option(
        False, "data", "Keep the text encoder's outputs per caption in files under cache_dir (only when captions do "
        "not change between steps and the text encoder is not trained).")
    cache_dir: str = option("", "data", "Folder of the disk caches; empty: <output_dir>/.cache.")
    reg_data_dir: str = option(
        "", "data", "Folder of regularization (class) images for DreamBooth-style prior preservation "
        "(sub-folders named like 1_person repeat). Each epoch sees as many regularization images as training images, "
        "as kohya does; their loss is weighted by prior_loss_weight.")
    subsets: list = option(
        [], "data", "Several image folders in one run: a list of mappings, each with image_dir and any of num_repeats, "
        "is_reg, is_validation, class_tokens (the caption of images that have none), caption_extension, metadata_file, "
        "trigger_word, caption_prefix, caption_suffix, shuffle_caption, keep_tokens, caption_dropout_rate, flip_aug, "
        "alpha_mask, mask_dir (kohya's [[datasets.subsets]] keys); unset keys take the values above. Used instead of "
        "train_data_dir and reg_data_dir.", item="mapping")
    dataset_config: str = option(
        "", "data", "A kohya dataset config (.toml or .json with [general], [[datasets]] and [[datasets.subsets]]), "
        "used as it is: it replaces train_data_dir, reg_data_dir and subsets, and its values override the options "
        "here, as in kohya.")
    masked_loss: bool = option(
        False, "data", "Weight the loss per pixel by a mask: white trains, black is ignored. The mask is the image "
        "of the same name in mask_dir, else the image's alpha channel.")
    mask_dir: str = option("", "data", "Folder of mask images named like the training images (with masked_loss).")
    alpha_mask: bool = option(False, "data", "Use each image's alpha channel as its loss mask (kohya's alpha_mask).")
    validation_split: float = option(
        0.0, "data", "Share of the training images held out to measure validation loss (chosen with the seed; "
        "0 = none).", min=0.0, max=0.9)
    validation_data_dir: str = option("", "data", "A folder of validation images (with captions), instead of or "
                                      "beside validation_split.")
    max_seq_length: int = option(512, "data", "text-generation: tokens per training sequence.", min=8, max=1_000_000)
    # -- network -------------------------------------------------------------------------------
    network: str = option(
        "lora", "network", "lora: low-rank update of the attention and feed-forward layers; locon: also the conv "
        "layers; loha: Hadamard product of two low-rank pairs (LyCORIS LoHa, attention and conv layers); lokr: "
        "Kronecker product (LyCORIS LoKr, attention and conv layers, see lokr_factor); dora: lora with weight "
        "decomposition (DoRA: a trained magnitude per input channel). All load in A1111, Forge and ComfyUI.",
        choices=("lora", "locon", "loha", "lokr", "dora"))
    lora_rank: int = option(16, "network", "LoRA rank (dim): capacity and file size.", min=1, max=1024)
    lora_alpha: Optional[float] = option(
        None, "network", "LoRA alpha; the update is scaled by alpha/rank. Empty: same as lora_rank (scale 1).",
        min=0.0, max=4096.0)
    conv_rank: Optional[int] = option(None, "network", "Rank of the conv layers (locon, loha, lokr). Empty: same as "
                                      "lora_rank.", min=1, max=1024)
    conv_alpha: Optional[float] = option(None, "network", "Alpha of the conv layers (locon, loha, lokr). Empty: same "
                                         "as conv_rank.", min=0.0, max=4096.0)
    lokr_factor: int = option(
        -1, "network", "lokr: split each side of a weight into two factors, the smaller at most this (LyCORIS "
        "'factor'); -1: as balanced as possible. A rank at or above half the larger factor stores that factor as a "
        "full matrix (then alpha is ignored, as in LyCORIS).", min=-1, max=4096)
    network_dropout: float = option(0.0, "network", "lora/locon: dropout on each layer's LoRA output while "
                                    "training (0.1 is usual; 0 = off).", min=0.0, max=0.9)
    rank_dropout: float = option(0.0, "network", "lora/locon: drop this share of the rank channels per step.",
                                 min=0.0, max=0.9)
    module_dropout: float = option(0.0, "network", "lora/locon: skip a whole LoRA layer with this probability per "
                                   "step.", min=0.0, max=0.9)
    train_text_encoder: bool = option(
        False, "network", "Also train LoRA on the text encoder(s) (SDXL: both). Text embeddings are then computed "
        "every step instead of once; costs memory and time.")
    target_modules: list = option([], "network", "text-generation: module names to adapt (empty: chosen per "
                                  "architecture, e.g. q_proj,k_proj,v_proj,o_proj for LLaMA).")
    init_lora: str = option("", "network", "Start from the weights of an existing LoRA file instead of zeros.")
    # -- optim ---------------------------------------------------------------------------------
    optimizer: str = option("adamw", "optim", "adamw, adamw8bit (needs bitsandbytes) or prodigy (needs prodigyopt).",
                            choices=("adamw", "adamw8bit", "prodigy"))
    learning_rate: float = option(1e-4, "optim", "Learning rate (use 1.0 with prodigy).", min=0.0, max=10.0)
    text_encoder_lr: Optional[float] = option(
        None, "optim", "Learning rate of the text-encoder LoRA (with train_text_encoder); often lower than "
        "learning_rate, e.g. 5e-5. Empty: learning_rate.", min=0.0, max=10.0)
    weight_decay: float = option(0.01, "optim", "Decoupled weight decay.", min=0.0, max=10.0)
    max_grad_norm: float = option(1.0, "optim", "Clip gradients to this norm (0 = no clipping).", min=0.0, max=1e6)
    lr_scheduler: str = option(
        "constant", "optim", "Learning-rate schedule.",
        choices=("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"))
    lr_warmup_steps: int = option(0, "optim", "Steps of linear warm-up at the start.", min=0, max=10_000_000)
    lr_scheduler_num_cycles: int = option(1, "optim", "Restarts for cosine_with_restarts.", min=1, max=1000)
    gradient_accumulation_steps: int = option(1, "optim", "Add up gradients over N batches per optimizer step.",
                                              min=1, max=1024)
    mixed_precision: str = option("no", "optim", "Compute in fp16 or bf16 (LoRA weights stay fp32).",
                                  choices=("no", "fp16", "bf16"))
    gradient_checkpointing: bool = option(False, "optim", "Trade compute for memory in the UNet.")
    noise_offset: float = option(0.0, "optim", "Offset noise strength (darker darks, brighter brights).",
                                 min=0.0, max=1.0)
    min_snr_gamma: float = option(0.0, "optim", "Min-SNR loss weighting gamma (5 is usual; 0 = off).",
                                  min=0.0, max=100.0)
    loss_type: str = option(
        "l2", "optim", "Loss between prediction and target: l2 (squared error), l1, huber or smooth_l1 (robust to "
        "outliers; see huber_c and huber_schedule).", choices=("l2", "l1", "huber", "smooth_l1"))
    huber_c: float = option(0.1, "optim", "Threshold of the huber and smooth_l1 losses.", min=0.0001, max=10.0)
    huber_schedule: str = option(
        "snr", "optim", "How huber_c changes with the timestep: snr (larger where the noise is low), exponential, "
        "or constant.", choices=("snr", "exponential", "constant"))
    min_timestep: int = option(0, "optim", "Smallest diffusion timestep trained (0-999).", min=0, max=999)
    max_timestep: int = option(1000, "optim", "Train timesteps below this (1-1000).", min=1, max=1000)
    debiased_estimation_loss: bool = option(False, "optim", "Weight the loss by 1/sqrt(SNR) (debiased estimation; "
                                            "1/(SNR+1) for v-prediction).")
    zero_terminal_snr: bool = option(False, "optim", "Rescale the noise schedule so the last timestep is pure noise "
                                     "(Lin et al. 2023; meant for v-prediction models).")
    prior_loss_weight: float = option(1.0, "optim", "Loss weight of the regularization images.", min=0.0, max=100.0)
    scale_weight_norms: float = option(0.0, "optim", "lora/locon: after each step, scale down every layer whose "
                                       "change (up @ down * alpha/rank) has a norm above this (1 is usual; 0 = off).",
                                       min=0.0, max=100.0)
    ip_noise_gamma: float = option(0.0, "optim", "Input perturbation: extra noise in the model's input that the "
                                   "target does not contain (0.1 is usual; 0 = off).", min=0.0, max=1.0)
    multires_noise_iterations: int = option(0, "optim", "Pyramid (multi-resolution) noise levels added to the "
                                            "noise (6-10 is usual; 0 = off).", min=0, max=20)
    multires_noise_discount: float = option(0.3, "optim", "Weight of each further pyramid noise level.",
                                            min=0.0, max=1.0)
    # -- schedule ------------------------------------------------------------------------------
    batch_size: int = option(1, "schedule", "Images per batch.", min=1, max=1024)
    epochs: int = option(10, "schedule", "Passes over the dataset (ignored when max_train_steps is set).",
                         min=1, max=100_000)
    max_train_steps: int = option(0, "schedule", "Total optimizer steps; 0 = derive from epochs.",
                                  min=0, max=10_000_000)
    seed: int = option(42, "schedule", "Random seed: same seed, same data and config -> same LoRA.",
                       min=0, max=2**31 - 1)
    save_steps: int = option(0, "schedule", "Save a resumable checkpoint every N steps (0 = only at the end).",
                             min=0, max=10_000_000)
    keep_checkpoints: int = option(3, "schedule", "Keep only the newest N checkpoints (0 = keep all).",
                                   min=0, max=100_000)
    # -- sample --------------------------------------------------------------------------------
    sample_prompts: list = option([], "sample", "Prompts to render while training (and for the preview image).")
    sample_every_n_steps: int = option(0, "sample", "Render sample_prompts every N steps (0 = only at the end).",
                                       min=0, max=10_000_000)
    sample_negative_prompt: str = option("", "sample", "Negative prompt for the samples.")
    sample_steps: int = option(20, "sample", "Sampling steps per sample image.", min=1, max=500)
    sample_guidance_scale: float = option(7.0, "sample", "Classifier-free guidance scale for samples.",
                                          min=0.0, max=50.0)
    sample_seed: int = option(1234, "sample", "Seed of the sample images (fixed, so samples are comparable).",
                              min=0, max=2**31 - 1)
    sample_at_end: bool = option(True, "sample", "Render sample_prompts once more after the last step (the first "
                                 "image becomes name.preview.png, the WebUI's card picture).")
    validate_every_n_steps: int = option(
        0, "sample", "Compute the validation loss every N steps (0 = at the end of each epoch); needs "
        "validation_split or validation_data_dir.", min=0, max=10_000_000)
    validation_seed: Optional[int] = option(None, "sample", "Seed of the validation split, noise and timesteps. "
                                            "Empty: seed.", min=0, max=2**31 - 1)
    final_check: str = option("quick", "sample", "Does-it-work check after the last step: quick (its weights "
                              "checked, and the loss with and without the LoRA on up to 4 fixed samples, as many as "
                              "keep it near 2% of the training time; none for a very short run), full (16 samples, and "
                              "a strength sweep image at 6 weights, strength_sweep.png) or off.",
                              choices=("quick", "full", "off"))
    # -- output --------------------------------------------------------------------------------
    output_dir: str = option("output", "output", "Where run folders are created.")
    output_name: str = option("", "output", "Name of the run and of the LoRA file (default: the config file's name).")
    save_precision: str = option("auto", "output", "Precision of the saved LoRA; auto: fp32, or the mixed precision.",
                                 choices=("auto", "fp32", "fp16", "bf16"))
    preferred_weight: float = option(0.7, "output", "Weight written to name.json for the WebUI's <lora:name:w>.",
                                     min=0.0, max=2.0)
    description: str = option("", "output", "Description written to name.json and the file's metadata.")
    log_with: str = option("none", "output", "tensorboard: also write TensorBoard event files (loss, lr, validation "
                           "loss) as training goes; needs the tensorboard package.", choices=("none", "tensorboard"))
    logging_dir: str = option("", "output", "Where TensorBoard logs go (one sub-folder per run); empty: the run "
                              "folder's tensorboard/.")
    # -- runtime (never saved with the run) -----------------------------------------------------
    device: str = option("auto", "runtime", "auto, cpu, cuda or cuda:N.", runtime=True)
    resume: str = option("", "runtime", "Run folder to resume from its last checkpoint.", runtime=True)

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> TrainConfig:
        """Validate ``values`` (from YAML, CLI or a form) and build a config; raise ConfigError naming the key."""
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: expected a mapping of option names to values, got {type(values).__name__}")
        flat = _flatten_sections(values, source)
        kwargs = {}
        for key, value in flat.items():
            name = _canonical_key(key, source)
            if name in kwargs:
                raise ConfigError(f"{source}: '{name}' is given twice (as '{key}' too); keep one")
            kwargs[name] = _coerce(FIELDS[name], value, source)
        config = cls(**kwargs)
        config._check_combinations(source)
        return config

    def to_dict(self, include_runtime: bool = False) -> dict:
        """Plain values, in schema order; runtime-only fields (device, resume) are left out unless asked."""
        out = {}
        for f in dataclasses.fields(self):
            if f.metadata["runtime"] and not include_runtime:
                continue
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, list) else value
        return out

    def replace(self, **changes: Any) -> TrainConfig:
        """A validated copy with some fields changed."""
        return TrainConfig.from_dict({**self.to_dict(include_runtime=True), **changes})

    def _check_combinations(self, source: str) -> None:
        required = ("base_model",) if self.subsets or self.dataset_config else ("base_model", "train_data_dir")
        missing = [k for k in required if not getattr(self, k)]
        if missing:
            raise ConfigError(f"{source}: '{missing[0]}' is required (set it in the YAML file or with --{missing[0]})")
        if self.min_bucket_reso > self.max_bucket_reso:
            raise ConfigError(f"{source}: min_bucket_reso ({self.min_bucket_reso}) is larger than "
                              f"max_bucket_reso ({self.max_bucket_reso})")
        if self.resolution % 8:
            raise ConfigError(f"{source}: 'resolution' must be a multiple of 8, got {self.resolution}")
        if self.bucket_reso_steps % 8:
            raise ConfigError(f"{source}: 'bucket_reso_steps' must be a multiple of 8, got {self.bucket_reso_steps}")
        if self.enable_bucket:  # before a run starts, not at its first step
            try:
                make_buckets(self.resolution, self.min_bucket_reso, self.max_bucket_reso, self.bucket_reso_steps)
            except ConfigError as exc:
                raise ConfigError(f"{source}: {exc}") from None
        lora_only = [k for k in ("network_dropout", "rank_dropout", "module_dropout", "scale_weight_norms")
                     if getattr(self, k)]
        if lora_only and self.network not in ("lora", "locon"):
            raise ConfigError(f"{source}: '{lora_only[0]}' works with network lora or locon, not {self.network}; "
                              "set it to 0 or change the network")
        if self.lokr_factor == 0:
            raise ConfigError(f"{source}: 'lokr_factor' must be -1 (balanced) or a factor of at least 1, got 0")
        if self.text_encoder_lr is not None and not self.train_text_encoder:
            logger.warning("text_encoder_lr=%g has no effect without train_text_encoder", self.text_encoder_lr)
        if self.keep_tokens and not self.shuffle_caption:
            logger.warning("keep_tokens=%d has no effect without shuffle_caption", self.keep_tokens)
        if self.output_name and not is_safe_name(self.output_name):
            raise ConfigError(f"{source}: 'output_name' {self.output_name!r} must be a plain file name: letters, "
                              "digits, spaces, '-', '_' or '.', without '/', '\\' or '..'")
        if self.min_timestep >= self.max_timestep:
            raise ConfigError(f"{source}: min_timestep ({self.min_timestep}) must be below max_timestep "
                              f"({self.max_timestep})")
        if self.validate_every_n_steps and not (self.validation_split or self.validation_data_dir):
            logger.warning("validate_every_n_steps=%d has no effect without validation_split or validation_data_dir",
                           self.validate_every_n_steps)
        if self.huber_schedule != "snr" or self.huber_c != 0.1:
            if self.loss_type not in ("huber", "smooth_l1"):
                logger.warning("huber_c and huber_schedule have no effect with loss_type %s", self.loss_type)
        if any(not isinstance(p, str) for p in self.sample_prompts):
            raise ConfigError(f"{source}: 'sample_prompts' must be a list of strings")


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_TYPES = typing.get_type_hints(TrainConfig)


def field_type(name: str) -> type:
    """The plain type of a field (``Optional[int]`` -> ``int``)."""
    kind = _TYPES[name]
    if typing.get_origin(kind) is typing.Union:
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    return kind


def is_safe_name(name: str) -> bool:
    """True for a name that stays a single file name on every OS (no separators, no '..', no control chars)."""
    if not name or name in (".", "..") or ".." in name or name.strip() != name:
        return False
    return all(c.isalnum() or c in " -_.+()[]" for c in name)


def fields_by_section() -> dict:
    """Section name -> list of dataclass fields, in schema order (for help text and the UI)."""
    out: dict = {s: [] for s in SECTIONS}
    for f in dataclasses.fields(TrainConfig):
        out[f.metadata["section"]].append(f)
    return out


def load_config_file(path: str | Path, overrides: dict | None = None) -> TrainConfig:
    """Read a YAML (or JSON) config file, apply ``overrides`` on top, validate."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; check the path")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (expected YAML)") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected 'key: value' lines, got a {type(values).__name__}")
    values = _flatten_sections(values, str(path))
    # Flags are checked on their own first, so a bad flag value is blamed on the command line, not the file.
    flags = {_canonical_key(k, "command line"): v for k, v in (overrides or {}).items()}
    flags = {name: _coerce(FIELDS[name], value, "command line") for name, value in flags.items()}
    return TrainConfig.from_dict({**values, **flags}, source=str(path))


def config_to_yaml(config: TrainConfig) -> str:
    """The resolved config as YAML, grouped by section with comments, loadable by ``load_config_file``."""
    import yaml

    values = config.to_dict()
    lines = []
    for section, fields in fields_by_section().items():
        chunk = {f.name: values[f.name] for f in fields if f.name in values}
        if chunk:
            lines.append(f"# {section}")
            lines.append(yaml.safe_dump(chunk, sort_keys=False, allow_unicode=True).rstrip())
    return "\n".join(lines) + "\n"


# -- parsing helpers ---------------------------------------------------------------------------

def _flatten_sections(values: dict, source: str) -> dict:
    flat = {}
    for key, value in values.items():
        if key in SECTIONS and isinstance(value, dict):
            for sub_key, sub_value in value.items():
                name = _canonical_key(sub_key, source)
                if FIELDS[name].metadata["section"] != key:
                    raise ConfigError(f"{source}: '{sub_key}' belongs in section "
                                      f"'{FIELDS[name].metadata['section']}', not '{key}'")
                flat[sub_key] = sub_value
        else:
            flat[key] = value
    return flat


def _canonical_key(key: Any, source: str) -> str:
    key = str(key).replace("-", "_")
    if key in FIELDS:
        return key
    if key in DEPRECATED_KEYS:
        logger.warning("%s: '%s' is read as '%s'; use '%s' to silence this warning",
                       source, key, DEPRECATED_KEYS[key], DEPRECATED_KEYS[key])
        return DEPRECATED_KEYS[key]
    close = difflib.get_close_matches(key, list(FIELDS) + list(DEPRECATED_KEYS), n=1, cutoff=0.6)
    hint = f"; did you mean '{DEPRECATED_KEYS.get(close[0], close[0])}'?" if close else ""
    raise ConfigError(f"{source}: unknown option '{key}'{hint} (run with --help for the list)")


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _coerce(f: dataclasses.Field, value: Any, source: str) -> Any:
    """Turn a YAML/CLI value into the field's type, or raise ConfigError naming the field."""
    name, meta = f.name, f.metadata
    kind = _TYPES[name]
    optional = typing.get_origin(kind) is typing.Union and type(None) in typing.get_args(kind)
    if optional:
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
            return None
    where = f"{source}: '{name}'"
    if kind is bool:
        if isinstance(value, bool):
            out = value
        elif isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            out = value.strip().lower() in _TRUE
        else:
            raise ConfigError(f"{where} must be true or false, got {value!r}")
    elif kind is int:
        out = _to_number(value, int, where, "a whole number")
    elif kind is float:
        out = _to_number(value, float, where, "a number")
    elif kind is str:
        if value is None:
            value = ""
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where} must be text, got a {type(value).__name__}")
        out = str(value)
        if isinstance(value, bool):  # YAML turns "yes"/"no" into booleans
            raise ConfigError(f"{where} must be text, got {value!r} (quote it)")
    elif kind is list:
        if value is None:
            value = []
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        if meta["item"] == "mapping":
            value = [_mapping_text(v, where) if isinstance(v, str) else v for v in value]
            bad = next((i for i, v in enumerate(value) if not isinstance(v, dict)), None)
            if bad is not None:
                raise ConfigError(f"{where} must be a list of mappings (image_dir: ..., num_repeats: ...); item "
                                  f"{bad + 1} is {value[bad]!r}")
            out = [dict(v) for v in value]
        else:
            out = [str(v) for v in value]
    else:  # pragma: no cover - a new field type needs a branch here
        raise TypeError(f"no coercion for {name}: {kind}")
    if meta["choices"] and out not in meta["choices"]:
        close = difflib.get_close_matches(str(out), [str(c) for c in meta["choices"]], n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"{where} must be one of {', '.join(meta['choices'])}; got {out!r}{hint}")
    if isinstance(out, (int, float)) and not isinstance(out, bool):
        lo, hi = meta["min"], meta["max"]
        if (lo is not None and out < lo) or (hi is not None and out > hi):
            raise ConfigError(f"{where} must be between {_fmt(lo)} and {_fmt(hi)}, got {_fmt(out)}")
    return out


def _mapping_text(text: str, where: str) -> Any:
    """A mapping written as text (a command-line flag: ``--subsets "{image_dir: a, num_repeats: 2}"``)."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"{where}: {text!r} is not a mapping; write it as {{image_dir: folder, num_repeats: 2}}") \
            from None


def _to_number(value: Any, kind: type, where: str, what: str) -> Any:
    if isinstance(value, bool):
        raise ConfigError(f"{where} must be {what}, got {value!r}")
    if isinstance(value, str):
        text = value.strip()
        try:
            value = float(text) if kind is float or any(c in text for c in ".eE") else int(text)
        except ValueError:
            raise ConfigError(f"{where} must be {what}, got {value!r}") from None
    if not isinstance(value, (int, float)):
        raise ConfigError(f"{where} must be {what}, got {value!r}")
    if value != value or value in (float("inf"), float("-inf")):
        raise ConfigError(f"{where} must be a finite number, got {value!r}")
    if kind is int:
        if float(value) != int(value):
            raise ConfigError(f"{where} must be {what}, got {value!r}")
        return int(value)
    return float(value)


def _fmt(number: Any) -> str:
    return f"{number:g}" if isinstance(number, float) else str(number)
