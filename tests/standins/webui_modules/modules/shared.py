"""modules/shared.py: opts (settings), OptionInfo, cmd_opts, state and the lazily loaded sd_model."""

import json
import os
import types
from pathlib import Path

from standins.a1111 import State

models_path = os.environ.get("FAKE_WEBUI_MODELS", "models")
cmd_opts = types.SimpleNamespace(lora_dir=os.environ.get("FAKE_WEBUI_LORA_DIR", os.path.join(models_path, "Lora")),
                                 lowvram=False, medvram=False, api_auth=os.environ.get("FAKE_WEBUI_API_AUTH"))
state = State()


class OptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None,
                 refresh=None, comment_before="", comment_after="", infotext=None, restrict_api=False,
                 category_id=None):
        self.default, self.label, self.component, self.component_args = default, label, component, component_args
        self.section, self.category_id = section, category_id


class Options:
    def __init__(self):
        data = {"sd_model_checkpoint": Path(os.environ.get("FAKE_WEBUI_CHECKPOINT", "")).name}
        data.update(json.loads(os.environ.get("FAKE_WEBUI_OPTS", "{}")))  # what config.json holds
        object.__setattr__(self, "data", data)
        object.__setattr__(self, "data_labels", {})

    def add_option(self, key, info):
        self.data_labels[key] = info
        self.data.setdefault(key, info.default)

    def __getattr__(self, key):
        if key in self.data:
            return self.data[key]
        if key in self.data_labels:
            return self.data_labels[key].default
        raise AttributeError(key)

    def __setattr__(self, key, value):
        self.data[key] = value


opts = Options()


def __getattr__(name):
    """``shared.sd_model``: A1111 loads the checkpoint on first use (here the tiny one named by the env)."""
    if name == "sd_model":
        from modules import sd_models

        if sd_models.model_data.sd_model is None and os.environ.get("FAKE_WEBUI_CHECKPOINT"):
            from standins.a1111 import load_ldm_model

            sd_models.model_data.sd_model = load_ldm_model(Path(os.environ["FAKE_WEBUI_CHECKPOINT"]))
        return sd_models.model_data.sd_model
    raise AttributeError(name)
