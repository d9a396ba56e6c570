"""Rotary embedding applied to q and k -> one ``kernelstack::rope`` call per attention.

Anchored on ``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = cat((-x[..., h:], x[..., :h]), -1)``
and ``h`` half the head size (partial rotary embeddings are left alone). The two sites that share the
same cos/sin nodes (q and k of one attention) become one op, so the kernel rotates both in one launch.
"""

import operator

from collections import defaultdict

import torch

from ksbackend.ops import rope as _rope_ops  # noqa: F401  (registers the op)

from .base import GraphPass
from .base import arg
from .base import describe
from .base import erase_unused
from .base import is_op
from .base import other_operand
from .base import shape_of
from .base import users_outside

ks = torch.ops.kernelstack


def _half_slice(getitem, x):
    """For ``x[..., a:b]`` return (a, b), else None."""
    if not (is_op(getitem, "getitem") and getitem.args[0] is x):
        return None
    index = getitem.args[1]
    if isinstance(index, tuple) and len(index) == 2 and index[0] is Ellipsis and isinstance(index[1], slice):
        s = index[1]
        if s.step in (None, 1):
            return s.start, s.stop
    return None


def match_rotate_half(cat):
    """``cat((-x[..., h:], x[..., :h]), dim=-1)`` -> (x, h, nodes), else None."""
    if not is_op(cat, "cat"):
        return None
    parts = cat.args[0]
    if not (isinstance(parts, (list, tuple)) and len(parts) == 2 and arg(cat, 1, "dim", 0) in (-1, 3)):
        return None
    neg, first = parts
    if not is_op(neg, "neg"):
        return None
    second = neg.args[0]
    x = first.args[0] if is_op(first, "getitem") else None
    lo, hi = _half_slice(first, x) or (None, None), _half_slice(second, x) or (None, None)
    if x is None or lo[0] not in (None, 0) or hi[1] is not None or lo[1] != hi[0] or lo[1] is None:
        return None
    return x, lo[1], [first, second, neg, cat]


class RopePass(GraphPass):
    name = "rope"

    def run(self, gm, result):
        sites = defaultdict(list)
        for add in [n for n in gm.graph.nodes if is_op(n, "add") and len(n.args) == 2]:
            found = self._match(add)
            if found is None:
                continue
            if isinstance(found, str):
                result.leave(describe(add), found)
                continue
            sites[(found["cos"], found["sin"])].append(found)
        for (cos, sin), group in sites.items():
            if len(group) != 2:
                for site in group:
                    result.leave(describe(site["end"]), f"{len(group)} rotations share this cos/sin; expected q and k")
                continue
            reason = self._rewrite(gm, cos, sin, *group)
            if reason:
                result.leave(describe(group[0]["end"]), reason)
            else:
                result.match(f"{describe(group[0]['end'])}: rotate_half on q {shape_of(group[0]['x'])} and k {shape_of(group[1]['x'])}")

    def _match(self, add):
        left, right = add.args
        if not (is_op(left, "mul") and is_op(right, "mul")):
            return None
        for direct, rotated in ((left, right), (right, left)):
            for operand in rotated.args:
                found = match_rotate_half(operand)
                if found is None:
                    continue
                x, half, nodes = found
                cos = other_operand(direct, x)
                sin = other_operand(rotated, operand)
                if cos is None or sin is None:
                    continue
                head = (shape_of(x) or (None,))[-1]
                if head != 2 * half:
                    return f"partial rotary embedding (rotates {2 * half} of {head} dims)"
                for table in (cos, sin):
                    ts = shape_of(table)
                    if ts is None or ts[-1] != head or len(ts) != len(shape_of(x)):
                        return f"cos/sin shape {ts} does not broadcast over x {shape_of(x)} on all dims"
                chain = nodes + [direct, rotated, add]
                if users_outside(chain):
                    return "an intermediate of the rotation is used elsewhere"
                return dict(x=x, cos=cos, sin=sin, chain=chain, end=add)
        return None

    @staticmethod
    def _rewrite(gm, cos, sin, first, second):
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        early, late = sorted((first, second), key=lambda s: order[s["end"]])
        if any(order[u] < order[late["end"]] for u in early["end"].users):
            return "the first rotated tensor is used before the second is computed"
        with gm.graph.inserting_after(late["end"]):
            fused = gm.graph.call_function(ks.rope.default, (early["x"], late["x"], cos, sin))
        with gm.graph.inserting_after(fused):
            out_early = gm.graph.call_function(operator.getitem, (fused, 0))
        with gm.graph.inserting_after(out_early):
            out_late = gm.graph.call_function(operator.getitem, (fused, 1))
        out_early.meta, out_late.meta = dict(early["end"].meta), dict(late["end"].meta)
        early["end"].replace_all_uses_with(out_early)
        late["end"].replace_all_uses_with(out_late)
        erase_unused(early["chain"] + late["chain"])
        return None
