"""Attention -> ``kernelstack::attention``.

Two spellings reach Dynamo's graph from transformers:
- SDPA (``attn_implementation="sdpa"``): ``F.scaled_dot_product_attention(q, k, v, mask, ...)``, where
  k/v are either passed with ``enable_gqa=True`` or first repeated by ``repeat_kv``
  (``kv[:, :, None].expand(...).reshape(...)``);
- eager: ``softmax(q @ repeat_kv(k).transpose(2, 3) * scaling + mask, dtype=float32).to(dt) @ repeat_kv(v)``.
Both become one op over the un-repeated K/V. Anything else between the scores and the softmax (Gemma-2's
logit soft-capping, ALiBi biases, ...) is an attention variant this pass does not know: it is left alone
and reported with the ops it found there, so the original, correct chain runs.
"""

import math

import torch

from ksbackend.ops import attention as _attention_ops  # noqa: F401  (registers the op)

from .base import GraphPass
from .base import arg
from .base import describe
from .base import dtype_of
from .base import erase_unused
from .base import is_op
from .base import kernelstack_op
from .base import op_name
from .base import other_operand
from .base import shape_of

ks = torch.ops.kernelstack


def strip_repeat_kv(node):
    """``kv[:, :, None].expand(b, h, n, s, d).reshape(b, h * n, s, d)`` -> (kv, nodes of the repeat)."""
    if is_op(node, "reshape") and is_op(node.args[0], "expand"):
        expand = node.args[0]
        index = expand.args[0]
        if is_op(index, "getitem") and isinstance(index.args[1], tuple) and len(index.args[1]) > 2 and index.args[1][2] is None:
            return index.args[0], [index, expand, node]
    return node, []


def _is_scores_transpose(node):
    dims = tuple(node.args[1:3]) if len(node.args) >= 3 else ()
    return is_op(node, "transpose") and dims in ((2, 3), (-2, -1), (-1, -2), (3, 2))


def _walk_to_matmul(node, limit=8):
    """The ops between a softmax's input and the matmul behind it (first tensor argument each step), and whether
    a matmul was reached at all: a softmax with none behind it (a sampler's, a MoE router's) is not attention."""
    ops = []
    while isinstance(node, torch.fx.Node) and not is_op(node, "matmul") and len(ops) < limit:
        ops.append(op_name(node) or node.op)
        node = next((a for a in node.args if isinstance(a, torch.fx.Node)), None)
    return ops, is_op(node, "matmul")


def _variant(ops):
    """Name what sits between q @ k^T and the softmax (for the report)."""
    chain = " <- ".join(f"'{o}'" for o in ops)
    return f"logit soft-capping ({chain})" if "tanh" in ops else chain


