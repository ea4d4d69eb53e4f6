"""Form fields generated from TrainConfig's schema, and the conversions between form values and config values.

Each field's metadata picks its widget: choices -> dropdown, bool -> checkbox, int/float -> number,
list -> text box with one item per line; Optional numbers are text boxes so that "empty" means "default".
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, List, Sequence

from ..config import FIELDS, TrainConfig, field_type
from ..errors import ConfigError

MAIN_FIELDS = ("output_name", "lora_rank", "lora_alpha", "max_train_steps", "epochs", "learning_rate", "batch_size",
               "resolution")
# Set by other parts of the tab (dataset, model, trigger) or meaningless in it (LLM task, --resume).
ELSEWHERE = ("task_type", "base_model", "train_data_dir", "trigger_word", "resume", "max_seq_length",
             "target_modules")
ADVANCED_FIELDS = tuple(name for name in FIELDS if name not in MAIN_FIELDS + ELSEWHERE)
FORM_FIELDS = MAIN_FIELDS + ADVANCED_FIELDS
# The Advanced panel's groups, in TrainConfig's sections; the optimizer section's noise and loss options get their own.
NOISE_AND_LOSS = ("noise_offset", "min_snr_gamma", "ip_noise_gamma", "multires_noise_iterations",
                  "multires_noise_discount", "loss_type", "huber_c", "huber_schedule", "min_timestep", "max_timestep",
                  "debiased_estimation_loss", "zero_terminal_snr")
# kohya's dataset features: regularization images, several folders, validation, masks.
DATASETS = ("reg_data_dir", "prior_loss_weight", "subsets", "dataset_config", "validation_split",
            "validation_data_dir", "validate_every_n_steps", "validation_seed", "masked_loss", "mask_dir", "alpha_mask")
GROUP_OF_SECTION = {"model": "Model", "data": "Data", "network": "Network", "optim": "Optimizer",
                    "schedule": "Schedule and checkpoints", "sample": "Sampling and the final check",
                    "output": "Output", "runtime": "Runtime"}


def advanced_groups() -> List[tuple]:
    """(group label, field names) for the Advanced panel, every advanced field exactly once, in schema order."""
    groups: dict = {}
    for name in ADVANCED_FIELDS:
        if name in NOISE_AND_LOSS:
            label = "Noise and loss"
        elif name in DATASETS:
            label = "Regularization, more folders, validation, masks"
        else:
            label = GROUP_OF_SECTION[FIELDS[name].metadata["section"]]
        groups.setdefault(label, []).append(name)
    return list(groups.items())


@dataclass(frozen=True)
class FieldSpec:
    name: str
    kind: str  # "dropdown" | "checkbox" | "number" | "text" | "lines"
    label: str
    help: str
    default: Any  # the form value
    choices: tuple = ()
    integer: bool = False
    minimum: Any = None
    maximum: Any = None


def _optional(name: str) -> bool:
    hint = typing.get_type_hints(TrainConfig)[name]
    return typing.get_origin(hint) is typing.Union and type(None) in typing.get_args(hint)


def field_spec(name: str, defaults: dict) -> FieldSpec:
    f = FIELDS[name]
    meta, kind = f.metadata, field_type(name)
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    default = defaults.get(name, default)
    label = name.replace("_", " ")
    if meta["choices"]:
        widget = "dropdown"
    elif kind is bool:
        widget = "checkbox"
    elif kind is list:
        widget = "lines"
    elif kind in (int, float) and not _optional(name):
        widget = "number"
    else:
        widget = "text"
    return FieldSpec(name, widget, label, meta["help"], to_form_value(name, default), tuple(meta["choices"]),
                     kind is int, meta["min"], meta["max"])


def field_specs(names: Sequence[str], defaults: dict) -> List[FieldSpec]:
    return [field_spec(n, defaults) for n in names]


def to_form_value(name: str, value: Any) -> Any:
    """A config value as its widget shows it."""
    kind = field_type(name)
    if FIELDS[name].metadata["item"] == "mapping":  # a list of mappings is edited as YAML
        import yaml

        return yaml.safe_dump(list(value), sort_keys=False, allow_unicode=True) if value else ""
    if kind is list:
        return "\n".join(str(v) for v in value or [])
    if value is None:
        return ""
    if _optional(name) or kind is str:
        return str(value) if not isinstance(value, float) else f"{value:g}"
    return value


def from_form_value(name: str, value: Any) -> Any:
    """A widget's value as TrainConfig.from_dict takes it (it validates and converts the rest)."""
    kind = field_type(name)
    if FIELDS[name].metadata["item"] == "mapping":
        import yaml

        try:
            return yaml.safe_load(str(value or "")) or []
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"'{name}'{where}: not valid YAML ({getattr(exc, 'problem', exc)}); write one "
                              "'- image_dir: ...' entry per folder") from None
    if kind is list:
        return [line.strip() for line in str(value or "").splitlines() if line.strip()]
    if isinstance(value, str):
        value = value.strip()
        if value == "" and _optional(name):
            return None
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def form_values(config: TrainConfig, names: Sequence[str] = FORM_FIELDS) -> list:
    return [to_form_value(n, getattr(config, n)) for n in names]
