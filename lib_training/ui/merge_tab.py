"""The Merge tab: a placeholder until the merge UI lands; it points to the command line meanwhile."""

from __future__ import annotations

import argparse

import gradio as gr

from lib_training.service import TrainingService


def cli_has(command: str) -> bool:
    """Whether `python -m lib_training COMMAND` exists in this version."""
    from lib_training.cli import build_parser

    commands = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return any(command in action.choices for action in commands)


def merge_text() -> str:
    text = (
        "### Merging is coming to this tab\n"
        "Streaming checkpoint merges (weighted sum, add difference, block weights and more), and LoRA "
        "bake, extract and resize, with memory use near one tensor.\n\n"
    )
    if cli_has("merge"):
        return text + "Meanwhile the command line has it: `python -m lib_training merge --help`."
    return text + "The command line gets it first: `python -m lib_training merge --help` once your version has it."


def build_merge_tab(service: TrainingService) -> gr.Blocks:
    """The Merge tab (`service` runs its jobs once the merge UI lands)."""
    with gr.Blocks(analytics_enabled=False) as blocks:
        gr.Markdown(merge_text(), elem_id="sdwt-merge-placeholder")
    return blocks