class AttentionPass(GraphPass):
    name = "attention"

    def run(self, gm, result):
        for node in [n for n in gm.graph.nodes if kernelstack_op(n) == "kernelstack::paged_attention"]:
            result.match(f"{describe(node)}: paged attention (already placed by kernelstack's HF attention interface)")
        for node in list(gm.graph.nodes):
            if is_op(node, "sdpa"):
                self._rewrite_sdpa(gm, node, result)
            elif is_op(node, "softmax"):
                self._rewrite_eager(gm, node, result)

    def _rewrite_sdpa(self, gm, sdpa, result):
        site = describe(sdpa)
        q, k, v = sdpa.args[:3]
        mask = arg(sdpa, 3, "attn_mask")
        dropout = arg(sdpa, 4, "dropout_p", 0.0)
        is_causal = arg(sdpa, 5, "is_causal", False)
        scale = arg(sdpa, 6, "scale")
        if dropout not in (0, 0.0):
            result.leave(site, f"attention dropout p={dropout} (training)")
            return
        if not isinstance(is_causal, bool) or not (scale is None or isinstance(scale, (int, float))):
            result.leave(site, "is_causal/scale are not constants in the graph")
            return
        k_base, k_repeat = strip_repeat_kv(k)
        v_base, v_repeat = strip_repeat_kv(v)
        reason = self._check_shapes(q, k_base, v_base)
        if reason:
            result.leave(site, reason)
            return
        if scale is None:
            scale = 1.0 / math.sqrt(shape_of(q)[-1])
        self._replace(gm, sdpa, (q, k_base, v_base, mask, float(scale), is_causal), k_repeat + v_repeat)
        result.match(f"{site}: sdpa{' + repeat_kv' if k_repeat else ''}, {'causal' if is_causal else 'masked' if mask is not None else 'full'}")

    def _rewrite_eager(self, gm, softmax, result):
        site = describe(softmax)
        scores = softmax.args[0]
        if arg(softmax, 1, "dim") not in (-1, 3):
            return  # not an attention softmax
        mask = None
        chain = [softmax]
        if is_op(scores, "add"):
            scaled = next((a for a in scores.args if is_op(a, "mul", "matmul")), None)
            mask = other_operand(scores, scaled) if scaled is not None else None
            chain.append(scores)
            scores = scaled
        if is_op(scores, "mul") and any(is_op(a, "matmul") for a in scores.args):
            qk = next(a for a in scores.args if is_op(a, "matmul"))
            scale = other_operand(scores, qk)
            chain.append(scores)
        elif is_op(scores, "matmul"):
            qk, scale = scores, 1.0
        else:
            ops, reached = _walk_to_matmul(scores)
            if reached:  # with no q @ k^T behind it, this softmax is not attention: nothing to report
                result.leave(site, f"unknown attention variant: {_variant(ops)} between the scores and the softmax")
            return
        chain.append(qk)
        if not isinstance(scale, (int, float)):
            result.leave(site, "attention scaling is not a constant")
            return
        q, kt = qk.args[:2]
        if not _is_scores_transpose(kt):
            result.leave(site, "scores are not q @ k.transpose(-2, -1)")
            return
        chain.append(kt)
        last = softmax
        while True:  # .to(dtype) and dropout(p=0 / eval) may follow the softmax
            users = list(last.users)
            if len(users) != 1:
                result.leave(site, "attention probabilities are used elsewhere (e.g. output_attentions)")
                return
            nxt = users[0]
            if is_op(nxt, "dropout") and arg(nxt, 1, "p", 0.5) not in (0, 0.0) and arg(nxt, 2, "training", True):
                result.leave(site, "attention dropout in training mode")
                return
            if not is_op(nxt, "to", "dropout"):
                break
            chain.append(nxt)
            last = nxt
        pv = nxt
        if not (is_op(pv, "matmul") and pv.args[0] is last):
            result.leave(site, "softmax output is not multiplied by v")
            return
        v = pv.args[1]
        k_base, k_repeat = strip_repeat_kv(kt.args[0])
        v_base, v_repeat = strip_repeat_kv(v)
        reason = self._check_shapes(q, k_base, v_base)
        if reason:
            result.leave(site, reason)
            return
        if mask is not None and dtype_of(mask) is not None and not dtype_of(mask).is_floating_point:
            result.leave(site, "non-additive mask in the eager chain")
            return
        chain.append(pv)
        self._replace(gm, pv, (q, k_base, v_base, mask, float(scale), False), chain + k_repeat + v_repeat)
        result.match(f"{site}: eager matmul-softmax-matmul{' + repeat_kv' if k_repeat else ''}")

    @staticmethod
    def _check_shapes(q, k, v):
        qs, ks_, vs = shape_of(q), shape_of(k), shape_of(v)
        if qs is None or ks_ is None or vs is None or not (len(qs) == len(ks_) == len(vs) == 4):
            return f"q/k/v are not 4-D [B, H, T, D] ({qs}, {ks_}, {vs})"
        if qs[1] % ks_[1] != 0 or ks_[1] != vs[1]:
            return f"query heads {qs[1]} are not a multiple of kv heads {ks_[1]}"
        if qs[-1] != ks_[-1]:
            return f"q/k head sizes differ ({qs[-1]} vs {ks_[-1]})"
        return None

    @staticmethod
    def _replace(gm, end, args, chain):
        with gm.graph.inserting_after(end):
            new = gm.graph.call_function(ks.attention.default, args)
        new.meta = dict(end.meta)
        end.replace_all_uses_with(new)
        erase_unused([end] + [n for n in chain if n is not end])
