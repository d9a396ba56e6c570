"""The Dynamo backend: options -> passes -> executor.

``torch.compile(model, backend="kernelstack", options={...})`` finds ``kernelstack_backend`` through
the ``torch_dynamo_backends`` entry point. It runs the pass pipeline over the torch-level graph, records
what happened for the explain report, and hands what remains to Inductor (or runs it as plain FX).
"""

import collections
import contextlib
import logging
import threading
import time

import torch

import passes  # the module, not its names: ``import passes`` first imports ksbackend while passes is half done

from . import ops
from .config import BackendOptions
from .distributed import collective_ops
from .report import GLOBAL
from .report import GraphReport
from .report import Recorder

log = logging.getLogger("ksbackend")

class _ThreadListeners(threading.local):
    """Who hears of this thread's compiles and runtime decisions: two models generating in two threads each get
    their own graphs and events in their reports."""

    def __init__(self):
        self.recorders = []  # one per optimized model generating (or compiling) in this thread
        self.observers = []  # callables told of each graph compiled here: (report, the weight groups it packed)


_listeners = _ThreadListeners()


def _recorders():
    """The global recorder, then this thread's."""
    return [GLOBAL, *_listeners.recorders]


@contextlib.contextmanager
def recording_into(recorder):
    """Also record the graphs compiled inside this block into ``recorder`` (used by ``optimize``)."""
    _listeners.recorders.append(recorder)
    try:
        yield
    finally:
        _listeners.recorders.remove(recorder)


@contextlib.contextmanager
def observing_compiles(observer):
    """Call ``observer(report, packed)`` for each graph compiled inside this block; ``packed`` is the list of
    weight groups (each a list of the parameters themselves) laid out back to back for it. The compile cache
    stores both with a precompiled function, since a process that loads it never runs this backend."""
    _listeners.observers.append(observer)
    try:
        yield
    finally:
        _listeners.observers.remove(observer)


def record_event(message: str) -> None:
    """A decision made while a model runs (a kernel measured fastest for a shape): into the process-wide report
    and, inside ``recording_into``, the optimized model's own."""
    GLOBAL.event(message)
    for recorder in _listeners.recorders:
        if isinstance(recorder, Recorder):
            recorder.events.append(message)


def add_loaded_graph(report: GraphReport) -> None:
    """Record a graph compiled by an earlier process (loaded whole from the compile cache) as if compiled here."""
    report.index = len(GLOBAL.graphs)
    for recorder in _recorders():
        recorder.add_graph(report)


def forget_graphs(reports) -> None:
    """Take back graphs whose compile was thrown away (a failed attempt to store them, compiled again after)."""
    for recorder in _recorders():
        if isinstance(recorder, Recorder):  # (not a progress bar's counter)
            recorder.forget_graphs(reports)


def select_passes(opts: BackendOptions):
    chosen = []
    for graph_pass in passes.DEFAULT_PASSES:
        if graph_pass.name in opts.disable_passes:
            continue
        if isinstance(graph_pass, passes.RMSNormPass) and graph_pass.fuse_residual_add != opts.fuse_residual_add:
            graph_pass = passes.RMSNormPass(fuse_residual_add=opts.fuse_residual_add)
        chosen.append(graph_pass)
    return chosen + [passes.as_pass(p) for p in opts.extra_passes]


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


def _pack_weights(gm, example_inputs) -> list:
    """Lay out the weights each fused GEMM reads back to back, once (the parameters become views of one
    buffer: same values, no extra memory). Returns the groups that now read one buffer."""
    from .ops.linear import pack_adjacent

    inputs = {n.name: v for n, v in zip((n for n in gm.graph.nodes if n.op == "placeholder"), example_inputs)}
    packed = []
    for node in gm.graph.nodes:
        for names in node.meta.get(passes.projections.PACK_META, ()):
            tensors = [inputs.get(name) for name in names]
            if all(isinstance(t, torch.Tensor) for t in tensors) and pack_adjacent(tensors):
                packed.append(tensors)
    return packed


class _ShortOperatorMessages:
    """While kernelstack compiles, Inductor's messages about an op name it and its arguments' types instead of
    printing every argument's IR.

    Why: the first time Inductor (torch 2.12 and older) meets a custom op without a lowering, it formats "Creating
    implicit fallback for: <each argument's IR>" for a log line, even with that log off, and an argument's IR prints
    its whole producer tree. On an H100 (torch 2.11) that string held the Llama-3.2-1B prefill compile for minutes.
    Messages of errors raised meanwhile are short too: the backend logs their first line only. Counted, so threads
    compiling at once restore the original when the last one finishes."""

    def __init__(self):
        self._lock = threading.Lock()
        self._depth = 0
        self._saved = None

    @staticmethod
    def _short(target, args, kwargs) -> str:
        kinds = ", ".join(type(arg).__name__ for arg in args)
        return f"  target: {target}\n  args: ({kinds})" + (f"\n  kwargs: {sorted(kwargs)}" if kwargs else "")

    @contextlib.contextmanager
    def __call__(self):
        from torch._inductor.exc import OperatorIssue

        if "operator_str" not in OperatorIssue.__dict__:  # another torch: nothing to shorten
            yield
            return
        with self._lock:
            if self._depth == 0:
                self._saved = OperatorIssue.__dict__["operator_str"]
                OperatorIssue.operator_str = staticmethod(self._short)
            self._depth += 1
        try:
            yield
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0:
                    OperatorIssue.operator_str = self._saved


short_operator_messages = _ShortOperatorMessages()


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
    report.passes = passes.run_passes(gm, select_passes(opts))
    counts = collections.Counter(name for name in map(passes.base.kernelstack_op, gm.graph.nodes) if name)
    report.ops = dict(counts)
    report.collectives = collective_ops(gm)
    report.implementations = {name: ops.implementation(name, device) for name in counts}
    report.nodes_after = len(gm.graph.nodes)

    if opts.executor == "fx":
        compiled = gm.forward
    else:
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        patches = list_mode_options(opts.mode) if opts.mode not in (None, "default") else {}
        try:
            with short_operator_messages():
                compiled = compile_fx(gm, example_inputs, config_patches=patches)
        except Exception as exc:  # noqa: BLE001  an Inductor limitation must not cost the user the rewrite
            # The rewritten graph is still correct as plain FX: each kernelstack op runs its own kernel and the rest
            # runs op by op. Slower, so the report and the log say so (seen: Inductor's CantSplit on a symbolic view
            # of a fused projection's slice under torch 2.11).
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            log.warning("kernelstack: Inductor failed on graph %d (%s); running it as FX instead", report.index,
                        reason)
            report.executor = f"fx (Inductor failed: {reason})"
            compiled = gm.forward
    # after compiling: AOTAutograd fakifies these very tensors against what Dynamo recorded of them
    packed = _pack_weights(gm, example_inputs)
    report.packed = sum(len(group) > 1 for group in packed)  # a lone weight is only registered as a parameter
    report.compile_ms = (time.perf_counter() - start) * 1e3
    for recorder in _recorders():
        recorder.add_graph(report)
    for observer in list(_listeners.observers):
        observer(report, packed)
    log.info("kernelstack compiled graph %d on %s: %s", report.index, device,
             ", ".join(f"{p.name}={len(p.matched)}" for p in report.passes))
    return compiled
