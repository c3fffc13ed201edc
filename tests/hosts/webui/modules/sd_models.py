"""Stand-in for `modules.sd_models`: the checkpoint list, and Forge's `forge_model_reload`."""

from modules import shared

list_calls = 0


def list_models():
    global list_calls
    list_calls += 1


def forge_model_reload():
    """Forge: (the loaded engine, whether it was reloaded now); loaded by the test already."""
    return shared.sd_model, False
