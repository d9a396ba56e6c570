"""RMSNorm chains -> ``kernelstack::rms_norm`` (or ``add_rms_norm`` when the residual add feeds it).

Anchored on ``rsqrt``. Recognised forms (transformers writes no others for the supported families):
- Llama/Mistral/Qwen2/Qwen3 (also Qwen3's q/k norms): ``w * (xf * rsqrt(xf.pow(2).mean(-1, keepdim) + eps)).to(dt)``
- Gemma: ``((xf * rsqrt(...)) * (1.0 + w.float())).type_as(x)``
with ``xf = x.to(float32)``. The weight must be a 1-D tensor over the normalised dim. When ``x`` is
itself ``a + b`` (the residual stream), both become one op that also returns the sum: one read of
each operand instead of three.
"""

import operator

import torch

from ksbackend.ops import norm as _norm_ops  # noqa: F401  (registers the ops)

from .base import GraphPass
from .base import arg
from .base import describe
from .base import dtype_of
from .base import erase_unused
from .base import is_op
from .base import other_operand
from .base import shape_of
from .base import users_outside

ks = torch.ops.kernelstack


def _single_user(node):
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _constant(value):
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


class RMSNormPass(GraphPass):
    name = "rms_norm"

    def __init__(self, fuse_residual_add: bool = True):
        self.fuse_residual_add = fuse_residual_add

    def run(self, gm, result):
        for rsqrt in [n for n in gm.graph.nodes if is_op(n, "rsqrt")]:
            site = describe(rsqrt)
            found = self._match(rsqrt)
            if isinstance(found, str):
                result.leave(site, found)
                continue
            fused = self._rewrite(gm, **found)
            form = "gemma (1 + w)" if found["weight_offset"] else "llama"
            result.match(f"{site}: {form}{' + residual add' if fused else ''}")

    def _match(self, rsqrt):
        add_eps = rsqrt.args[0]
        if not is_op(add_eps, "add"):
            return "rsqrt input is not mean + eps"
        mean = next((a for a in add_eps.args if is_op(a, "mean")), None)
        eps = _constant(other_operand(add_eps, mean)) if mean is not None else None
        if mean is None or eps is None:
            return "rsqrt input is not mean(x^2) + constant eps"
        if arg(mean, 1, "dim") not in (-1, [-1], (-1,)) or not arg(mean, 2, "keepdim", False):
            return "mean is not over the last dim with keepdim=True"
        square = mean.args[0]
        if not (is_op(square, "pow") and square.args[1] == 2):
            return "mean is not over x.pow(2)"
        xf = square.args[0]
        normed = _single_user(rsqrt)
        if not (is_op(normed, "mul") and other_operand(normed, rsqrt) is xf):
            return "rsqrt is not multiplied back onto x"
        x = xf.args[0] if is_op(xf, "to") and dtype_of(xf) == torch.float32 else xf
        chain = ([xf] if xf is not x else []) + [square, mean, add_eps, rsqrt, normed]

        nxt = _single_user(normed)
        cast_to, weight_offset = None, 0.0
        if is_op(nxt, "to"):  # Llama: round to the input dtype, then multiply by the weight
            cast_to, cast = dtype_of(nxt), nxt
            chain.append(cast)
            end = _single_user(cast)
            if not is_op(end, "mul"):
                return "normalised value is not multiplied by a weight"
            weight = other_operand(end, cast)
        elif is_op(nxt, "mul"):  # Gemma: multiply by (1 + w.float()) in fp32, then cast
            end, factor = nxt, other_operand(nxt, normed)
            weight = factor
            if is_op(factor, "add") and any(_constant(a) == 1.0 for a in factor.args):
                weight_offset = 1.0
                weight = next(a for a in factor.args if _constant(a) is None)
                chain.append(factor)
                if is_op(weight, "to") and len(weight.users) == 1:
                    chain.append(weight)
                    weight = weight.args[0]
            after = _single_user(end)
            if is_op(after, "to"):
                chain.append(end)
                end = after
        else:
            return "normalised value is not followed by a weight multiply"
        chain.append(end)

        hidden = (shape_of(x) or (None,))[-1]
        if shape_of(weight) != (hidden,):
            return f"weight shape {shape_of(weight)} is not ({hidden},)"
        if users_outside(chain):
            return "an intermediate of the chain is used elsewhere"
        return dict(x=x, weight=weight, eps=float(eps), weight_offset=weight_offset, cast_to=cast_to,
                    out_dtype=dtype_of(end), chain=chain, end=end)

    def _rewrite(self, gm, x, weight, eps, weight_offset, cast_to, out_dtype, chain, end) -> bool:
        graph = gm.graph
        fuse = (self.fuse_residual_add and is_op(x, "add") and len(x.args) == 2
                and all(isinstance(a, torch.fx.Node) and shape_of(a) == shape_of(x) for a in x.args)
                and not x.kwargs)
        if fuse:
            a, b = x.args
            with graph.inserting_after(x):
                fused = graph.call_function(ks.add_rms_norm.default, (a, b, weight, eps, weight_offset, cast_to, out_dtype))
            with graph.inserting_after(fused):
                summed = graph.call_function(operator.getitem, (fused, 1))
            with graph.inserting_after(summed):
                normed = graph.call_function(operator.getitem, (fused, 0))
            summed.meta = dict(x.meta)
            normed.meta = dict(end.meta)
            end.replace_all_uses_with(normed)
            x.replace_all_uses_with(summed)
            erase_unused(chain + [x])
            return True
        with graph.inserting_after(end):
            new = graph.call_function(ks.rms_norm.default, (x, weight, eps, weight_offset, cast_to, out_dtype))
        new.meta = dict(end.meta)
        end.replace_all_uses_with(new)
        erase_unused(chain)
        return False

