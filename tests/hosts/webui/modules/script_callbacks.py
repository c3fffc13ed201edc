"""Stand-in for `modules.script_callbacks`: registrars `on_X(callback, *, name=None)` and their firing."""

import dataclasses
import inspect


@dataclasses.dataclass
class ScriptCallback:
    script: str
    callback: object
    name: str = "unnamed"


callback_map = {
    "callbacks_app_started": [],
    "callbacks_model_loaded": [],
    "callbacks_ui_tabs": [],
    "callbacks_ui_train_tabs": [],
    "callbacks_ui_settings": [],
    "callbacks_script_unloaded": [],
    "callbacks_before_ui": [],
    "callbacks_on_reload": [],
}


def add_callback(callbacks, fun, *, name=None, category="unknown", filename=None):
    if filename is None:
        frames = [f for f in inspect.stack() if f.filename != __file__]
        filename = frames[0].filename if frames else "unknown file"
    callbacks.append(ScriptCallback(filename, fun, f"{filename}/{category}/{name or fun.__name__}"))


def clear_callbacks():
    for callbacks in callback_map.values():
        callbacks.clear()


def _each(category):
    return list(callback_map[f"callbacks_{category}"])


def app_started_callback(demo, app):
    for c in _each("app_started"):
        c.callback(demo, app)


def model_loaded_callback(sd_model):
    for c in _each("model_loaded"):
        c.callback(sd_model)


def ui_tabs_callback():
    tabs = []
    for c in _each("ui_tabs"):
        tabs += c.callback() or []
    return tabs


def ui_settings_callback():
    for c in _each("ui_settings"):
        c.callback()


def script_unloaded_callback():
    for c in reversed(_each("script_unloaded")):
        c.callback()


def on_app_started(callback, *, name=None):
    add_callback(callback_map["callbacks_app_started"], callback, name=name, category="app_started")


def on_model_loaded(callback, *, name=None):
    add_callback(callback_map["callbacks_model_loaded"], callback, name=name, category="model_loaded")


def on_ui_tabs(callback, *, name=None):
    add_callback(callback_map["callbacks_ui_tabs"], callback, name=name, category="ui_tabs")


def on_ui_train_tabs(callback, *, name=None):
    add_callback(callback_map["callbacks_ui_train_tabs"], callback, name=name, category="ui_train_tabs")


def on_ui_settings(callback, *, name=None):
    add_callback(callback_map["callbacks_ui_settings"], callback, name=name, category="ui_settings")


def on_script_unloaded(callback, *, name=None):
    add_callback(callback_map["callbacks_script_unloaded"], callback, name=name, category="script_unloaded")


def on_before_ui(callback, *, name=None):
    add_callback(callback_map["callbacks_before_ui"], callback, name=name, category="before_ui")


def on_before_reload(callback, *, name=None):
    add_callback(callback_map["callbacks_on_reload"], callback, name=name, category="on_reload")


def before_ui_callback():
    for c in _each("before_ui"):
        c.callback()
