"""What every benchmark section shares: the copy bandwidth of this run, kernel timing, tables."""

import time

import torch


def copy_bandwidth() -> float:
    """Bytes read + written per second by a large device-to-device copy (the run's bandwidth ceiling)."""
    from triton.testing import do_bench

    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=200, return_mode="median")
    return 2 * src.numel() / (ms * 1e-3)


def bench_us(fn) -> float:
    """Median time of one call, replayed from a CUDA graph: decode runs that way, and it removes host
    launch overhead equally for every candidate, so small shapes compare kernels, not launchers."""
    from triton.testing import do_bench_cudagraph

    fn()  # compile / JIT / autotune outside the capture
    return 1e3 * do_bench_cudagraph(fn, rep=100, return_mode="median")


def wall(fn, sync=True):
    """(result, seconds) of one call, the device synchronised on both sides."""
    if sync and torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if sync and torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def table(out: list, title: str, header: list, rows: list) -> None:
    """Append a markdown table (and print it as it grows, so a cut-off run still shows what it measured)."""
    out += [f"\n### {title}\n", row(header), row(["---"] * len(header))]
    print(f"\n### {title}\n{out[-2]}", flush=True)
    for cells in rows:
        out.append(row(cells))
        print(out[-1], flush=True)
