"""`python -m lib_training hypernetwork create`: A1111's Create step on its own (no model needed).

A1111 users create a hypernetwork first and then train it; here the file written is trained with
`train hypernetwork --continue-from OUT/NAME.pt` (its structure, weights and step count are kept).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_hypernetwork_parser(commands: argparse._SubParsersAction) -> None:
    from lib_training.methods.hypernetwork import HypernetworkConfig
    from lib_training.options import add_arguments

    group = commands.add_parser("hypernetwork", help="hypernetwork files: create a new one")
    actions = group.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = actions.add_parser(
        "create",
        help="write a new, untrained hypernetwork OUT/NAME.pt in A1111's format",
        description="Write a new hypernetwork (A1111's Create step). Train it with "
        "`train hypernetwork --continue-from OUT/NAME.pt ...`.",
    )
    create.add_argument("--out", type=Path, required=True, help="output folder")
    add_arguments(create, HypernetworkConfig, skip=("continue_from",))
    create.set_defaults(run=_cmd_create)


def _cmd_create(args: argparse.Namespace) -> None:
    from lib_training.methods.hypernetwork import HypernetworkConfig, create_hypernetwork
    from lib_training.options import SettingsError, describe, from_namespace

    settings = from_namespace(HypernetworkConfig, args)
    try:
        path = create_hypernetwork(settings, args.out)
    except SettingsError as error:  # every bad setting, named by its flag
        flags = {info.name: info.flag for info in describe(HypernetworkConfig)}
        raise SettingsError({flags.get(name) or name: problem for name, problem in error.errors.items()}) from None
    from lib_training.formats.hypernetwork_file import read_hypernetwork

    made = read_hypernetwork(path)
    widths = ", ".join(str(w) for w in made.layers)
    print(f"wrote {path}: widths {widths}, layer structure {made.layer_structure}, activation {made.activation_func}")
