"""Presets: partial configs (YAML, the CLI's schema) under configs/presets/, shipped with the extension."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

from ..config import TrainConfig
from ..errors import ConfigError

PRESET_DIR = Path(__file__).resolve().parents[2] / "configs" / "presets"
_PLACEHOLDERS = {"base_model": "-", "train_data_dir": "-"}  # required keys a partial config does not carry


def list_presets(folder: Path = PRESET_DIR) -> List[str]:
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def read_partial_config(text: str, source: str) -> Dict:
    """{field: value} of a partial YAML config, validated and converted by TrainConfig; ConfigError if bad."""
    import yaml

    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected 'key: value' lines")
    flat: Dict = {}
    for key, value in values.items():  # sections (model: {...}) as load_config_file accepts them
        flat.update(value if isinstance(value, dict) else {key: value})
    config = TrainConfig.from_dict({**{k: v for k, v in _PLACEHOLDERS.items() if k not in flat}, **flat},
                                   source=source)
    given = {k.replace("-", "_") for k in flat}
    return {name: value for name, value in config.to_dict(include_runtime=True).items() if name in given}


def load_preset(name: str, folder: Path = PRESET_DIR) -> Dict:
    path = folder / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"no preset named {name!r}; choose one of {', '.join(list_presets(folder)) or '(none)'}")
    return read_partial_config(path.read_text(encoding="utf-8"), str(path))
