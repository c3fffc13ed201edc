"""Stand-in for ldm's `diffusionmodules.util.checkpoint` (A1111 keeps it disabled)."""


def checkpoint(func, inputs, params, flag):
    if flag:
        raise RuntimeError("ldm's CheckpointFunction fails on frozen parameters; A1111 never enables it")
    return func(*inputs)
