"""Which folders a run trains on, and with which options.

Three ways to say it, all resolved here into one ``Layout``: the plain keys (``train_data_dir``,
``reg_data_dir``, ``validation_data_dir``), the ``subsets`` list (one mapping per folder, kohya's subset keys),
or a kohya dataset config file (``dataset_config``: TOML or JSON with ``[general]``, ``[[datasets]]`` and
``[[datasets.subsets]]``), which kohya users bring unchanged. A ``Group`` is kohya's ``[[datasets]]``: the
images whose batches share a resolution, bucket rules and batch size. A ``Subset`` is one folder with its
caption, flip, mask and repeat options, and its role: training, regularization or validation.
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Dict, List, Tuple

from .buckets import make_buckets
from .config import TrainConfig
from .errors import ConfigError

ROLES = ("train", "reg", "val")


@dataclass(frozen=True)
class Group:
    """kohya's ``[[datasets]]``: batches never mix groups; each has its own size and buckets."""
    resolution: int
    batch_size: int
    enable_bucket: bool
    min_bucket_reso: int
    max_bucket_reso: int
    bucket_reso_steps: int
    bucket_no_upscale: bool


@dataclass(frozen=True)
class Subset:
    """One image folder and how its images train."""
    image_dir: str
    role: str = "train"  # train, reg (prior preservation) or val (validation loss only)
    repeats: int = 1
    folder_repeats: bool = True  # sub-folders named 10_name repeat 10x (train_data_dir style; kohya's subsets: no)
    caption_extension: str = ".txt"
    metadata_path: str = ""
    class_tokens: str = ""  # the caption of an image that has none (kohya)
    trigger_word: str = ""
    caption_prefix: str = ""
    caption_suffix: str = ""
    shuffle_caption: bool = False
    keep_tokens: int = 0
    caption_dropout_rate: float = 0.0
    flip_aug: bool = False
    mask: str = ""  # "" none, "alpha" the image's alpha channel, else a folder of mask images
    group: int = 0
    origin: str = "train_data_dir"  # the option that named the folder, for messages


@dataclass(frozen=True)
class Layout:
    groups: Tuple[Group, ...]
    subsets: Tuple[Subset, ...]
    validation_split: float
    validation_seed: int
    from_kohya_config: bool = False


# -- the subset options: kohya's names, with their types --------------------------------------------------------------
_SUBSET_OPTIONS: Dict[str, type] = {
    "image_dir": str, "num_repeats": int, "is_reg": bool, "class_tokens": str, "caption_extension": str,
    "metadata_file": str, "trigger_word": str, "caption_prefix": str, "caption_suffix": str, "shuffle_caption": bool,
    "keep_tokens": int, "caption_dropout_rate": float, "flip_aug": bool, "alpha_mask": bool, "mask_dir": str,
    "is_validation": bool,
}
_GROUP_OPTIONS: Dict[str, type] = {
    "resolution": int, "batch_size": int, "enable_bucket": bool, "min_bucket_reso": int, "max_bucket_reso": int,
    "bucket_reso_steps": int, "bucket_no_upscale": bool, "validation_split": float, "validation_seed": int,
}
# kohya options this trainer does not implement: accepted at their "off" value, refused otherwise (silently ignoring
# them would train something other than what the file says).
_UNSUPPORTED_OFF: Dict[str, Any] = {
    "color_aug": False, "random_crop": False, "face_crop_aug_range": None, "caption_separator": ",",
    "keep_tokens_separator": "", "secondary_separator": None, "enable_wildcard": False, "caption_tag_dropout_rate": 0.0,
    "caption_dropout_every_n_epochs": 0, "token_warmup_min": 1, "token_warmup_step": 0, "resize_interpolation": None,
    "conditioning_data_dir": None, "cache_info": None, "debug_dataset": False,
}
_ALIASES = {"repeats": "num_repeats", "metadata_path": "metadata_file", "train_data_dir": "image_dir",
            "conditioning_data_dir": "mask_dir"}


