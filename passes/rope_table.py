"""The rotary embedding's cos/sin table -> ``kernelstack::rope_cos_sin``.

transformers writes ``freqs = pos * inv_freq`` two ways:
- 5.23: ``position_ids[..., None].float() * inv_freq.to(float32)``
- 5.17: ``(inv_freq[None, :, None].expand(B, -1, 1).float() @ position_ids[:, None, :].float()).transpose(1, 2)``
then ``emb = cat((freqs, freqs), -1)``, ``cos = emb.cos() * scaling``, ``sin = emb.sin() * scaling``.
Both become one op (one kernel instead of six in every decode step). The output shape is checked
against ``[*position_ids.shape, 2 * len(inv_freq)]``, so a form that reshapes differently is left alone.
"""

import operator

import torch

from ksbackend.ops import rope as _rope_ops  # noqa: F401  (registers the op)

from .base import GraphPass
from .base import describe
from .base import erase_unused
from .base import is_op
from .base import shape_of

ks = torch.ops.kernelstack


def _strip(node, *names):
    """Follow casts/expands/None-indexing back to the tensor they view; returns (base, nodes passed)."""
    passed = []
    while is_op(node, *names):
        if is_op(node, "getitem") and not (isinstance(node.args[1], tuple) and None in node.args[1]):
            break
        passed.append(node)
        node = node.args[0]
    return node, passed


def match_freqs(freqs):
    """-> (position_ids, inv_freq, nodes) for either spelling of ``pos * inv_freq``, else None."""
    if is_op(freqs, "mul"):  # 5.23
        a, b = freqs.args
        pos, pos_nodes = _strip(a, "to", "getitem")
        inv, inv_nodes = _strip(b, "to")
        if len(shape_of(inv) or ()) != 1:
            pos, pos_nodes, inv, inv_nodes = (*_strip(b, "to", "getitem"), *_strip(a, "to"))
        return pos, inv, pos_nodes + inv_nodes + [freqs]
    if is_op(freqs, "transpose") and is_op(freqs.args[0], "matmul"):  # 5.17
        matmul = freqs.args[0]
        inv, inv_nodes = _strip(matmul.args[0], "to", "expand", "getitem")
        pos, pos_nodes = _strip(matmul.args[1], "to", "getitem")
        return pos, inv, pos_nodes + inv_nodes + [matmul, freqs]
    return None


def _scaled(node):
    """``t * s`` with a constant s (or t itself): -> (end node, s, nodes)."""
    users = list(node.users)
    if len(users) == 1 and is_op(users[0], "mul") and len(users[0].args) == 2:
        s = users[0].args[1] if users[0].args[0] is node else users[0].args[0]
        if isinstance(s, (int, float)) and not isinstance(s, bool):
            return users[0], float(s), [node, users[0]]
    return node, 1.0, [node]


class RopeTablePass(GraphPass):
    name = "rope_cos_sin"

    def run(self, gm, result):
        for cat in [n for n in gm.graph.nodes if is_op(n, "cat")]:
            parts = cat.args[0]
            if not (isinstance(parts, (list, tuple)) and len(parts) == 2 and parts[0] is parts[1]):
                continue
            site = describe(cat)
            found = match_freqs(parts[0])
            if found is None:
                result.leave(site, "cat((f, f)) but f is not position_ids * inv_freq in a known form")
                continue
            pos, inv, nodes = found
            users = list(cat.users)
            cos = next((u for u in users if is_op(u, "cos")), None)
            sin = next((u for u in users if is_op(u, "sin")), None)
            if len(users) != 2 or cos is None or sin is None:
                result.leave(site, "the table is not consumed by exactly one cos and one sin")
                continue
            cos_end, cos_scale, cos_nodes = _scaled(cos)
            sin_end, sin_scale, sin_nodes = _scaled(sin)
            inv_shape, pos_shape = shape_of(inv), shape_of(pos)
            if cos_scale != sin_scale or inv_shape is None or len(inv_shape) != 1 or pos_shape is None \
                    or shape_of(cat) != (*pos_shape, 2 * inv_shape[0]):
                result.leave(site, f"shapes do not fit the table form (positions {pos_shape}, inv_freq {inv_shape}, table {shape_of(cat)})")
                continue
            if any(len(n.users) != 1 for n in nodes):
                result.leave(site, "an intermediate of the frequency computation is used elsewhere")
                continue
            order = {n: i for i, n in enumerate(gm.graph.nodes)}
            first, last = sorted((cos_end, sin_end), key=order.get)
            if any(order[u] < order[last] for u in first.users):
                result.leave(site, "cos is used before sin is computed")
                continue
            with gm.graph.inserting_after(last):
                table = gm.graph.call_function(ks.rope_cos_sin.default, (pos, inv, cos_scale))
            with gm.graph.inserting_after(table):
                new_cos = gm.graph.call_function(operator.getitem, (table, 0))
            with gm.graph.inserting_after(new_cos):
                new_sin = gm.graph.call_function(operator.getitem, (table, 1))
            new_cos.meta, new_sin.meta = dict(cos_end.meta), dict(sin_end.meta)
            cos_end.replace_all_uses_with(new_cos)
            sin_end.replace_all_uses_with(new_sin)
            erase_unused(cos_nodes + sin_nodes + [cat] + nodes)
            result.match(f"{site}: cos/sin table over positions {pos_shape}, scaling {cos_scale}")
