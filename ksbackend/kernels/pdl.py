"""Programmatic dependent launch (Hopper and later), for the small kernels of a decode step.

A decode step at batch 1 is ~150-300 kernels of a few microseconds each, and between two of them the GPU idles
while the next one is launched and its blocks set up. Launched with PDL, a kernel's blocks start as soon as every
block of the kernel before it has signalled (``gdc_launch_dependents``, which our kernels do first thing), read
what does not depend on it (a GEMV's weights, a norm's weight), and wait (``gdc_wait``) only before touching what
the previous kernel writes. CUDA graphs keep the programmatic edge.

On by default on Hopper, where it measured faster (docs/benchmarks.md: H100, Llama-3.2-1B batch 1 replay
1.35 -> 1.29 ms, the 135M shape 0.92 -> 0.80 ms) and changed no token; ``KERNELSTACK_PDL=0`` turns it off.
"""

import os

import torch


def enabled(device: torch.device) -> bool:
    """PDL for kernels launched on ``device``: not turned off, a CUDA device of compute capability 9+, a Triton
    that has the grid-dependency ops, and not the interpreter (which cannot run them)."""
    if os.environ.get("KERNELSTACK_PDL", "1") == "0" or device.type != "cuda":
        return False
    if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.get_device_capability(device)[0] < 9:
        return False
    import triton.language as tl

    return hasattr(tl.extra.cuda, "gdc_wait") and hasattr(tl.extra.cuda, "gdc_launch_dependents")


def launch_options(device: torch.device) -> dict:
    """Keyword arguments for a Triton launch: the kernel's ``PDL`` constexpr, and the launch attribute with it."""
    return {"PDL": True, "launch_pdl": True} if enabled(device) else {"PDL": False}