def build_layout(config: TrainConfig) -> Layout:
    """The run's folders from the config: a kohya dataset config, else ``subsets``, else the plain keys."""
    seed = config.seed if config.validation_seed is None else config.validation_seed
    base_group = _group_from(config, {}, "config")
    if config.dataset_config:
        return _from_kohya_file(config, Path(config.dataset_config).expanduser(), seed)
    if config.subsets:
        subsets = tuple(_subset_from(config, dict(item), {}, 0, f"subsets item {n + 1}", kohya_style=False)
                        for n, item in enumerate(config.subsets))
    else:
        subsets = (Subset(**_plain_options(config), image_dir=config.train_data_dir, repeats=config.repeats),)
        if config.reg_data_dir:
            subsets += (Subset(**_plain_options(config), image_dir=config.reg_data_dir, role="reg",
                               origin="reg_data_dir"),)
    if config.validation_data_dir:
        subsets += (Subset(**_plain_options(config), image_dir=config.validation_data_dir, role="val",
                           origin="validation_data_dir"),)
    return Layout((base_group,), subsets, config.validation_split, seed)


def _plain_options(config: TrainConfig) -> Dict[str, Any]:
    return dict(caption_extension=config.caption_extension, metadata_path=config.metadata_path,
                trigger_word=config.trigger_word, caption_prefix=config.caption_prefix,
                shuffle_caption=config.shuffle_caption, keep_tokens=config.keep_tokens,
                caption_dropout_rate=config.caption_dropout_rate, flip_aug=config.flip_aug,
                mask=_mask_source(config.masked_loss, config.alpha_mask, config.mask_dir))


def _mask_source(masked_loss: bool, alpha_mask: bool, mask_dir: str) -> str:
    if mask_dir and (masked_loss or not alpha_mask):
        return mask_dir
    return "alpha" if (alpha_mask or masked_loss) else ""


def _subset_from(config: TrainConfig, item: Dict[str, Any], inherited: Dict[str, Any], group: int, where: str,
                 kohya_style: bool) -> Subset:
    run_wide = next((key for key in item if key in _GROUP_OPTIONS), None)
    if run_wide is not None:  # kohya's subsets never hold them either: they belong to [[datasets]]
        raise ConfigError(f"{where}: '{run_wide}' applies to the whole run, not one folder; set it beside 'subsets' "
                          "(or use a kohya dataset_config with several [[datasets]])")
    values = {**inherited, **_checked(item, _SUBSET_OPTIONS, where)}
    image_dir = values.get("image_dir", "")
    if not str(image_dir).strip():
        raise ConfigError(f"{where}: 'image_dir' is required (the folder of this subset's images)")
    if values.get("is_reg") and values.get("is_validation"):
        raise ConfigError(f"{where}: a folder is either is_reg or is_validation, not both")
    role = "reg" if values.get("is_reg") else "val" if values.get("is_validation") else "train"
    repeats = values.get("num_repeats", 1 if kohya_style else config.repeats)
    if repeats < 1:
        raise ConfigError(f"{where}: 'num_repeats' must be at least 1, got {repeats}")
    keep_tokens = values.get("keep_tokens", config.keep_tokens)
    dropout = values.get("caption_dropout_rate", config.caption_dropout_rate)
    if keep_tokens < 0 or not 0.0 <= dropout <= 1.0:
        raise ConfigError(f"{where}: keep_tokens must be 0 or more and caption_dropout_rate between 0 and 1")
    return Subset(
        image_dir=str(image_dir), role=role, repeats=repeats, folder_repeats=not kohya_style,
        caption_extension=values.get("caption_extension", config.caption_extension),
        metadata_path=values.get("metadata_file", "" if kohya_style else config.metadata_path),
        class_tokens=values.get("class_tokens", ""),
        trigger_word=values.get("trigger_word", "" if kohya_style else config.trigger_word),
        caption_prefix=values.get("caption_prefix", "" if kohya_style else config.caption_prefix),
        caption_suffix=values.get("caption_suffix", ""),
        shuffle_caption=values.get("shuffle_caption", config.shuffle_caption),
        keep_tokens=keep_tokens, caption_dropout_rate=dropout,
        flip_aug=values.get("flip_aug", config.flip_aug),
        mask=_mask_source(config.masked_loss, values.get("alpha_mask", config.alpha_mask),
                          values.get("mask_dir", config.mask_dir)),
        group=group, origin=f"image_dir of {where.rsplit(' ', 1)[-1] if kohya_style else where}")


