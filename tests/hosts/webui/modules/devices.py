"""Stand-in for `modules.devices` on a CPU-only WebUI (--use-cpu all --no-half)."""

import contextlib

import torch

cpu = torch.device("cpu")
device = cpu
dtype = torch.float32
dtype_vae = torch.float32
dtype_unet = torch.float32
dtype_inference = torch.float32
unet_needs_upcast = False
fp8 = False
gc_calls = 0


def autocast(disable=False):
    return contextlib.nullcontext()


def torch_gc():
    global gc_calls
    gc_calls += 1


def cond_cast_unet(x):
    return x.to(dtype_unet)
