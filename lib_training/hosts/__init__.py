"""Adapters for the WebUIs that host the extension: AUTOMATIC1111 (1.10) and Forge.

Each adapter builds the model interface (`lib_training.model.diffusion.DiffusionModel`) from the model
the WebUI has loaded, inside a *session* that prepares that model for training and restores it
exactly afterwards. `exclusive.run_exclusive` holds the WebUI's queue lock for a whole job and
reports through its progress state; `workspace.WebUIWorkspace` says where results go and makes
them usable at once; `extension` is what `scripts/sd_webui_training.py` registers.

Host modules (`modules.*`, `backend.*`, `ldm.*`, `sgm.*`) are imported only inside functions, so
this package imports without a WebUI. Nothing else in `lib_training` imports it.
"""