def _checked(item: Dict[str, Any], allowed: Dict[str, type], where: str) -> Dict[str, Any]:
    """``item`` with kohya's aliases resolved, every key known and every value of its type; else one clear line."""
    out: Dict[str, Any] = {}
    for key, value in item.items():
        key = _ALIASES.get(str(key), str(key))
        if key in _UNSUPPORTED_OFF:
            if value not in (_UNSUPPORTED_OFF[key], None, False, 0, "", ","):
                raise ConfigError(f"{where}: '{key}' = {value!r} is a kohya option this trainer does not implement; "
                                  "remove it (or set it off) to train")
            continue
        if key not in allowed:
            close = difflib.get_close_matches(key, list(allowed) + list(_GROUP_OPTIONS), n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{where}: unknown option '{key}'{hint}")
        out[key] = _typed(value, allowed[key], f"{where}: '{key}'")
    return out


def _typed(value: Any, kind: type, where: str) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if not (isinstance(value, float) and value.is_integer()):
                raise ConfigError(f"{where} must be a whole number, got {value!r}")
        return int(value)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f"{where} must be text, got {value!r}")
    return value


# -- kohya's dataset config -------------------------------------------------------------------------------------------
def read_kohya_config(path: Path) -> Dict[str, Any]:
    """The file as a mapping: TOML (tomllib on Python 3.11+, the ``toml`` package on 3.10, as lycoris needs it) or
    JSON."""
    if not path.is_file():
        raise ConfigError(f"dataset_config {path} does not exist; check the path")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read as UTF-8 text ({exc})") from None
    if path.suffix.lower() == ".json":
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} line {exc.lineno}: not valid JSON ({exc.msg})") from None
    else:
        values = _parse_toml(path, text)
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected [general] and [[datasets]] tables")
    return values


def _parse_toml(path: Path, text: str) -> Any:
    try:
        import tomllib  # novermin (Python 3.11+; 3.10 takes the except branch)

        error: Tuple[type, ...] = (tomllib.TOMLDecodeError,)
        loads = tomllib.loads
    except ImportError:  # Python 3.10 (A1111): the toml package, which lycoris-lora already requires
        import toml

        error, loads = (toml.TomlDecodeError,), toml.loads
    try:
        return loads(text)
    except error as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc}); kohya's dataset config README shows the format") from None


def _from_kohya_file(config: TrainConfig, path: Path, seed: int) -> Layout:
    values = read_kohya_config(path)
    unknown = set(values) - {"general", "datasets"}
    if unknown:
        raise ConfigError(f"{path}: unknown table '{sorted(unknown)[0]}' (a dataset config has [general] and "
                          "[[datasets]])")
    general = values.get("general", {})
    datasets = values.get("datasets", [])
    if not isinstance(general, dict) or not isinstance(datasets, list) or not datasets:
        raise ConfigError(f"{path}: needs at least one [[datasets]] table with [[datasets.subsets]]")
    general_group = _split_group_options(general, f"{path} [general]")
    groups, subsets, splits = [], [], []
    for g, dataset in enumerate(datasets):
        where = f"{path} datasets[{g}]"
        if not isinstance(dataset, dict):
            raise ConfigError(f"{where}: expected a table")
        items = dataset.get("subsets", [])
        if not isinstance(items, list) or not items:
            raise ConfigError(f"{where}: has no [[datasets.subsets]]; add one with image_dir")
        own = {k: v for k, v in dataset.items() if k != "subsets"}
        group_values = {**general_group[0], **_split_group_options(own, where)[0]}
        inherited = {**general_group[1], **_split_group_options(own, where)[1]}
        groups.append(_group_from(config, group_values, where))
        splits.append(group_values.get("validation_split", config.validation_split))
        for s, item in enumerate(items):
            if not isinstance(item, dict):
                raise ConfigError(f"{where}.subsets[{s}]: expected a table")
            subsets.append(_subset_from(config, item, inherited, g, f"{where}.subsets[{s}]", kohya_style=True))
    split = max(splits)
    if len(set(splits)) > 1:
        raise ConfigError(f"{path}: validation_split differs between datasets ({', '.join(map(str, splits))}); this "
                          "trainer holds out one share of all training images: give one value in [general]")
    return Layout(tuple(groups), tuple(subsets), split, general.get("validation_seed", seed), from_kohya_config=True)


