"""The `world` subcommands: build and inspect the tiny world model.

python -m lib_training world pretrain --work WORK [--unet-steps N] [--budget-s S]   # resumable
python -m lib_training world train-classifier [--steps N]
python -m lib_training world checkpoint            # print (and make) the checkpoint's path
python -m lib_training world evaluate [--ckpt FILE] [--seeds N]
python -m lib_training world concept OUT [--colour C --shape S --count N]
"""

from __future__ import annotations

import argparse
from pathlib import Path


def _cmd_pretrain(args: argparse.Namespace) -> None:
    from lib_training.world.pretrain import PretrainPlan, pretrain

    plan = PretrainPlan(
        args.seed, args.vae_steps, args.unet_steps, args.scenes, args.budget_s, args.batch_size, args.lr
    )
    pretrain(args.work, plan)


def _cmd_train_classifier(args: argparse.Namespace) -> None:
    from lib_training.world.classifier import WEIGHTS, main_train

    main_train(args.out or WEIGHTS, args.seed, args.steps)


def _cmd_checkpoint(args: argparse.Namespace) -> None:
    from lib_training.world.model import world_checkpoint

    print(world_checkpoint())


def _cmd_evaluate(args: argparse.Namespace) -> None:
    import torch

    from lib_training.model.standalone import load_model
    from lib_training.world.classifier import load_classifier
    from lib_training.world.evaluate import evaluate
    from lib_training.world.model import world_checkpoint
    from lib_training.world.pretrain import held_out_prompts, training_prompts

    torch.set_num_threads(min(2, torch.get_num_threads()))
    model = load_model(args.ckpt or world_checkpoint())
    classifier = load_classifier()
    seeds = tuple(range(args.seeds))
    print("training prompts: " + evaluate(model, classifier, training_prompts(), seeds).describe())
    print("held-out pairs:   " + evaluate(model, classifier, held_out_prompts(), seeds).describe())


def _cmd_concept(args: argparse.Namespace) -> None:
    from lib_training.world.concepts import write_concept

    folder = write_concept(args.out, args.colour, args.shape, args.count, args.seed)
    print(f"wrote {args.count} pictures of {args.colour} {args.shape}s to {folder}")


def add_world_parsers(commands: argparse._SubParsersAction) -> None:
    from lib_training.world.concepts import TARGET
    from lib_training.world.scenes import COLOURS, SHAPES

    world = commands.add_parser(
        "world",
        help="the tiny world: a pretrained demo model of coloured shapes, its classifier, sample data",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = world.add_subparsers(dest="world_command", required=True, metavar="WHAT")

    pre = sub.add_parser("pretrain", help="train the VAE, then the UNet (continues from WORK)")
    pre.add_argument("--work", type=Path, required=True, help="folder for training state (resumable)")
    pre.add_argument("--seed", type=int, default=0)
    pre.add_argument("--vae-steps", type=int, default=750)
    pre.add_argument("--unet-steps", type=int, default=2000, help="total UNet steps to reach")
    pre.add_argument("--scenes", type=int, default=3000, help="pretraining pictures")
    pre.add_argument("--batch-size", type=int, default=16, help="UNet batch")
    pre.add_argument("--lr", type=float, default=1e-3, help="UNet peak learning rate")
    pre.add_argument("--budget-s", type=float, default=None, help="stop the UNet stage after this many seconds")
    pre.set_defaults(run=_cmd_pretrain)

    cls = sub.add_parser("train-classifier", help="train the scene classifier and write its weights")
    cls.add_argument("--out", type=Path, default=None, help="weights file (default: the shipped one)")
    cls.add_argument("--seed", type=int, default=0)
    cls.add_argument("--steps", type=int, default=1500)
    cls.set_defaults(run=_cmd_train_classifier)

    ckpt = sub.add_parser("checkpoint", help="print the path of the tiny world checkpoint (made on first use)")
    ckpt.set_defaults(run=_cmd_checkpoint)

    ev = sub.add_parser("evaluate", help="classifier accuracy of pictures drawn for the training prompts")
    ev.add_argument("--ckpt", type=Path, default=None, help="checkpoint (default: the tiny world's)")
    ev.add_argument("--seeds", type=int, default=1, help="pictures per prompt")
    ev.set_defaults(run=_cmd_evaluate)

    con = sub.add_parser("concept", help="write a sample data set of one colour-shape pair")
    con.add_argument("out", type=Path)
    con.add_argument("--colour", choices=list(COLOURS), default=TARGET[0])
    con.add_argument("--shape", choices=list(SHAPES), default=TARGET[1])
    con.add_argument("--count", type=int, default=12)
    con.add_argument("--seed", type=int, default=0)
    con.set_defaults(run=_cmd_concept)
