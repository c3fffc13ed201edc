"""A cache of VAE latent distributions per image view, in memory and optionally on disk.

The VAE appears only as `encode`: images [B, 3, H, W] in [-1, 1] -> (mean, logvar), each
[B, 4, H/8, W/8] float32 unscaled latents. An entry's key hashes everything its latents depend on:
the image file's content (sha256 of its bytes), the resize and crop, the flip, the VAE fingerprint
and the cache format version. A changed image, size, crop, flip or VAE therefore gives another key
and is encoded again, never served stale.

On disk every entry is one safetensors file `<key>.safetensors` holding "mean" and "logvar",
written to a temporary file in the same folder and renamed into place, so a crash leaves either the
whole file or none. Unreadable files are treated as missing and rewritten.

`LatentSampler` turns cached distributions into the latents of a training step: `mean` (the
deterministic mean), `once` (one sample per view, drawn from a generator seeded by the view's key and
kept for the run) or `random` (a fresh sample every step, seeded by step and position in the batch).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_tensors
from torch import Tensor

from lib_training.dataset.images import ImageView
from lib_training.seeding import derive_seed

FORMAT_VERSION = 1

Encode = Callable[[Tensor], tuple[Tensor, Tensor]]  # images [B, 3, H, W] -> (mean, logvar) [B, 4, h, w]
LoadImage = Callable[[ImageView], Tensor]  # view -> image [3, H, W] in [-1, 1]
Progress = Callable[[int, int], None]  # (views cached so far, views in total)
LatentMode = Literal["once", "mean", "random"]


def file_sha256(path: Path) -> str:
    """Hex sha256 of the file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class LatentCache:
    """Latent distributions keyed by image view; `fill` encodes what is missing, `get` serves it."""

    def __init__(self, encode: Encode, vae_fingerprint: str, disk_dir: Path | None = None):
        self.encode = encode
        self.vae_fingerprint = vae_fingerprint
        self.disk_dir = Path(disk_dir) if disk_dir is not None else None
        self._memory: dict[str, tuple[Tensor, Tensor]] = {}
        # path -> ((size, mtime_ns), sha256): a file is hashed once unless it changes on disk
        self._hashes: dict[Path, tuple[tuple[int, int], str]] = {}

    # --- keys -----------------------------------------------------------------------------------
    def content_hash(self, path: Path) -> str:
        """sha256 of the file, computed once per file (again only if its size or mtime changes)."""
        stat = os.stat(path)
        signature = (stat.st_size, stat.st_mtime_ns)
        known = self._hashes.get(path)
        if known is None or known[0] != signature:
            known = (signature, file_sha256(path))
            self._hashes[path] = known
        return known[1]

    def key(self, view: ImageView) -> str:
        """Hex key of `view`'s latents."""
        parts = {
            "format": FORMAT_VERSION,
            "content": self.content_hash(view.path),
            "resized": list(view.resized_size),
            "crop": [*view.crop, *view.target_size],  # top, left, height, width at the resized scale
            "flip": view.flip,
            "vae": self.vae_fingerprint,
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    # --- storage --------------------------------------------------------------------------------
    def _disk_path(self, key: str) -> Path | None:
        return None if self.disk_dir is None else self.disk_dir / f"{key}.safetensors"

    def _read_disk(self, key: str) -> tuple[Tensor, Tensor] | None:
        path = self._disk_path(key)
        if path is None or not path.is_file():
            return None
        try:
            tensors = load_file(str(path))
            return tensors["mean"], tensors["logvar"]
        except Exception:  # a damaged file is as good as none: encode again and overwrite
            return None

    def _write_disk(self, key: str, mean: Tensor, logvar: Tensor) -> None:
        path = self._disk_path(key)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        data = save_tensors(
            {"mean": mean.contiguous(), "logvar": logvar.contiguous()},
            metadata={"format": str(FORMAT_VERSION), "vae": self.vae_fingerprint},
        )
        handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{key[:16]}-", suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temp_name, path)
        except BaseException:
            Path(temp_name).unlink(missing_ok=True)
            raise

    def _lookup(self, key: str) -> tuple[Tensor, Tensor] | None:
        entry = self._memory.get(key)
        if entry is None:
            entry = self._read_disk(key)
            if entry is not None:
                self._memory[key] = entry
        return entry

    def _encode(self, keys: list[str], images: Tensor) -> None:
        with torch.no_grad():
            mean, logvar = self.encode(images)
        if mean.shape[0] != len(keys) or logvar.shape != mean.shape:
            raise ValueError(f"encode returned {tuple(mean.shape)} / {tuple(logvar.shape)} for {len(keys)} images")
        for key, m, lv in zip(keys, mean.float().cpu(), logvar.float().cpu()):
            m, lv = m.clone(), lv.clone()  # [4, h, w] each, not views into the batch
            self._memory[key] = (m, lv)
            self._write_disk(key, m, lv)

    # --- public ---------------------------------------------------------------------------------
    def __contains__(self, view: ImageView) -> bool:
        return self.key(view) in self._memory

    def __len__(self) -> int:
        return len(self._memory)

    def fill(
        self,
        views: Sequence[ImageView],
        load_image: LoadImage,
        batch_size: int = 4,
        progress: Progress | None = None,
    ) -> None:
        """Make sure every view is cached: read from disk what is there, encode the rest in batches.

        Views are encoded in batches of one training resolution; `progress(done, total)` is called
        after the disk look-up and after every encoded batch.
        """
        keyed = {self.key(view): view for view in views}
        missing: dict[tuple[int, int], list[tuple[str, ImageView]]] = defaultdict(list)
        for key, view in keyed.items():
            if self._lookup(key) is None:
                missing[view.target_size].append((key, view))
        total = len(keyed)
        done = total - sum(len(group) for group in missing.values())
        if progress is not None:
            progress(done, total)
        for size in sorted(missing):
            group = missing[size]
            for start in range(0, len(group), batch_size):
                chunk = group[start : start + batch_size]
                images = torch.stack([load_image(view) for _, view in chunk])  # [B, 3, H, W]
                self._encode([key for key, _ in chunk], images)
                done += len(chunk)
                if progress is not None:
                    progress(done, total)

    def get(self, view: ImageView, load_image: LoadImage | None = None) -> tuple[Tensor, Tensor]:
        """(mean, logvar) [4, h, w] of `view`; encoded now with `load_image` when not cached.

        Raises KeyError when the view is not cached and no `load_image` is given (for instance
        because its file changed since `fill`).
        """
        key = self.key(view)
        entry = self._lookup(key)
        if entry is None:
            if load_image is None:
                raise KeyError(f"no cached latents for {view.path} (not filled, or the file changed)")
            self._encode([key], load_image(view)[None])
            entry = self._memory[key]
        return entry


class LatentSampler:
    """Latents for a training step from cached distributions; reproducible from (seed, step, view)."""

    def __init__(self, mode: LatentMode = "once", seed: int = 0):
        if mode not in ("once", "mean", "random"):
            raise ValueError(f"unknown latent sampling mode {mode!r}")
        self.mode = mode
        self.seed = seed
        self._kept: dict[str, Tensor] = {}

    @staticmethod
    def _draw(mean: Tensor, logvar: Tensor, seed: int) -> Tensor:
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(mean.shape, generator=generator, dtype=torch.float32)
        return mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * noise

    def __call__(
        self, cache: LatentCache, views: Sequence[ImageView], step: int, load_image: LoadImage | None = None
    ) -> Tensor:
        """Unscaled latents [B, 4, h, w] float32 (CPU) for `views` at training step `step`."""
        latents = []
        for position, view in enumerate(views):
            key = cache.key(view)
            mean, logvar = cache.get(view, load_image)
            if self.mode == "mean":
                latent = mean
            elif self.mode == "once":
                if key not in self._kept:
                    self._kept[key] = self._draw(mean, logvar, derive_seed(self.seed, "once", key))
                latent = self._kept[key]
            else:
                latent = self._draw(mean, logvar, derive_seed(self.seed, "random", step, position, key))
            latents.append(latent)
        return torch.stack(latents)
