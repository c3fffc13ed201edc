"""Exceptions whose message is meant for the user.

Every error that a user can cause (a bad file, a bad setting, a bad dataset) is raised as one of
these, with a message that names the problem and, where there is one, the fix. The UI, CLI and
HTTP API show `str(error)` as it is; anything else is a bug and is shown with its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input, explained in the message."""


class CheckpointError(UserError):
    """A model file that cannot be read, or is not what it should be."""


class ConfigError(UserError):
    """An invalid setting."""
