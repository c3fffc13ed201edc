"""sd-webui-training in AUTOMATIC1111 / Forge: the Training and Merge tabs, a settings section, the HTTP API.

The WebUI imports this file with the extension's folder on `sys.path` (and again on "Reload UI");
everything lives in `lib_training.hosts.extension`, which is imported once per process.
"""

from modules import script_callbacks

from lib_training.hosts import extension

script_callbacks.on_ui_tabs(extension.ui_tabs)
script_callbacks.on_ui_settings(extension.ui_settings)
script_callbacks.on_app_started(extension.app_started)
script_callbacks.on_script_unloaded(extension.script_unloaded)
