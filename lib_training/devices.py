"""Choosing the device and dtype to run on."""

from __future__ import annotations

import ctypes
import functools
import sys

import torch

from lib_training.errors import ConfigError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def pick_device(name: str = "auto") -> torch.device:
    """ "auto" is the first CUDA GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} was asked for, but no CUDA GPU is available. Use --device cpu.")
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """ "auto" is fp16 on a GPU (bf16 where supported) and fp32 on the CPU."""
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def give_back_freed_memory() -> None:
    """Return the memory a finished job freed to the system: CUDA's cached blocks, and on Linux the C
    allocator's free pages. glibc keeps what a CPU job freed (activations, gradients) otherwise:
    gigabytes, in a WebUI that goes on running."""
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # musl and others: nothing to trim this way
        return None
    return libc if hasattr(libc, "malloc_trim") else None
