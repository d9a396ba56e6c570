"""The Dynamo backend: options -> passes -> executor.

``torch.compile(model, backend="kernelstack", options={...})`` finds ``kernelstack_backend`` through
the ``torch_dynamo_backends`` entry point. It runs the pass pipeline over the torch-level graph, records
what happened for the explain report, and hands what remains to Inductor (or runs it as plain FX).
"""

import collections
import contextlib
import logging
import time

import torch

from passes import DEFAULT_PASSES, RMSNormPass, as_pass, run_passes
from passes.base import kernelstack_op

from . import ops
from .config import BackendOptions
from .report import GLOBAL, GraphReport

log = logging.getLogger("ksbackend")

_recorders = [GLOBAL]  # the global one, plus one per optimized model while it compiles


@contextlib.contextmanager
def recording_into(recorder):
    """Also record the graphs compiled inside this block into ``recorder`` (used by ``optimize``)."""
    _recorders.append(recorder)
    try:
        yield
    finally:
        _recorders.remove(recorder)


def select_passes(opts: BackendOptions):
    chosen = []
    for graph_pass in DEFAULT_PASSES:
        if graph_pass.name in opts.disable_passes:
            continue
        if isinstance(graph_pass, RMSNormPass) and graph_pass.fuse_residual_add != opts.fuse_residual_add:
            graph_pass = RMSNormPass(fuse_residual_add=opts.fuse_residual_add)
        chosen.append(graph_pass)
    return chosen + [as_pass(p) for p in opts.extra_passes]


def _graph_device(example_inputs) -> str:
    for value in example_inputs:
        if isinstance(value, torch.Tensor):
            return value.device.type
    return "cpu"


def _input_shapes(gm) -> str:
    """The integer inputs' shapes as Dynamo traced them (token ids, positions, indices: what changes from
    call to call); a symbol such as s0 is a dynamic dimension."""
    values = [n.meta.get("example_value") for n in gm.graph.nodes if n.op == "placeholder"]
    return ", ".join(str(list(v.shape)) for v in values if isinstance(v, torch.Tensor) and not v.is_floating_point())


def kernelstack_backend(gm: torch.fx.GraphModule, example_inputs, options=None, mode=None, **unexpected):
    """Rewrite ``gm`` onto kernelstack ops, then compile the rest (Inductor) or run it as FX."""
    if unexpected:
        raise TypeError(f"kernelstack backend got unexpected keyword(s) {sorted(unexpected)}; "
                        "pass backend settings as torch.compile(..., options={...})")
    opts = BackendOptions.from_options(options, mode)
    start = time.perf_counter()
    device = _graph_device(example_inputs)
    report = GraphReport(index=len(GLOBAL.graphs), device=device, executor=opts.executor,
                         nodes_before=len(gm.graph.nodes), inputs=_input_shapes(gm))
    report.passes = run_passes(gm, select_passes(opts))
    counts = collections.Counter(name for name in map(kernelstack_op, gm.graph.nodes) if name)
    report.ops = dict(counts)
    report.implementations = {name: ops.implementation(name, device) for name in counts}
    report.nodes_after = len(gm.graph.nodes)

    if opts.executor == "fx":
        compiled = gm.forward
    else:
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        patches = list_mode_options(opts.mode) if opts.mode not in (None, "default") else {}
        compiled = compile_fx(gm, example_inputs, config_patches=patches)
    report.compile_ms = (time.perf_counter() - start) * 1e3
    for recorder in _recorders:
        recorder.add_graph(report)
    log.info("kernelstack compiled graph %d on %s: %s", report.index, device,
             ", ".join(f"{p.name}={len(p.matched)}" for p in report.passes))
    return compiled
