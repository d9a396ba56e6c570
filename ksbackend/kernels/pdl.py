"""Programmatic dependent launch (Hopper and later), for the small kernels of a decode step.

A decode step at batch 1 is ~150-300 kernels of a few microseconds each, and between two of them the GPU idles
while the next one is launched and its blocks set up. Launched with PDL, a kernel's blocks start as soon as every
block of the kernel before it has signalled (``gdc_launch_dependents``, which our kernels do first thing), read
what does not depend on it (a GEMV's weights, a norm's weight), and wait (``gdc_wait``) only before touching what
the previous kernel writes. CUDA graphs keep the programmatic edge.

Off unless ``KERNELSTACK_PDL=1``: kept only where it measures faster (docs/benchmarks.md).
"""

import os

import torch


def enabled(device: torch.device) -> bool:
    """PDL for kernels launched on ``device``: asked for, a CUDA device of compute capability 9+, a Triton that
    has the grid-dependency ops, and not the interpreter (which cannot run them)."""
    if os.environ.get("KERNELSTACK_PDL", "0") != "1" or device.type != "cuda":
        return False
    if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.get_device_capability(device)[0] < 9:
        return False
    import triton.language as tl

    return hasattr(tl.extra.cuda, "gdc_wait") and hasattr(tl.extra.cuda, "gdc_launch_dependents")


def launch_options(device: torch.device) -> dict:
    """Keyword arguments for a Triton launch: the kernel's ``PDL`` constexpr, and the launch attribute with it."""
    return {"PDL": True, "launch_pdl": True} if enabled(device) else {"PDL": False}
