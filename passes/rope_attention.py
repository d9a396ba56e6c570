"""RoPE feeding paged attention -> one ``kernelstack::rope_paged_attention`` (rotate, append, attend).

Anchored on ``kernelstack::paged_attention`` (placed by kernelstack's HF attention interface): where its
q and k are ``rope(q, k, cos, sin)``'s outputs, each only taken as ``x[0].transpose(0, 1)`` on the way
in, the rotation moves into the attention op. On CUDA one kernel then rotates q and k and writes K/V
into their cache slots (three launches a layer become one).
"""

import torch

from ksbackend.ops import paged_attention as _paged_ops  # noqa: F401  (registers the op)

from .base import GraphPass
from .base import describe
from .base import dtype_of
from .base import erase_unused
from .base import is_op
from .base import kernelstack_op

ks = torch.ops.kernelstack


def _table_before_cast(table, dtype):
    """For ``table = unsqueeze(t.to(dtype), d)`` with t fp32 (HF's ``cos.to(x.dtype)`` then its per-layer
    unsqueeze): the same view of t, which the fused op rounds to q's dtype itself. Inductor realises a cast feeding
    an opaque op once per consumer, so handing the op the cast cost one copy kernel per layer; the fp32 table is
    already a buffer. Anything else: None."""
    if not (is_op(table, "unsqueeze") and is_op(table.args[0], "to")):
        return None
    cast = table.args[0]
    source = cast.args[0]
    target = cast.kwargs.get("dtype", cast.args[1] if len(cast.args) > 1 else None)
    if target != dtype or dtype == torch.float32 or len(cast.args) > 2 or set(cast.kwargs) - {"dtype"} \
            or dtype_of(source) != torch.float32:
        return None
    return source, table.args[1:]


def _rope_output(node):
    """``rope(...)[i][0].transpose(0, 1)`` -> (rope node, i, nodes on the way), else None."""
    if not (is_op(node, "transpose") and tuple(node.args[1:3]) in ((0, 1), (1, 0))):
        return None
    batch = node.args[0]
    if not (is_op(batch, "getitem") and batch.args[1] == 0):
        return None
    out = batch.args[0]
    if not (is_op(out, "getitem") and kernelstack_op(out.args[0]) == "kernelstack::rope"):
        return None
    return out.args[0], out.args[1], [node, batch, out]


class RopeIntoAttentionPass(GraphPass):
    name = "rope_into_attention"

    def run(self, gm, result):
        for attention in [n for n in gm.graph.nodes if kernelstack_op(n) == "kernelstack::paged_attention"]:
            site = describe(attention)
            q_side, k_side = _rope_output(attention.args[0]), _rope_output(attention.args[1])
            if q_side is None or k_side is None or q_side[0] is not k_side[0] or (q_side[1], k_side[1]) != (0, 1):
                result.leave(site, "q and k do not come straight from one kernelstack::rope")
                continue
            rope = q_side[0]
            chain = q_side[2] + k_side[2]
            if any(len(n.users) != 1 for n in chain) or len(rope.users) != 2:
                result.leave(site, "the rotated q or k is also used outside the attention")
                continue
            q, k, cos, sin = rope.args
            tables = [_table_before_cast(t, dtype_of(q)) for t in (cos, sin)]
            casts = [cos, sin, cos.args[0], sin.args[0]] if all(tables) else []
            with gm.graph.inserting_before(attention):  # in creation order, after every input of the attention
                if all(tables):
                    cos, sin = (gm.graph.call_method("unsqueeze", (source, *dims)) for source, dims in tables)
                fused = gm.graph.call_function(ks.rope_paged_attention.default,
                                               (q, k, attention.args[2], cos, sin, *attention.args[3:]))
            fused.meta = dict(attention.meta)
            attention.replace_all_uses_with(fused)
            erase_unused([attention] + chain + [rope] + casts)  # a cast other layers still read stays
            table = " (the fp32 table, rounded in the op)" if all(tables) else ""
            result.match(f"{site}: rope + K/V append + attention{table}")

