"""Programmatic dependent launch (Hopper and later), for the small kernels of a decode step.

A decode step at batch 1 is ~150-300 kernels of a few microseconds each, and between two of them the GPU idles
while the next one is launched and its blocks set up. Launched with PDL, a kernel's blocks start as soon as every
block of the kernel before it has signalled (``gdc_launch_dependents``, which our kernels do first thing), and wait
(``gdc_wait``) before reading or writing anything an earlier kernel may touch. Only a GEMV over a parameter reads
before the wait: its first K slice of weights, which no kernel of a step writes. CUDA graphs keep the edge.

On by default on Hopper, where it measured faster (docs/benchmarks.md: H100, Llama-3.2-1B batch 1 replay
1.35 -> 1.29 ms, the 135M shape 0.92 -> 0.80 ms) and changed no token; ``KERNELSTACK_PDL=0`` turns it off.
"""

import functools
import os

import torch


@functools.lru_cache(maxsize=None)
def _unsupported(device_index: int) -> str | None:
    """Why a CUDA device cannot use PDL, or None. Cached: it is asked at every launch."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "the Triton interpreter cannot run grid-dependency waits"
    if torch.version.hip:
        return "a ROCm device (grid-dependency control is an NVIDIA feature)"
    major, minor = torch.cuda.get_device_capability(device_index)
    if major < 9:
        return f"needs compute capability 9.0+, this GPU has {major}.{minor}"
    import triton.language as tl

    if not (hasattr(tl.extra.cuda, "gdc_wait") and hasattr(tl.extra.cuda, "gdc_launch_dependents")):
        return "this Triton has no grid-dependency ops"
    return None


def off_reason(device: torch.device) -> str | None:
    """Why kernels launched on ``device`` run without PDL, or None when they use it."""
    if device.type != "cuda":
        return f"not a CUDA device ({device.type})"
    if os.environ.get("KERNELSTACK_PDL", "1") == "0":
        return "KERNELSTACK_PDL=0"
    return _unsupported(torch.cuda.current_device() if device.index is None else device.index)


def enabled(device: torch.device) -> bool:
    return off_reason(device) is None


def launch_options(device: torch.device) -> dict:
    """Keyword arguments for a Triton launch: the kernel's ``PDL`` constexpr, and the launch attribute with it."""
    return {"PDL": True, "launch_pdl": True} if enabled(device) else {"PDL": False}
