"""The overhead chain as a picture: for batch sizes 1..256, a decode step's time split into GPU-kernel,
launch and Python/framework time, for HF eager, HF static cache + torch.compile and kernelstack.

Every part is measured in this run, the same way for every system:
- the step's wall time W: decode-only ms/token of ``model.generate`` (two lengths differenced);
- GPU-kernel time K and the kernel count n: a profiler's kernel list, differenced the same way;
- launch: n times the cost of one kernel launch measured here, from the host for systems that launch
  from Python (HF eager), inside a replayed CUDA graph for those that replay graphs (the other two);
- Python/framework: what is left, W - K - launch (the host's own work the GPU waits for).
"""

import torch

from .common import table
from .common import wall
from .generate import fresh_compile
from .generate import load
from .generate import measure
from .generate import scenario_prompts

BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
STATIC_BATCHES = (1, 4, 16, 64, 256)  # HF static + compile compiles per batch size: fewer points
SHORT, LONG = 8, 40


def launch_costs(count=2000):
    """Microseconds per tiny kernel: launched from Python one by one, and replayed inside a CUDA graph."""
    x = torch.zeros(1, device="cuda")

    def many():
        for _ in range(count):
            x.add_(1)

    many()
    _, eager = wall(many)
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        many()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        many()
    graph.replay()
    _, replay = wall(graph.replay)
    return 1e6 * eager / count, 1e6 * replay / count


def kernels_per_step(model, ids, mask, **extra):
    """(kernels, kernel ms) per decode step: profiler totals of the two generate lengths ``measure`` already ran
    (so nothing compiles or captures here), differenced."""
    totals = []
    for new in (SHORT, LONG):
        kwargs = dict(attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0, **extra)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            model.generate(ids, **kwargs)
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time > 0]
        totals.append((len(kernels), sum(e.device_time for e in kernels) / 1e3))
    return (totals[1][0] - totals[0][0]) / (LONG - SHORT), (totals[1][1] - totals[0][1]) / (LONG - SHORT)


def run(bw, out, name="llama-3.2-1b", png="docs/overhead.png"):
    import ksbackend

    eager_us, graph_us = launch_costs()
    model = load(name)
    points = []
    for system in ("hf-eager", "hf-static", "kernelstack"):
        batches = STATIC_BATCHES if system == "hf-static" else BATCHES
        if system == "kernelstack":
            ksbackend.optimize(model)
        for batch in batches:
            ids, mask, _ = scenario_prompts(model, batch, ragged=False)
            extra = dict(cache_implementation="static") if system == "hf-static" else {}
            try:
                with fresh_compile(system):  # a static graph per batch size for HF static, not a dynamic one
                    w = measure(model, ids, mask, lengths=(SHORT, LONG), **extra)[0]["decode_ms"]
                    n, k = kernels_per_step(model, ids, mask, **extra)
            except Exception as exc:  # e.g. out of memory at the largest batch: keep the other points
                print(f"overhead {system} batch {batch}: failed: {type(exc).__name__}: {exc}", flush=True)
                continue
            launch = min(n * (eager_us if system == "hf-eager" else graph_us) / 1e3, max(w - k, 0.0))
            points.append(dict(system=system, batch=batch, wall=w, kernels=n, kernel_ms=k, launch_ms=launch,
                               python_ms=max(w - k - launch, 0.0)))
            print(points[-1], flush=True)
            torch.cuda.empty_cache()
    ksbackend.restore(model)
    table(out, f"Decode step split ({name}, 128-token prompts; launch = kernels x {eager_us:.1f} us from Python, "
               f"x {graph_us:.2f} us inside a graph, both measured in this run), ms per step",
          ["system", "batch", "step (wall)", "GPU kernels", "launch", "Python / framework", "kernels per step"],
          [[p["system"], p["batch"], f"{p['wall']:.2f}", f"{p['kernel_ms']:.2f}", f"{p['launch_ms']:.2f}",
            f"{p['python_ms']:.2f}", f"{p['kernels']:.0f}"] for p in points])
    if png:
        plot(points, png, name)
        out.append(f"\n![decode step split]({png})")
    return points


def plot(points, path, name):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = ("hf-eager", "hf-static", "kernelstack")
    labels = {"hf-eager": "HF eager", "hf-static": "HF static + compile", "kernelstack": "kernelstack"}
    parts = [("kernel_ms", "GPU kernels", "#4c72b0"), ("launch_ms", "launch", "#dd8452"),
             ("python_ms", "Python / framework", "#c44e52")]
    fig, axes = plt.subplots(1, len(systems), figsize=(15, 4.8), sharey=True)
    for ax, system in zip(axes, systems):
        mine = [p for p in points if p["system"] == system]
        xs = range(len(mine))
        bottom = [0.0] * len(mine)
        for key, label, color in parts:  # shares of the step, so every batch size reads on one scale
            values = [100 * p[key] / max(sum(p[k] for k, _, _ in parts), 1e-9) for p in mine]
            ax.bar(xs, values, bottom=bottom, color=color, label=label)
            bottom = [b + v for b, v in zip(bottom, values)]
        for x, p in zip(xs, mine):
            ax.text(x, 101, f"{p['wall']:.1f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(xs), [str(p["batch"]) for p in mine])
        ax.set_title(labels[system])
        ax.set_xlabel("batch size (ms per step above each bar)")
        ax.set_ylim(0, 112)
    axes[0].set_ylabel("share of the decode step (%)")
    axes[0].legend(loc="lower left")
    fig.suptitle(f"Where a decode step's time goes ({name}, bf16, {torch.cuda.get_device_name()})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
