"""Runs an ordered list of passes over one graph, safely.

Each pass works on the live graph; a copy taken before it runs is put back if it raises, so a
failing pass costs its rewrites, never correctness. Every outcome is logged through the
``ksbackend`` logger and returned as ``PassResult``s for the explain report.
"""

import logging
import time
import traceback

import torch.fx as fx

from .base import PassResult

log = logging.getLogger("ksbackend")


def _copy_graph(graph: fx.Graph) -> fx.Graph:
    new = fx.Graph(owning_module=graph.owning_module, tracer_cls=graph._tracer_cls)
    out = new.graph_copy(graph, {})
    new.output(out)
    return new


def run_passes(gm: fx.GraphModule, passes) -> list[PassResult]:
    results = []
    for graph_pass in passes:
        result = PassResult(graph_pass.name)
        saved = _copy_graph(gm.graph)
        start = time.perf_counter()
        try:
            graph_pass.run(gm, result)
            gm.graph.lint()
        except Exception as exc:  # a broken pass must never break the model
            gm.graph = saved
            result.matched.clear()
            result.error = f"{type(exc).__name__}: {exc}"
            log.warning("kernelstack pass %s failed and was undone: %s\n%s", graph_pass.name, result.error,
                        traceback.format_exc())
        result.elapsed_ms = (time.perf_counter() - start) * 1e3
        log.info("pass %-13s matched %d, left %d%s", graph_pass.name, len(result.matched), len(result.left),
                 f", FAILED ({result.error})" if result.error else "")
        for site, reason in result.left:
            log.debug("pass %s left %s: %s", graph_pass.name, site, reason)
        results.append(result)
    gm.recompile()
    return results