def _split_group_options(values: Dict[str, Any], where: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(dataset options, subset options inherited by every subset below), each checked."""
    others = {k: v for k, v in values.items() if k != "resolution"}
    checked = _checked(others, {**_GROUP_OPTIONS, **_SUBSET_OPTIONS}, where)
    for key in ("image_dir", "is_reg", "class_tokens", "metadata_file", "is_validation"):
        if key in checked:
            raise ConfigError(f"{where}: '{key}' belongs in a [[datasets.subsets]] table")
    if "resolution" in values:
        checked["resolution"] = _resolution(values["resolution"], f"{where}: 'resolution'")
    group = {k: v for k, v in checked.items() if k in _GROUP_OPTIONS}
    return group, {k: v for k, v in checked.items() if k not in _GROUP_OPTIONS}


def _resolution(value: Any, where: str) -> int:
    """kohya's ``resolution``: a number or [width, height]; buckets here are sized by area, so [w, h] becomes the side
    of the square of the same area."""
    if isinstance(value, (list, tuple)):
        if len(value) == 1:
            value = value[0]
        elif len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            value = int(round(math.sqrt(value[0] * value[1]) / 8) * 8)
        else:
            raise ConfigError(f"{where} must be a number or [width, height], got {value!r}")
    return _typed(value, int, where)


def _group_from(config: TrainConfig, values: Dict[str, Any], where: str) -> Group:
    group = Group(resolution=config.resolution, batch_size=config.batch_size, enable_bucket=config.enable_bucket,
                  min_bucket_reso=config.min_bucket_reso, max_bucket_reso=config.max_bucket_reso,
                  bucket_reso_steps=config.bucket_reso_steps, bucket_no_upscale=config.bucket_no_upscale)
    changes = {f.name: values[f.name] for f in fields(Group) if f.name in values}
    group = replace(group, **changes)
    if group.batch_size < 1 or group.resolution < 64 or group.resolution % 8:
        raise ConfigError(f"{where}: batch_size must be at least 1 and resolution a multiple of 8 of at least 64 "
                          f"(got {group.batch_size}, {group.resolution})")
    if group.min_bucket_reso > group.max_bucket_reso or group.bucket_reso_steps % 8:
        raise ConfigError(f"{where}: min_bucket_reso must not exceed max_bucket_reso, and bucket_reso_steps must be a "
                          "multiple of 8")
    if group.enable_bucket:
        try:
            make_buckets(group.resolution, group.min_bucket_reso, group.max_bucket_reso, group.bucket_reso_steps)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    return group


# -- kohya's rule for regularization images ---------------------------------------------------------------------------
def balanced_reg_repeats(train_samples: int, reg_repeats: List[int]) -> List[int]:
    """How often each regularization image is seen per epoch, as kohya's DreamBooth dataset decides: images in order
    with their own repeats until they match the training samples (later ones unused), and if all of them are too
    few, one more round each, in order, until they match. The epoch then holds as many of each kind."""
    out = [0] * len(reg_repeats)
    if not reg_repeats or train_samples <= 0:
        return out
    seen, first = 0, True
    while seen < train_samples:
        for i, repeats in enumerate(reg_repeats):
            add = repeats if first else 1
            out[i] += add
            seen += add
            if seen >= train_samples:
                break
        first = False
    return out


def validation_indices(candidates: List[int], share: float, seed: int) -> List[int]:
    """The seeded share of ``candidates`` held out for validation (at least one, and at least one left to train)."""
    import random

    if share <= 0 or len(candidates) < 2:
        return []
    count = min(len(candidates) - 1, max(1, round(len(candidates) * share)))
    return sorted(random.Random(f"{seed}:validation").sample(sorted(candidates), count))
