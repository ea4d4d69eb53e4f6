"""modules/script_callbacks.py: register callbacks; the WebUI calls them while building the UI."""

callbacks_ui_tabs = []
callbacks_ui_settings = []
callbacks_script_unloaded = []


def on_ui_tabs(callback):
    callbacks_ui_tabs.append(callback)


def on_ui_settings(callback):
    callbacks_ui_settings.append(callback)


def on_script_unloaded(callback):
    callbacks_script_unloaded.append(callback)


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
