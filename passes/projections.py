"""Linears over parameters -> ``kernelstack::linear_cat``: one GEMM per input (q/k/v; gate/up; o; down; lm_head).

Anchored on the input: every ``F.linear(x, w[, b])`` reading the same ``x`` whose weight is a graph
input (a parameter), with one dtype and in-features, all with a bias or none. The fused output is
sliced back into the original outputs (views: no copies). The new node's meta names the weights, so the
backend can lay them out back to back once (``ops.linear.pack_adjacent``) and the GEMM reads one buffer.
A lone linear (o_proj, down_proj, lm_head) becomes a one-weight ``linear_cat`` too: on the GPU that op times
cuBLAS against Triton GEMVs per decode shape and keeps the winner, which Inductor's own ``F.linear`` never does.
"""

import operator

from collections import defaultdict

import torch
import torch.nn.functional as F

from ksbackend.ops import linear as _linear_ops  # noqa: F401  (registers the op)

from .base import GraphPass
from .base import arg
from .base import describe
from .base import dtype_of
from .base import shape_of

ks = torch.ops.kernelstack
PACK_META = "kernelstack_pack"  # node.meta key: the placeholder names whose tensors to lay out back to back


def _linear_parts(node):
    """(input, weight, bias) of an ``F.linear`` call, else None."""
    if node.op != "call_function" or node.target is not F.linear:
        return None
    return node.args[0], arg(node, 1, "weight"), arg(node, 2, "bias")


class ProjectionFusionPass(GraphPass):
    name = "projections"

    def run(self, gm, result):
        groups = defaultdict(list)
        for node in gm.graph.nodes:
            parts = _linear_parts(node)
            if parts is not None:
                groups[parts[0]].append(node)
        for x, linears in groups.items():
            site = describe(linears[0])
            reason = self._check(linears)
            if reason:
                result.leave(site, reason)
                continue
            self._rewrite(gm, x, linears)
            if len(linears) == 1:
                result.match(f"{site}: one linear ({shape_of(linears[0])[-1]} outputs) -> the measured GEMM")
            else:
                result.match(f"{site}: {len(linears)} linears over one input "
                             f"({' + '.join(str(shape_of(n)[-1]) for n in linears)} outputs) -> one GEMM")

    @staticmethod
    def _check(linears):
        weights = [_linear_parts(n)[1] for n in linears]
        biases = [_linear_parts(n)[2] for n in linears]
        if not all(isinstance(w, torch.fx.Node) and w.op == "placeholder" for w in weights):
            return "a weight is computed in the graph, not a parameter"
        if len({dtype_of(n) for n in linears}) != 1 or any(shape_of(n) is None for n in linears):
            return "outputs differ in dtype (or have no recorded shape)"
        if any(b is not None for b in biases) and not all(isinstance(b, torch.fx.Node) and b.op == "placeholder"
                                                          for b in biases):
            return "only some linears have a bias"
        return None

    @staticmethod
    def _rewrite(gm, x, linears):
        graph = gm.graph
        weights = [_linear_parts(n)[1] for n in linears]
        biases = [b for b in (_linear_parts(n)[2] for n in linears) if b is not None]
        order = {n: i for i, n in enumerate(graph.nodes)}
        first = min(linears, key=order.get)
        with graph.inserting_before(first):
            fused = graph.call_function(ks.linear_cat.default, (x, weights, biases))
        pack = [[w.name for w in weights]] + ([[b.name for b in biases]] if biases else [])
        if len(linears) == 1:  # nothing to slice: the op takes the linear's place, meta and all
            fused.meta = {**linears[0].meta, PACK_META: pack}
            linears[0].replace_all_uses_with(fused)
            graph.erase_node(linears[0])
            return
        fused.meta[PACK_META] = pack
        start = 0
        for node in linears:
            width = shape_of(node)[-1]
            with graph.inserting_after(fused):
                part = graph.call_function(operator.getitem, (fused, (Ellipsis, slice(start, start + width))))
            part.meta = dict(node.meta)
            node.replace_all_uses_with(part)
            graph.erase_node(node)
            start += width
