"""modules/script_callbacks.py: register callbacks; the WebUI calls them while building the UI, and
``app_started_callback(demo, app)`` once gradio's FastAPI app runs (demo is None under --nowebui)."""

callbacks_ui_tabs = []
callbacks_ui_settings = []
callbacks_script_unloaded = []
callbacks_app_started = []


def on_ui_tabs(callback):
    callbacks_ui_tabs.append(callback)


def on_ui_settings(callback):
    callbacks_ui_settings.append(callback)


def on_script_unloaded(callback):
    callbacks_script_unloaded.append(callback)


def on_app_started(callback):
    callbacks_app_started.append(callback)


def ui_tabs_callback():
    tabs = []
    for callback in callbacks_ui_tabs:
        tabs += callback() or []
    return tabs


def ui_settings_callback():
    for callback in callbacks_ui_settings:
        callback()


def script_unloaded_callback():
    for callback in callbacks_script_unloaded:
        callback()


def app_started_callback(demo, app):
    for callback in callbacks_app_started:
        callback(demo, app)
