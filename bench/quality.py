"""Does a training method teach a concept? Measured on the tiny world with its classifier.

The method trains (through the registry's request parsing and `lib_training.training.run.train`, as
the CLI does) on pictures of a colour-shape pair the pretrained tiny world model never saw together
(`lib_training.world.concepts.TARGET`, a green triangle), captioned with their background only.
Before and after, pictures are drawn (20 Euler steps, CFG 5, a fixed seed each) for

- the target prompt "a photo of NAME" (the reference run: the model as it was, NAME just a word);
- unrelated prompts: full captions of pretraining pairs, which training must leave alone;

and the classifier names their shape and colour. Accuracy is the fraction showing the expected
shape and colour together. The last line is

    quality <method>: target before B after A; unrelated before U after V

Each method trains with its recipe for teaching a concept (`RECIPES`, printed first; `--defaults`
trains with the method's defaults instead):

- textual inversion: its defaults. Targets: A >= 90% from B < 20%, |V - U| <= 5 points.
- LoRA and hypernetworks: the trigger word in every caption (template subject_filewords, "a photo
  of zqx, on a dark background"), regularization images (pictures of other pretraining pairs, with
  full captions; the unrelated prompts' pairs are not among them) and a higher learning rate than
  their defaults, which are for full-size models; LoRA also trains the text encoder. Without the
  regularization images either method learns to draw the concept for every prompt.

    python bench/quality.py --method embedding            # ~10 min on a busy 2-core CPU
    python bench/quality.py --method lora --quick         # fewer steps and pictures: a test
    python bench/quality.py --method lora --defaults      # the method's defaults, no recipe
    python bench/quality.py --method lora --set loop.lr=0.0003 --class-images 0   # a variation
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib_training.methods import spec_for
from lib_training.model.standalone import load_model
from lib_training.training.request import parse_request
from lib_training.training.run import train
from lib_training.world.classifier import load_classifier
from lib_training.world.concepts import TARGET, write_class_images, write_concept
from lib_training.world.evaluate import Expectation, evaluate
from lib_training.world.model import world_checkpoint
from lib_training.world.scenes import caption

NAME = "zqx"  # the result's name: the word that calls it in prompts
UNRELATED = [
    ("red", "circle", "dark"),
    ("blue", "square", "light"),
    ("yellow", "cross", "dark"),
    ("orange", "star", "light"),
]
Settings = dict[str, dict[str, str]]  # request section ("method", "data", "loop") -> field -> value


@dataclass(frozen=True)
class Recipe:
    """How a method is asked to learn a concept: settings over its defaults, regularization images."""

    settings: Settings = field(default_factory=dict)
    class_images: int = 0  # pictures of other pretraining pairs, captioned in full
    quick_steps: int = 300  # training steps of --quick (else the method's default steps)

    def describe(self) -> str:
        parts = [f"{part}.{key}={value}" for part, fields in self.settings.items() for key, value in fields.items()]
        if self.class_images:
            parts.append(f"{self.class_images} class images")
        return ", ".join(parts) or "the method's defaults"


TRIGGER_WORD_CAPTIONS = {"template": "subject_filewords"}  # "a photo of [name], [filewords]"
RECIPES = {
    "embedding": Recipe(),
    "lora": Recipe(
        {"data": TRIGGER_WORD_CAPTIONS, "loop": {"lr": "0.001"}, "method": {"train_text_encoder": "true"}},
        class_images=48,
        quick_steps=500,
    ),
    "hypernetwork": Recipe({"data": TRIGGER_WORD_CAPTIONS, "loop": {"lr": "0.0003"}}, class_images=48, quick_steps=600),
}


def measure(
    method: str,
    quick: bool,
    work: Path,
    recipe: Recipe,
    ckpt: Path | None = None,
    steps: int | None = None,
    pictures: int | None = None,
) -> tuple[float, float, float, float]:
    """(target before, target after, unrelated before, unrelated after) accuracies."""
    colour, shape = TARGET
    seeds = tuple(range(pictures or (12 if quick else 40)))
    unrelated_seeds = tuple(range(max(1, len(seeds) // 4)))
    target = [Expectation(f"a photo of {NAME}", shape, colour)]
    unrelated = [Expectation(caption(c, s, b), s, c, b) for c, s, b in UNRELATED]

    model = load_model(ckpt or world_checkpoint())
    classifier = load_classifier()
    spec = spec_for(method)
    body: dict[str, dict[str, object]] = {
        "method": {"name": NAME},
        "data": {"path": str(write_concept(work / "data", colour, shape)), "size": 64},
        "loop": {"save_every": 0, "preview_every": 0},
    }
    if steps or quick:
        body["loop"]["steps"] = steps or recipe.quick_steps
    if recipe.class_images:  # other pairs than the unrelated prompts', so those test what is kept
        leave_out = [(c, s) for c, s, _ in UNRELATED]
        body["data"]["class_path"] = str(write_class_images(work / "class", recipe.class_images, leave_out))
    for section, values in recipe.settings.items():
        body[section].update(values)
    request = parse_request(spec, body)

    start = time.perf_counter()
    target_before = evaluate(model, classifier, target, seeds)
    unrelated_before = evaluate(model, classifier, unrelated, unrelated_seeds)
    print(f"before: target {target_before.describe()}; unrelated {unrelated_before.describe()}", flush=True)

    result = train(model, request.build(), request.data, request.loop, work / "out", overwrite=True)
    trained = time.perf_counter()
    print(f"trained {result.step} steps in {trained - start:.0f} s (loss {result.loss})", flush=True)

    method_result = spec.method.load(result.result, model)
    with method_result.apply_for_generation(model, 1.0) as embeddings:
        target_after = evaluate(model, classifier, target, seeds, embeddings)
        unrelated_after = evaluate(model, classifier, unrelated, unrelated_seeds, embeddings)
    print(f"after: target {target_after.describe()}; unrelated {unrelated_after.describe()}", flush=True)
    return target_before.both, target_after.both, unrelated_before.both, unrelated_after.both  # type: ignore[return-value]


def chosen_recipe(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Recipe:
    """The method's recipe (or its defaults), with --set and --class-images over it."""
    base = Recipe() if args.defaults else RECIPES.get(args.method, Recipe())
    settings: Settings = {section: dict(values) for section, values in base.settings.items()}
    for item in args.set:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        if section not in ("method", "data", "loop") or not name or not value:
            parser.error(f"--set {item!r}: expected SECTION.FIELD=VALUE with SECTION method, data or loop")
        settings.setdefault(section, {})[name] = value
    class_images = base.class_images if args.class_images is None else args.class_images
    return Recipe(settings, class_images, base.quick_steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="embedding", help="a registered training method (default embedding)")
    parser.add_argument("--quick", action="store_true", help="fewer training steps and pictures")
    parser.add_argument("--defaults", action="store_true", help="the method's default settings instead of its recipe")
    parser.add_argument("--ckpt", type=Path, default=None, help="checkpoint (default: the tiny world's)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    parser.add_argument("--pictures", type=int, default=None, help="pictures of the target prompt (default 40)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--class-images", type=int, default=None, help="regularization images (default: the recipe's)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="a setting over the recipe, e.g. loop.lr=0.001 or data.template=filewords (repeatable)",
    )
    args = parser.parse_args()
    recipe = chosen_recipe(args, parser)
    torch.set_num_threads(args.threads)
    print(f"recipe for {args.method}: {recipe.describe()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="quality-") as work:
        b, a, u, v = measure(args.method, args.quick, Path(work), recipe, args.ckpt, args.steps, args.pictures)
    print(f"quality {args.method}: target before {b:.0%} after {a:.0%}; unrelated before {u:.0%} after {v:.0%}")


if __name__ == "__main__":
    main()
