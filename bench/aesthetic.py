"""Aesthetic gradients: the time each generated image costs more, ours against the extension's way.

One run, on the same model, embedding, prompts and settings:

- plain: a generation without aesthetic gradients (the baseline);
- ours, cold: each image with a prompt not seen before (the private tower exists already: it is
  made once per model, timed separately as "first use");
- ours, warm: the same prompts again (the personalised conditioning comes from the cache);
- the extension's way: for every prompt chunk (the prompt and the negative prompt of each image) a
  deep copy of the whole CLIP model (text tower with its projection, and the image tower), Adam on
  every text weight, no cache; the same arithmetic otherwise.

Added time per image = the variant's median time per image minus plain's. Targets: warm < 5% of a
plain generation; cold at most half of the extension's added time.

    python bench/aesthetic.py                      # tiny SD1 on the CPU (seconds)
    python bench/aesthetic.py --images 6 --sampling-steps 20 --size 64 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib_training.aesthetic.clip_model import ClipSource
from lib_training.aesthetic.embedding_file import AestheticEmbedding
from lib_training.aesthetic.personalise import (
    AestheticSettings,
    Personaliser,
    PrivateTower,
    aesthetic_applied,
    mix,
)
from lib_training.formats.tensor_files import save_safetensors
from lib_training.model.diffusion import TextEncoderOutput
from lib_training.model.sampler import SampleSettings, generate
from lib_training.model.tiny import make_tiny


def tiny_clip(folder: Path, text_width: int, embed_dim: int = 32) -> tuple[ClipSource, nn.Module]:
    """A registered tiny open_clip model with random weights in a local file (no download)."""
    import open_clip

    name = f"bench-clip-{text_width}-{embed_dim}"
    config = {
        "embed_dim": embed_dim,
        "quick_gelu": True,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": text_width, "heads": 2, "layers": 2},
    }
    (folder / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder / f"{name}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(name, pretrained=None)
    weights = folder / f"{name}.safetensors"
    save_safetensors(weights, {k: v.contiguous() for k, v in model.state_dict().items()})
    return ClipSource(name, "", weights), model


class DeepCopyEncoder:
    """The extension's way, as a `TextEncoder`: per call, deep-copy the whole CLIP model and tune it."""

    def __init__(self, inner, full_clip: nn.ModuleDict, target: Tensor, settings: AestheticSettings) -> None:
        self.inner, self.key, self.tokenizer = inner, inner.key, inner.tokenizer
        self.token_embedding, self.width = inner.token_embedding, inner.width
        self.full_clip, self.target, self.settings = full_clip, target, settings

    def encode_embeddings(self, embeds: Tensor, ids: Tensor) -> TextEncoderOutput:
        out = self.inner.encode_embeddings(embeds, ids)
        model = copy.deepcopy(self.full_clip)
        text = model["text"]
        params = [p for n, p in text.named_parameters() if n not in ("text_projection", "logit_scale")]
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.Adam(params, lr=self.settings.lr)
        with torch.enable_grad():
            for _ in range(self.settings.steps):
                features = text.encode_embeddings(text.token_embedding(ids), ids).pooled
                loss = -(features / features.norm(dim=-1, keepdim=True) @ self.target.T).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        with torch.no_grad():
            zn = text.encode_embeddings(text.token_embedding(ids), ids).hidden
        return TextEncoderOutput(mix(out.hidden, zn, self.settings), out.pooled)


def one_image(model, prompt: str, args: argparse.Namespace) -> float:
    """Seconds for one image; its negative prompt is its own too (so a cold image misses the cache twice)."""
    settings = SampleSettings(prompt, f"blurry, {prompt}", steps=args.sampling_steps, width=args.size, height=args.size)
    start = time.perf_counter()
    generate(model, settings)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=6, help="images per variant (default 6)")
    parser.add_argument("--sampling-steps", type=int, default=20, help="sampler steps per image (default 20)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--aesthetic-steps", type=int, default=5, help="aesthetic steps (default 5)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = make_tiny("sd1")
    encoder = model.text_encoders[0]
    folder = Path(tempfile.mkdtemp(prefix="bench-aesthetic-"))
    clip, full = tiny_clip(folder, encoder.width)
    embedding = AestheticEmbedding("bench", torch.randn(1, 32, generator=torch.Generator().manual_seed(1)))
    settings = AestheticSettings(steps=args.aesthetic_steps)

    one_image(model, "warm-up", args)  # the sampler's first run
    personaliser = Personaliser(model, clip)
    assigned = personaliser.match([embedding])
    with aesthetic_applied(personaliser, assigned, settings):
        first = one_image(model, "first use", args)  # makes the private tower
    tower = PrivateTower(encoder, full.text_projection.detach(), model.device)
    full_clip = nn.ModuleDict({"text": tower.module, "visual": full.visual})
    extension_encoders = [DeepCopyEncoder(encoder, full_clip, embedding.target(), settings)]
    originals = model.text_encoders

    # The variants take turns image by image, so that a machine busy with other work slows all alike.
    plain, cold, warm, extension = [], [], [], []
    for i in range(args.images):
        plain.append(one_image(model, f"a picture of a red ball, {i}", args))
        with aesthetic_applied(personaliser, assigned, settings):
            cold.append(one_image(model, f"a drawing of a blue cube, {i}", args))
            warm.append(one_image(model, f"a drawing of a blue cube, {i}", args))
        model.text_encoders = extension_encoders
        try:
            extension.append(one_image(model, f"a photo of a green cone, {i}", args))
        finally:
            model.text_encoders = originals
    assert personaliser.optimisations == 2 * args.images + 2, personaliser.optimisations

    # The warm cost alone, without the sampler's noise: conditioning a cached prompt and its negative.
    def encode_seconds(repeats: int = 20) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            with torch.no_grad():
                model.encode_prompts(["a drawing of a blue cube, 0", "blurry, a drawing of a blue cube, 0"])
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    encode_plain = encode_seconds()
    with aesthetic_applied(personaliser, assigned, settings):
        encode_warm = encode_seconds()

    base = statistics.median(plain)

    def added(times: list[float]) -> float:
        return statistics.median(times) - base

    print(f"tiny SD1 on {model.device}, {args.images} images of {args.size} px, {args.sampling_steps} sampler steps,")
    print(f"aesthetic steps {settings.steps}; median seconds per image (added over plain):")
    print(f"  plain                  {base:.4f}")
    print(f"  ours, first use        {first:.4f} (+{first - base:.4f}; makes the private tower)")
    print(f"  ours, cold             {statistics.median(cold):.4f} (+{added(cold):.4f})")
    print(f"  ours, warm             {statistics.median(warm):.4f} (+{added(warm):.4f})")
    print(f"  the extension's way    {statistics.median(extension):.4f} (+{added(extension):.4f})")
    warm_ratio, cold_ratio = added(warm) / base, added(cold) / added(extension)
    print(f"warm added / plain: {warm_ratio:.3f} (target < 0.05; whole generations, so machine noise included)")
    encode_added = encode_warm - encode_plain
    print(
        f"conditioning a cached prompt and its negative: {encode_warm * 1e3:.1f} ms vs {encode_plain * 1e3:.1f} ms "
        f"plain, +{encode_added * 1e3:.1f} ms = {encode_added / base:.4f} of a plain generation"
    )
    print(f"cold added / the extension's added: {cold_ratio:.3f} (target <= 0.5)")


if __name__ == "__main__":
    main()
