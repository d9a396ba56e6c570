"""A norm or a gated activation feeding a linear -> one op that computes both (``kernelstack::rms_norm_linear``,
``add_rms_norm_linear``, ``act_and_mul_linear``).

Anchored on ``linear_cat`` (the projections pass made every linear over parameters one): when its input is an
``rms_norm``, the normalised half of an ``add_rms_norm`` or an ``act_and_mul`` that nothing else reads, the two
become one op whose contract is exactly the pair. On the GPU at decode batch sizes the producer then runs in the
GEMV's prologue, one launch where there were two (input norm -> q/k/v, post-attention norm -> gate/up, SiLU*mul ->
down: 3 launches a layer fewer). The final norm stays: lm_head reads a slice of it (HF's ``logits_to_keep``).

Off unless ``KERNELSTACK_GEMV_PROLOGUE=1``: without the prologue kernels the fused op runs the same two kernels, so
the rewrite buys nothing, and it is not yet measured on a GPU. It then leaves every site, saying so.
"""

import operator

import torch

from ksbackend.kernels import gemv_prologue_enabled
from ksbackend.ops import fused_linear as _fused_linear_ops  # noqa: F401  (registers the ops)

from .base import GraphPass
from .base import describe
from .base import kernelstack_op
from .projections import PACK_META

ks = torch.ops.kernelstack
FUSED = {"kernelstack::rms_norm": ks.rms_norm_linear.default,
         "kernelstack::add_rms_norm": ks.add_rms_norm_linear.default,
         "kernelstack::act_and_mul": ks.act_and_mul_linear.default}


def _producer(linear):
    """(the op making ``linear``'s input, the getitem of it when it is a tuple's part) or a reason to leave it."""
    x = linear.args[0]
    part = None
    if x.op == "call_function" and x.target is operator.getitem and x.args[1] == 0:
        part, x = x, x.args[0]
    name = kernelstack_op(x)
    if name not in FUSED or (name == "kernelstack::add_rms_norm") != (part is not None):
        return None
    if len((part or x).users) != 1:
        return f"{name.split('::')[1]}'s output is read by more than this linear"
    return x, part


class LinearProloguePass(GraphPass):
    name = "linear_prologue"

    def run(self, gm, result):
        enabled = gemv_prologue_enabled()
        for linear in [n for n in gm.graph.nodes if kernelstack_op(n) == "kernelstack::linear_cat"]:
            found = _producer(linear)
            if found is None:
                continue  # its input comes from elsewhere (attention's output, the embedding): nothing to fold
            site = describe(linear)
            if not enabled and not isinstance(found, str):  # a site that could not fold keeps its own reason
                found = "off: KERNELSTACK_GEMV_PROLOGUE=1 folds it (then the GEMV computes its input)"
            if isinstance(found, str):
                result.leave(site, found)
                continue
            producer, part = found
            name = kernelstack_op(producer).split("::")[1]
            self._rewrite(gm, producer, part, linear)
            result.match(f"{site}: {name} -> the linear's prologue")

    @staticmethod
    def _rewrite(gm, producer, part, linear):
        graph = gm.graph
        weights, biases = linear.args[1], linear.args[2]
        with graph.inserting_before(producer):  # where the producer was: the residual sum's readers come after it
            fused = graph.call_function(FUSED[kernelstack_op(producer)], (*producer.args, weights, biases))
        if part is None:  # one output: the op takes the linear's place
            fused.meta = dict(linear.meta)
            linear.replace_all_uses_with(fused)
            graph.erase_node(linear)
            graph.erase_node(producer)
            return
        # add_rms_norm_linear returns (the linear's output, the residual sum) as add_rms_norm returned (normed, sum)
        fused.meta = {**linear.meta, "example_value": (linear.meta.get("example_value"),
                                                       producer.meta.get("example_value", (None, None))[1])}
        fused.meta.pop("val", None)
        with graph.inserting_after(fused):
            out = graph.call_function(operator.getitem, (fused, 0))
        out.meta = {key: value for key, value in linear.meta.items() if key != PACK_META}  # the op packs, once
        linear.replace_all_uses_with(out)
        graph.erase_node(linear)
        graph.erase_node(part)
        producer.replace_all_uses_with(fused)  # the remaining getitem(producer, 1) reads the sum from the new op
        graph.erase_node(producer)
