"""Errors a user can cause through the training dataset: the folder, its images, captions or templates."""

from __future__ import annotations

from lib_training.errors import UserError


class DatasetError(UserError):
    """The dataset folder, an image or a caption file cannot be used; the message names the files."""


class TemplateError(DatasetError):
    """A prompt template that does not exist, cannot be read or has no prompt lines."""
