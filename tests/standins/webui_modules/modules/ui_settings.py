"""modules/ui_settings.py: the one rule of A1111 1.10's (and Forge's) settings page that stopped both real WebUIs.

``create_setting_component`` picks a default widget only for str, int and bool options; any other type (a float
default, say) without an explicit ``component`` raises, and the WebUI does not start (API mode included, since
``Api.__init__`` builds the UI too).
"""

import gradio as gr

from modules.shared import opts


def create_setting_component(key):
    info = opts.data_labels[key]
    value = opts.data[key] if key in opts.data else info.default
    kind = type(info.default)
    args = info.component_args() if callable(info.component_args) else info.component_args
    if info.component is not None:
        component = info.component
    elif kind is str:
        component = gr.Textbox
    elif kind is int:
        component = gr.Number
    elif kind is bool:
        component = gr.Checkbox
    else:
        raise Exception(f"bad options item type: {kind} for key {key}")
    return component(label=info.label, value=value, elem_id=f"setting_{key}", **(args or {}))


def create_settings_page():
    """Every registered option's component, as the Settings tab renders them."""
    return [create_setting_component(key) for key in opts.data_labels]
