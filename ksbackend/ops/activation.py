"""``kernelstack::act_and_mul``: the gated MLP activation, ``act(gate) * up``.

Differentiable: ``d gate = act'(gate) * grad * up`` (aten's own activation backward), ``d up = grad * act(gate)``.
"""

import torch
import torch.nn.functional as F

ACTIVATIONS = ("silu", "gelu_tanh")


def _activate(gate: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return F.silu(gate)
    if activation == "gelu_tanh":
        return F.gelu(gate, approximate="tanh")
    raise ValueError(f"unknown activation {activation!r}; kernelstack knows {ACTIVATIONS}")


def act_and_mul_reference(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    return _activate(gate, activation) * up


@torch.library.custom_op("kernelstack::act_and_mul", mutates_args=())
def act_and_mul(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """Reference (any device without a registered kernel): the chain as HF writes it."""
    return act_and_mul_reference(gate, up, activation).contiguous()


@act_and_mul.register_fake
def _(gate, up, activation):
    return gate.new_empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype))


def _act_and_mul_setup_context(ctx, inputs, output):
    gate, up, ctx.activation = inputs
    ctx.save_for_backward(gate, up)


def act_and_mul_grads(gate, up, activation, grad, needs_gate=True, needs_up=True):
    """(d gate, d up), each None where not needed."""
    grad_gate = grad_up = None
    if needs_gate:
        grad_act = (grad * up).to(gate.dtype)
        if activation == "silu":
            grad_gate = torch.ops.aten.silu_backward(grad_act, gate)
        else:
            grad_gate = torch.ops.aten.gelu_backward(grad_act, gate, approximate="tanh")
    if needs_up:
        grad_up = (grad * _activate(gate, activation)).to(up.dtype)
    return grad_gate, grad_up


def _act_and_mul_backward(ctx, grad):
    gate, up = ctx.saved_tensors
    return *act_and_mul_grads(gate, up, ctx.activation, grad, *ctx.needs_input_grad[:2]), None


act_and_mul.register_autograd(_act_and_mul_backward, setup_context=_act_and_mul_setup_context)
