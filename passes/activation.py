"""Gated MLP activations -> ``kernelstack::act_and_mul``: ``silu(gate) * up`` and ``gelu_tanh(gate) * up``.

Anchored on the activation call. The product must be elementwise over equal shapes and dtypes
(no broadcasting), and the activated gate must feed nothing but the product.
"""

import torch

from ksbackend.ops import activation as _activation_ops  # noqa: F401  (registers the op)

from .base import GraphPass
from .base import arg
from .base import describe
from .base import dtype_of
from .base import erase_unused
from .base import is_op
from .base import other_operand
from .base import shape_of

ks = torch.ops.kernelstack


class ActivationMulPass(GraphPass):
    name = "act_and_mul"

    def run(self, gm, result):
        for act in [n for n in gm.graph.nodes if is_op(n, "silu", "gelu")]:
            site = describe(act)
            if is_op(act, "silu"):
                activation = "silu"
            elif arg(act, 1, "approximate", "none") == "tanh":
                activation = "gelu_tanh"
            else:
                result.leave(site, "exact (erf) GELU: no kernelstack op for it")
                continue
            if arg(act, 1 if activation == "silu" else 2, "inplace", False):
                result.leave(site, "in-place activation")
                continue
            users = list(act.users)
            if len(users) != 1 or not is_op(users[0], "mul"):
                result.leave(site, "activation output is not only multiplied by another tensor")
                continue
            product, gate = users[0], act.args[0]
            up = other_operand(product, act)
            if not isinstance(up, torch.fx.Node) or shape_of(up) != shape_of(gate) or dtype_of(up) != dtype_of(gate):
                result.leave(site, f"product is not elementwise over equal shapes/dtypes ({shape_of(gate)} x {shape_of(up)})")
                continue
            with gm.graph.inserting_after(product):
                fused = gm.graph.call_function(ks.act_and_mul.default, (gate, up, activation))
            fused.meta = dict(product.meta)
            product.replace_all_uses_with(fused)
            erase_unused([act, product])
            result.match(f"{site}: {activation}(gate) * up")
