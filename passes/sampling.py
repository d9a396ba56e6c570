"""Sampling chains -> ``kernelstack::sample``: one fused draw instead of a full-vocabulary sort, a softmax and a
multinomial (or an exponential-noise argmax), a dozen launches.

Anchored on the draw over ``softmax(scores, dim=-1)``:
- ``torch.multinomial(probs, 1)``, as Hugging Face's sampling loop draws;
- ``argmax(probs / q)`` with ``q = empty_like(probs).exponential_(1)``, gpt-fast's sync-free form.

Walking back from the softmax, the pass absorbs the warpers the op applies, in the op's order read backwards: HF's
top-p (sort, softmax, cumsum, ``<= 1 - top_p``, scatter, masked_fill), a top-k mask (``x < topk(x, k)[0][..., -1]``,
as HF's ``TopKLogitsWarper`` or gpt-fast write it) and a division by a constant temperature. It stops at the first
step it does not know; what it did not absorb stays as torch ops upstream and the op draws from their result, so
any chain stays correct and only the recognised suffix gets faster.

The op draws from a counter-based generator; the pass seeds it per call from torch's generator (one ``randint``), so
``torch.manual_seed`` still reproduces a run and every call draws afresh. The draws are distributed as the chain's
(the CPU reference samples with torch), not bit-identical to torch's multinomial.
"""

import torch

from ksbackend.ops import sampling as _sampling_ops  # noqa: F401  (registers the op)

from .base import GraphPass
from .base import arg
from .base import describe
from .base import erase_unused
from .base import example_value
from .base import is_op

ks = torch.ops.kernelstack
_INF = float("inf")


def _softmax_input(probs):
    """The scores a last-dim softmax reads, or None."""
    if not is_op(probs, "softmax"):
        return None
    value = example_value(probs)
    dim = arg(probs, 1, "dim", None)
    if value is None or dim not in (-1, value.dim() - 1) or arg(probs, 2, "dtype", None) is not None:
        return None
    return probs.args[0]


def _exponential_noise(node, probs):
    """True if ``node`` is ``empty_like(probs).exponential_(1)``: Exp(1) noise shaped like ``probs``."""
    if not is_op(node, "exponential_") or arg(node, 1, "lambd", 1) != 1:
        return False
    empty = node.args[0]
    return is_op(empty, "empty_like") and empty.args[0] is probs and set(empty.users) == {node}


def _draw(node):
    """(probs, chain nodes) if ``node`` draws one token per row from ``probs``; else (None, reason or None)."""
    if is_op(node, "multinomial"):
        if arg(node, 1, "num_samples", None) != 1:
            return None, "multinomial draws more than one sample"
        if node.kwargs.get("generator") is not None:
            return None, "the draw uses an explicit generator"
        return node.args[0], [node]
    if is_op(node, "argmax") and is_op(node.args[0], "truediv", "div"):
        ratio = node.args[0]
        probs, noise = ratio.args[0], ratio.args[1]
        if isinstance(noise, torch.fx.Node) and _exponential_noise(noise, probs):
            value = example_value(probs)
            if value is None or arg(node, 1, "dim", None) not in (-1, value.dim() - 1):
                return None, "argmax is not over the last dim"
            return probs, [node, ratio, noise, noise.args[0]]
    return None, None


def _top_p(scores):
    """(input, top_p, nodes) if ``scores`` is HF's TopPLogitsWarper output (min_tokens_to_keep 1), else None."""
    if not is_op(scores, "masked_fill") or scores.args[2] != -_INF or not is_op(scores.args[1], "scatter"):
        return None
    x, remove = scores.args[0], scores.args[1]
    if len(remove.args) < 4 or remove.args[1] != 1 or remove.args[0] is not remove.args[3]:
        return None
    drop, order = remove.args[0], remove.args[2]
    if not (is_op(drop, "le") and isinstance(drop.args[1], float) and is_op(order, "getitem")):
        return None
    cumulative = drop.args[0]
    if not (is_op(cumulative, "cumsum") and is_op(cumulative.args[0], "softmax")
            and arg(cumulative, 1, "dim", None) in (-1, 1) and arg(cumulative.args[0], 1, "dim", None) in (-1, 1)):
        return None
    ordered = cumulative.args[0].args[0]
    sort = order.args[0]
    if not (is_op(ordered, "getitem") and ordered.args[0] is sort and ordered.args[1] == 0 and order.args[1] == 1
            and is_op(sort, "sort") and sort.args[0] is x and arg(sort, 1, "dim", -1) in (-1, 1)
            and not arg(sort, 2, "descending", False)):
        return None
    keep_last = [u for u in drop.users if is_op(u, "setitem")]
    if len(keep_last) != 1 or keep_last[0].args[1] != (Ellipsis, slice(-1, None, None)) or keep_last[0].args[2]:
        return None  # HF keeps min_tokens_to_keep tokens by zeroing the tail of the mask; the op keeps 1
    nodes = [sort, ordered, order, cumulative.args[0], cumulative, drop, keep_last[0], remove, scores]
    return x, 1.0 - drop.args[1], nodes


