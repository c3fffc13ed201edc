"""A small CNN that names what a tiny-world picture shows: its shape, its colour and its background.

It judges generated pictures (`bench/quality.py`, the pretraining report), so it is trained on the
generator's pictures made rougher (blurred, noisy, tinted) the way a small model's drawings are.
`train_classifier` builds it from a seed; the shipped weights are `weights/classifier.safetensors`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lib_training.formats.tensor_files import open_tensors, save_safetensors
from lib_training.world.scenes import BACKGROUNDS, COLOURS, SHAPES, batch

WEIGHTS = Path(__file__).parent / "weights" / "classifier.safetensors"
HEADS = {"shape": SHAPES, "colour": tuple(COLOURS), "background": BACKGROUNDS}


class SceneClassifier(nn.Module):
    """[B, 3, 64, 64] in [-1, 1] -> logits per head: shape [B, 6], colour [B, 6], background [B, 2]."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w = width
        layers: list[nn.Module] = []
        for c_in, c_out in ((3, w), (w, 2 * w), (2 * w, 2 * w), (2 * w, 4 * w)):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GroupNorm(8, c_out), nn.SiLU()]
        self.features = nn.Sequential(*layers)  # [B, 4w, 4, 4]
        self.heads = nn.ModuleDict({name: nn.Linear(4 * w * 2, len(labels)) for name, labels in HEADS.items()})

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        h = self.features(images)
        pooled = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)  # [B, 8w]
        return {name: head(pooled) for name, head in self.heads.items()}


@dataclass(frozen=True)
class Judgement:
    shape: str
    colour: str
    background: str


def roughen(images: Tensor, generator: torch.Generator) -> Tensor:
    """Pictures made to look like a small model's drawings: blurred, noisy, tinted ([B, 3, H, W] in [-1, 1])."""
    B = images.shape[0]
    blurred = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    amount = torch.rand(B, 1, 1, 1, generator=generator)
    out = images + amount * (blurred - images)
    out = out + torch.randn(B, 3, 1, 1, generator=generator) * 0.06  # tint
    out = out + torch.randn(out.shape, generator=generator) * torch.rand(B, 1, 1, 1, generator=generator) * 0.12
    return out.clamp(-1.0, 1.0)


def _targets(drawn) -> dict[str, Tensor]:
    return {
        "shape": torch.tensor([SHAPES.index(s.shape) for s in drawn]),
        "colour": torch.tensor([tuple(COLOURS).index(s.colour) for s in drawn]),
        "background": torch.tensor([BACKGROUNDS.index(s.background) for s in drawn]),
    }


def train_classifier(
    seed: int = 0,
    steps: int = 1500,
    batch_size: int = 32,
    lr: float = 2e-3,
    on_step: Callable[[int, float], None] | None = None,
) -> SceneClassifier:
    """A classifier trained on scenes `[0, steps * batch_size)` of the world `seed` (every shape and colour)."""
    torch.manual_seed(seed)
    model = SceneClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        images, drawn = batch(seed, step * batch_size, batch_size)
        logits = model(roughen(images, generator))
        targets = _targets(drawn)
        loss = sum(F.cross_entropy(logits[name], targets[name]) for name in HEADS)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[union-attr]
        optimizer.step()
        schedule.step()
        if on_step is not None:
            on_step(step + 1, float(loss))
    return model.eval()


def save_classifier(model: SceneClassifier, path: Path = WEIGHTS, metadata: dict[str, str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(path, {k: v.detach().contiguous() for k, v in model.state_dict().items()}, metadata or {})


def load_classifier(path: Path = WEIGHTS) -> SceneClassifier:
    model = SceneClassifier()
    with open_tensors(path) as source:
        model.load_state_dict({key: source.get(key).float() for key in source.shapes()})
    return model.eval()


@torch.no_grad()
def judge(model: SceneClassifier, images: Tensor, batch_size: int = 64) -> list[Judgement]:
    """What each picture [B, 3, 64, 64] in [-1, 1] shows, by the classifier's most likely labels."""
    out: list[Judgement] = []
    for chunk in images.split(batch_size):
        if chunk.shape[-1] != 64:
            chunk = F.interpolate(chunk, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)
        logits = model(chunk.float())
        picks = {name: logits[name].argmax(dim=1).tolist() for name in HEADS}
        for i in range(chunk.shape[0]):
            out.append(Judgement(*(HEADS[name][picks[name][i]] for name in HEADS)))
    return out


def held_out_accuracy(model: SceneClassifier, seed: int = 12345, count: int = 600) -> dict[str, float]:
    """Accuracy per head on `count` scenes of a world seed the classifier was not trained on."""
    images, drawn = batch(seed, 0, count)
    judged = judge(model, images)
    return {name: sum(getattr(j, name) == getattr(s, name) for j, s in zip(judged, drawn)) / count for name in HEADS}


def main_train(out: Path, seed: int, steps: int) -> None:
    """Train, report held-out accuracy, save (the `world train-classifier` command)."""
    torch.set_num_threads(min(2, torch.get_num_threads()))
    start = time.perf_counter()

    def report(step: int, loss: float) -> None:
        if step % 100 == 0:
            print(f"step {step}/{steps} loss {loss:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)

    model = train_classifier(seed, steps, on_step=report)
    accuracy = held_out_accuracy(model)
    took = time.perf_counter() - start
    print("held-out accuracy: " + ", ".join(f"{k} {v:.1%}" for k, v in accuracy.items()) + f" ({took:.0f} s)")
    save_classifier(model, out, {"seed": str(seed), "steps": str(steps), "seconds": f"{took:.0f}"})
    print(f"wrote {out}")
