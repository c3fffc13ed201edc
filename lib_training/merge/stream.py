"""The streaming loop shared by merges and LoRA bakes: produce each output tensor in pieces, in file
order, and hand the pieces to the writer, reporting progress and honouring cancel requests."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from lib_training.formats.atomic import write_bytes
from lib_training.formats.safetensors_writer import StreamWriter, TensorEntry, WriteResult
from lib_training.merge.progress import CancelToken, ProgressCallback, ProgressMeter, check_cancel

CHUNK_ELEMENTS = 1 << 20  # elements per piece of an element-wise computation (16 MB in fp32)


@dataclass(frozen=True)
class OutputTensor:
    """One tensor of the output and how to produce it: pieces of its flattened data, in order."""

    entry: TensorEntry
    produce: Callable[[], Iterable[Tensor]]
    prefetch: Callable[[], None] | None = None  # asks the OS to start reading the inputs it needs


def chunks(count: int, size: int = CHUNK_ELEMENTS) -> Iterator[tuple[int, int]]:
    """[start, stop) ranges covering `count` elements."""
    for start in range(0, count, size):
        yield start, min(start + size, count)


def to_output(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """A computed tensor as a flat, contiguous CPU tensor of the output dtype."""
    return tensor.detach().to(device="cpu", dtype=dtype).contiguous().reshape(-1)


def available_cores() -> int:
    """CPU cores this process may run on."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else os.cpu_count() or 1


@contextlib.contextmanager
def compute_threads(reserved: int) -> Iterator[None]:
    """Run the calling thread's torch ops on all cores but `reserved`, then restore its setting.

    The cores left free serve the writer's and the hashing threads; without them, OpenMP threads
    waiting on a descheduled peer make every operation many times slower. The setting is per
    thread, so other threads of the process (a host's) are not affected.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(before, available_cores() - reserved)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def write_stream(
    path: str | os.PathLike[str],
    outputs: Sequence[OutputTensor],
    metadata: Mapping[str, str],
    *,
    what: str,
    placeholders: Sequence[str] = (),
    values: Callable[[str], Mapping[str, str]] | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken = None,
    before_finish: Callable[[], None] | None = None,
) -> WriteResult:
    """Write `outputs` to `path` as one safetensors file, atomically.

    `values(data_sha256)` gives the final values of the metadata placeholders once all data is
    written; `before_finish` runs just before that (e.g. to wait for input hashes). A cancel
    request raises CancelledError and leaves no file behind.
    """
    by_name = {output.entry.name: output for output in outputs}
    check_cancel(cancel, what)
    with StreamWriter(path, [o.entry for o in outputs], metadata, placeholders=placeholders) as writer:
        meter = ProgressMeter(writer.layout.data_size, len(outputs), progress)
        ordered = [by_name[entry.name] for entry in writer.layout.entries]
        for index, output in enumerate(ordered):
            entry = output.entry
            if index + 1 < len(ordered) and ordered[index + 1].prefetch is not None:
                ordered[index + 1].prefetch()  # the disk reads ahead while this tensor is computed
            for piece in output.produce():
                check_cancel(cancel, what)
                writer.write(piece)
                meter.advance(entry.name, piece.numel() * piece.element_size())
            meter.advance(entry.name, tensors=1)
        check_cancel(cancel, what)
        if before_finish is not None:
            before_finish()
        check_cancel(cancel, what)
        return writer.finish(values)


def copy_model_config(inputs: Sequence[str | os.PathLike[str]], output: str | os.PathLike[str]) -> Path | None:
    """Copy the first input's same-name `.yaml` (a model config some checkpoints need) beside `output`.

    The WebUIs load a checkpoint with the config that shares its name; a merge or bake of a
    checkpoint that has one needs it too. Returns the written config, or None if no input has one.
    """
    for source in inputs:
        config = Path(source).with_suffix(".yaml")
        if config.is_file():
            target = Path(output).with_suffix(".yaml")
            write_bytes(target, config.read_bytes())
            return target
    return None