def _top_k(scores):
    """(input, k, nodes) if ``scores`` masks everything below the k-th best of its input with -inf, else None."""
    if is_op(scores, "masked_fill") and scores.args[2] == -_INF:
        x, below = scores.args[0], scores.args[1]
    elif is_op(scores, "where") and scores.args[1] == -_INF:
        below, x = scores.args[0], scores.args[2]
    else:
        return None
    if not (is_op(below, "lt") and below.args[0] is x):
        return None
    kth = below.args[1]
    if is_op(kth, "getitem") and kth.args[1] == (Ellipsis, -1, None):  # HF: topk(x, k)[0][..., -1, None]
        values, picks = kth.args[0], [kth]
    elif is_op(kth, "unsqueeze") and is_op(kth.args[0], "select") and kth.args[0].args[1:] == (-1, -1):
        values, picks = kth.args[0].args[0], [kth, kth.args[0]]  # gpt-fast: topk(x, k)[0].select(-1, -1)[..., None]
    else:
        return None
    if not (is_op(values, "getitem") and values.args[1] == 0 and is_op(values.args[0], "topk")):
        return None
    topk = values.args[0]
    k = arg(topk, 1, "k", None)
    # k is a number, or a graph value when it depends on a dynamic size (gpt-fast's min(top_k, logits.size(-1)))
    symbolic = isinstance(k, torch.fx.Node) and isinstance(k.meta.get("example_value"), (int, torch.SymInt))
    if topk.args[0] is not x or not (isinstance(k, int) or symbolic) or arg(topk, 2, "dim", -1) != -1 \
            or not arg(topk, 3, "largest", True):
        return None
    return x, k, [topk, values, *picks, below, scores]


def _temperature(scores):
    """(input, temperature, nodes) if ``scores`` is its input divided by a positive Python number, else None."""
    if is_op(scores, "truediv", "div") and isinstance(scores.args[1], (int, float)) and scores.args[1] > 0 \
            and len(scores.args) == 2 and not scores.kwargs:
        return scores.args[0], float(scores.args[1]), [scores]
    return None


def _absorb(scores, inside):
    """Walk back from the softmax's input over top-p, top-k and temperature (the op's order, reversed), taking each
    step only if nothing but the chain reads its nodes (HF's top-p mutates its mask in place: a mask read elsewhere
    must keep that write). Returns (logits, settings, nodes absorbed)."""
    settings, absorbed = {}, []
    for name, step in (("top_p", _top_p), ("top_k", _top_k), ("temperature", _temperature)):
        found = step(scores)
        if found is None:
            continue
        x, value, nodes = found
        chain = inside | set(absorbed) | set(nodes)
        if any(user not in chain for node in nodes for user in node.users):
            break
        settings[name] = value
        absorbed += nodes
        scores = x
    return scores, settings, absorbed


def _per_row(graph, column, value, dtype):
    return graph.call_function(torch.full_like, (column, value), {"dtype": dtype})


class SamplingPass(GraphPass):
    name = "sampling"

    def run(self, gm, result):
        for node in list(gm.graph.nodes):
            if node.graph is None:
                continue
            probs, chain = _draw(node)
            if probs is None:
                if chain is not None:
                    result.leave(describe(node), chain)
                continue
            site = describe(node)
            scores = _softmax_input(probs)
            value = example_value(scores) if scores is not None else None
            if value is None or value.dim() not in (1, 2) or not value.dtype.is_floating_point:
                result.leave(site, "the drawn probabilities are not a last-dim softmax of [vocab] or [batch, vocab] "
                                   "float scores")
                continue
            logits, settings, absorbed = _absorb(scores, {*chain, probs})
            self._replace(gm.graph, node, logits, value.dim(), settings)
            erase_unused(chain + [probs] + absorbed)  # what something else still reads stays
            described = ", ".join(f"{k.replace('_', '-')} {v if isinstance(v, torch.fx.Node) else format(v, 'g')}"
                                  for k, v in settings.items()) or "no warpers"
            result.match(f"{site}: {'multinomial' if is_op(node, 'multinomial') else 'exponential-noise argmax'} "
                         f"over softmax, {described} absorbed")

    @staticmethod
    def _replace(graph, draw, logits, dims, settings):
        """Insert the op before ``draw`` and give the draw's users a token tensor of the draw's own shape."""
        with graph.inserting_before(draw):
            rows = logits if dims == 2 else graph.call_method("unsqueeze", (logits, 0))
            column = graph.call_method("select", (rows, 1, 0))
            params = [_per_row(graph, column, settings.get("temperature", 1.0), torch.float32),
                      _per_row(graph, column, settings.get("top_k", 0), torch.int64),
                      _per_row(graph, column, settings.get("top_p", 1.0), torch.float32),
                      _per_row(graph, column, 0.0, torch.float32),  # min-p
                      _per_row(graph, column, 1.0, torch.float32),  # repetition penalty
                      _per_row(graph, column, 0.0, torch.float32),  # frequency penalty
                      _per_row(graph, column, 0.0, torch.float32)]  # presence penalty
            greedy = _per_row(graph, column, False, torch.bool)
            device = example_value(logits).device
            # fresh numbers every call, from torch's generator: torch.manual_seed reproduces a run
            seed = graph.call_function(torch.randint, (0, 2**62, (1,)), {"dtype": torch.int64, "device": device})
            offset = graph.call_function(torch.zeros, ((1,),), {"dtype": torch.int64, "device": device})
            tokens = graph.call_function(ks.sample.default, (rows, *params, None, None, greedy, seed, offset))
            # [rows] tokens -> the draw's shape: [B, 1] (multinomial, keepdim argmax), [B] or [1], or a scalar
            out_dims = example_value(draw).dim()
            if out_dims == 2:
                tokens = graph.call_method("unsqueeze", (tokens, -1))
            elif out_dims == 0:
                tokens = graph.call_method("squeeze", (tokens, 0))
        draw.replace_all_uses_with(tokens)
