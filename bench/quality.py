"""Does a training method teach a concept? Measured on the tiny world with its classifier.

The method trains with its default settings (through the registry's request parsing and
`lib_training.training.run.train`, as the CLI does) on pictures of a colour-shape pair the
pretrained tiny world model never saw together (`lib_training.world.concepts.TARGET`, a green
triangle). Before and after, pictures are drawn (20 Euler steps, CFG 5, a fixed seed each) for

- the target prompt "a photo of NAME" (the reference run: the model as it was, NAME just a word);
- unrelated prompts: full captions of pretraining pairs, which training must leave alone;

and the classifier names their shape and colour. Accuracy is the fraction showing the expected
shape and colour together. The last line is

    quality <method>: target before B after A; unrelated before U after V

Targets (textual inversion): A >= 90% from B < 20%, |V - U| <= 5 points.

    python bench/quality.py --method embedding            # ~10 min on a busy 2-core CPU
    python bench/quality.py --method embedding --quick    # fewer steps and pictures: a test
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib_training.methods import spec_for
from lib_training.model.standalone import load_model
from lib_training.training.request import parse_request
from lib_training.training.run import train
from lib_training.world.classifier import load_classifier
from lib_training.world.concepts import TARGET, write_concept
from lib_training.world.evaluate import Expectation, evaluate
from lib_training.world.model import world_checkpoint
from lib_training.world.scenes import caption

QUICK_STEPS = 300
NAME = "zqx"  # the result's name: the word that calls it in prompts
UNRELATED = [
    ("red", "circle", "dark"),
    ("blue", "square", "light"),
    ("yellow", "cross", "dark"),
    ("orange", "star", "light"),
]


def measure(
    method: str,
    quick: bool,
    work: Path,
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
    loop: dict[str, object] = {"save_every": 0, "preview_every": 0}
    if steps or quick:
        loop["steps"] = steps or QUICK_STEPS
    body = {
        "method": {"name": NAME},
        "data": {"path": str(write_concept(work / "data", colour, shape)), "size": 64},
        "loop": loop,
    }
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="embedding", help="a registered training method (default embedding)")
    parser.add_argument("--quick", action="store_true", help="fewer training steps and pictures")
    parser.add_argument("--ckpt", type=Path, default=None, help="checkpoint (default: the tiny world's)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the method's)")
    parser.add_argument("--pictures", type=int, default=None, help="pictures of the target prompt (default 40)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="quality-") as work:
        b, a, u, v = measure(args.method, args.quick, Path(work), args.ckpt, args.steps, args.pictures)
    print(f"quality {args.method}: target before {b:.0%} after {a:.0%}; unrelated before {u:.0%} after {v:.0%}")


if __name__ == "__main__":
    main()
