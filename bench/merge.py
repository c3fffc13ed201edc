"""Streaming merge against the I/O floor and a naive in-memory merge, on full-size SD1.5-shaped files.

Three fp16 checkpoints with the key names and shapes of SD1.5 (1,131 tensors, 2.1 GB each) and
random weights are generated once into a cache folder. Then, each in its own subprocess (so peak
RSS is clean), with the inputs evicted from the page cache before each run:

- floor: read B (and C) with plain reads and copy A to a new file: the disk work any merge does;
- ours: `lib_training.merge` weighted sum of A and B, and add difference A + alpha(B - C), with its
  defaults (the inputs' sha256 computed alongside, for the metadata);
- ours-nohash: the same without hashing the inputs (`hash_inputs=False`; as when the hashes are
  already cached, which they are from the second merge of the same files on);
- naive: `safetensors.torch.load_file` of every input, compute each key in fp32, `save_file`.

Prints wall time, peak RSS (the child's VmHWM) and the ratios ours/floor and ours/naive.

    python bench/merge.py                      # full size; files in .cache/bench-merge
    python bench/merge.py --small              # tiny SD1 shapes, a quick check of the script
    python bench/merge.py --skip-naive         # leave out the naive merge (it needs ~8 GB of RAM)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ALPHA = 0.3


def _peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _shapes(small: bool) -> dict[str, tuple[tuple[int, ...], str]]:
    """Checkpoint key -> (shape, dtype name) of SD1.5 (or of the tiny SD1 model)."""
    import torch

    from lib_training.formats.family import Arch, ModelFamily
    from lib_training.model.networks.text_encoder import ClipTextEncoder, TextEncoderConfig
    from lib_training.model.networks.unet import UNetConfig, UNetModel
    from lib_training.model.networks.vae import AutoencoderKL, VAEConfig
    from lib_training.model.standalone import assemble

    unet_config = UNetConfig.tiny(Arch.SD1) if small else UNetConfig.sd15()
    vae_config = VAEConfig.tiny() if small else VAEConfig.sd()
    with torch.device("meta"):
        model = assemble(
            ModelFamily(Arch.SD1),
            UNetModel(unet_config),
            AutoencoderKL(vae_config),
            [ClipTextEncoder(c) for c in TextEncoderConfig.for_arch(Arch.SD1, tiny=small)],
            device=torch.device("meta"),
            dtype=torch.float16,
        )
    state = model.checkpoint_state_dict()
    return {k: (tuple(v.shape), "fp16" if v.is_floating_point() else "int64") for k, v in state.items()}


def generate(path: Path, small: bool, seed: int) -> None:
    """Write a checkpoint of random fp16 weights, one tensor at a time."""
    import torch

    from lib_training.formats.safetensors_writer import StreamWriter, TensorEntry

    shapes = _shapes(small)
    dtypes = {"fp16": torch.float16, "int64": torch.int64}
    entries = [TensorEntry(k, dtypes[d], s) for k, (s, d) in shapes.items()]
    generator = torch.Generator().manual_seed(seed)
    with StreamWriter(path, entries, {"modelspec.title": f"bench {seed}"}) as writer:
        for entry in writer.layout.entries:
            if entry.dtype == torch.int64:
                writer.write(torch.arange(entry.shape[-1], dtype=torch.int64).expand(entry.shape).contiguous())
            else:
                writer.write((torch.randn(entry.shape, generator=generator) * 0.02).to(torch.float16))
        writer.finish()


def _evict(paths: list[Path]) -> None:
    """Drop files from the page cache so each run reads from the disk (Linux; no-op elsewhere)."""
    os.sync()
    for path in paths:
        if path.exists() and hasattr(os, "posix_fadvise"):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


# --- children --------------------------------------------------------------------------------------
def child_floor(inputs: list[Path], out: Path) -> None:
    buffer = bytearray(16 * 1024 * 1024)
    for path in inputs[1:]:
        with open(path, "rb") as f:
            while f.readinto(buffer):
                pass
    shutil.copyfile(inputs[0], out)


def child_ours(inputs: list[Path], out: Path, method: str, threads: int, hash_inputs: bool) -> dict[str, object]:
    from lib_training.merge.config import MergeConfig
    from lib_training.merge.engine import merge

    if threads:
        import torch

        torch.set_num_threads(threads)
    letters = dict(zip("abc", (str(p) for p in inputs)))
    config = MergeConfig(method=method, alpha=ALPHA, out=str(out), overwrite=True, hash_inputs=hash_inputs, **letters)
    result = merge(config)
    return {"merged": result.merged, "copied": result.copied}


def child_naive(inputs: list[Path], out: Path, method: str) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    loaded = [load_file(str(p)) for p in inputs]
    a = loaded[0]
    result = {}
    for key, tensor in a.items():
        if not tensor.is_floating_point():
            result[key] = tensor
            continue
        x = [t[key].float() for t in loaded]
        merged = (1 - ALPHA) * x[0] + ALPHA * x[1] if method == "weighted_sum" else x[0] + ALPHA * (x[1] - x[2])
        result[key] = merged.to(torch.float16)
    save_file(result, str(out))


def run_child(args: argparse.Namespace) -> None:
    if args.child != "floor":  # imports are not timed, only the work
        import torch  # noqa: F401
        from safetensors.torch import load_file  # noqa: F401

        import lib_training.merge.engine

    inputs = [Path(p) for p in args.inputs]
    out = Path(args.out)
    start = time.perf_counter()
    extra: dict[str, object] = {}
    if args.child == "baseline":  # the interpreter with torch and the merge code imported, doing nothing
        import lib_training.merge.engine  # noqa: F401
    elif args.child == "floor":
        child_floor(inputs, out)
    elif args.child in ("ours", "ours-nohash"):
        extra = child_ours(inputs, out, args.method, args.threads, args.child == "ours")
    else:
        child_naive(inputs, out, args.method)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_rss_mib": _peak_rss_mib(), **extra}))


def measure(kind: str, inputs: list[Path], out: Path, method: str, threads: int) -> dict[str, float]:
    with contextlib.suppress(FileNotFoundError):
        out.unlink()
    _evict(inputs)
    command = [
        sys.executable,
        __file__,
        "--child",
        kind,
        "--method",
        method,
        "--out",
        str(out),
        "--threads",
        str(threads),
    ]
    command += ["--inputs", *map(str, inputs)]
    # A fresh hash cache for every run: "ours" measures hashing the inputs for the first time.
    with tempfile.TemporaryDirectory() as hash_cache:
        env = {**os.environ, "SDWT_CACHE": hash_cache}
        done = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny SD1 shapes instead of full-size SD1.5")
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "bench-merge", help="folder for the files")
    parser.add_argument("--skip-naive", action="store_true", help="do not run the naive merge")
    parser.add_argument("--threads", type=int, default=0, help="torch threads for our merge (0: torch's default)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each measurement (the best is kept)")
    parser.add_argument(
        "--child", choices=["floor", "ours", "ours-nohash", "naive", "baseline"], help=argparse.SUPPRESS
    )
    parser.add_argument("--method", default="weighted_sum", help=argparse.SUPPRESS)
    parser.add_argument("--inputs", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args)
        return

    folder = args.cache / ("small" if args.small else "sd15")
    folder.mkdir(parents=True, exist_ok=True)
    files = [folder / f"model_{name}.safetensors" for name in "abc"]
    for seed, path in enumerate(files):
        if not path.exists():
            print(f"generating {path} ...", flush=True)
            generate(path, args.small, seed)
    size = files[0].stat().st_size
    print(f"inputs: 3 x {size / 1e9:.3f} GB ({folder}); alpha {ALPHA}; page cache emptied before each run")
    baseline = measure("baseline", files[:1], folder / "unused", "none", args.threads)
    print(f"peak RSS of Python with torch and lib_training.merge imported: {baseline['peak_rss_mib']:.0f} MiB\n")
    out = folder / "out.safetensors"
    header = f"{'method':<16}{'run':<13}{'seconds':>9}{'peak RSS MiB':>14}{'x floor':>9}{'x naive':>9}"
    print(header)
    print("-" * len(header))
    for method, inputs in (("weighted_sum", files[:2]), ("add_difference", files)):
        results: dict[str, dict[str, float]] = {}
        kinds = ["floor", "ours", "ours-nohash"] + ([] if args.skip_naive else ["naive"])
        for kind in kinds:
            runs = [measure(kind, inputs, out, method, args.threads) for _ in range(args.repeat)]
            results[kind] = min(runs, key=lambda r: r["seconds"])
        for kind in kinds:
            r = results[kind]
            vs_floor = r["seconds"] / results["floor"]["seconds"]
            vs_naive = f"{r['seconds'] / results['naive']['seconds']:9.2f}" if "naive" in results else f"{'-':>9}"
            print(f"{method:<16}{kind:<13}{r['seconds']:9.2f}{r['peak_rss_mib']:14.0f}{vs_floor:9.2f}{vs_naive}")
    with contextlib.suppress(FileNotFoundError):
        out.unlink()


if __name__ == "__main__":
    main()
