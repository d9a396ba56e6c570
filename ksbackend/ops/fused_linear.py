"""A linear and the op that makes its input, as one op: ``rms_norm_linear``, ``add_rms_norm_linear``,
``act_and_mul_linear``.

Each contract is exactly the two ops it replaces (``rms_norm`` or ``add_rms_norm``, or ``act_and_mul``, then
``linear_cat``), so a rewrite into it is right wherever theirs was. Why one op: at decode batch 1 a step is a chain
of latency-bound launches (a 135M-shape layer is ~10 kernels of ~2 us), and a GEMV reads its whole input row anyway.
On the GPU, where the Triton GEMV won the shape, the norm or the activation runs in the GEMV's prologue (one launch
where there were two); elsewhere the two kernels run as before.
"""

from typing import Optional

import torch

from .activation import act_and_mul_grads
from .activation import act_and_mul_reference
from .linear import linear_cat_grads
from .linear import linear_cat_reference
from .linear import linear_cat_shape
from .norm import rms_norm_grads
from .norm import rms_norm_reference


@torch.library.custom_op("kernelstack::rms_norm_linear", mutates_args=())
def rms_norm_linear(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight_offset: float,
                    cast_to: Optional[torch.dtype], norm_dtype: torch.dtype, weights: list[torch.Tensor],
                    biases: list[torch.Tensor]) -> torch.Tensor:
    """``linear_cat(rms_norm(x, norm_weight, eps, weight_offset, cast_to, norm_dtype), weights, biases)``."""
    normed = rms_norm_reference(x, norm_weight, eps, weight_offset, cast_to, norm_dtype)
    return linear_cat_reference(normed, weights, biases)


@rms_norm_linear.register_fake
def _(x, norm_weight, eps, weight_offset, cast_to, norm_dtype, weights, biases):
    return x.new_empty(linear_cat_shape(x, weights), dtype=norm_dtype)


@torch.library.custom_op("kernelstack::add_rms_norm_linear", mutates_args=())
def add_rms_norm_linear(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                        weight_offset: float, cast_to: Optional[torch.dtype], norm_dtype: torch.dtype,
                        weights: list[torch.Tensor], biases: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``add_rms_norm`` then ``linear_cat`` of its normalised value: (the linear's output, x + residual)."""
    summed = (x + residual).contiguous()
    normed = rms_norm_reference(summed, norm_weight, eps, weight_offset, cast_to, norm_dtype)
    return linear_cat_reference(normed, weights, biases), summed


@add_rms_norm_linear.register_fake
def _(x, residual, norm_weight, eps, weight_offset, cast_to, norm_dtype, weights, biases):
    summed_dtype = torch.promote_types(x.dtype, residual.dtype)
    return x.new_empty(linear_cat_shape(x, weights), dtype=norm_dtype), x.new_empty(x.shape, dtype=summed_dtype)


@torch.library.custom_op("kernelstack::act_and_mul_linear", mutates_args=())
def act_and_mul_linear(gate: torch.Tensor, up: torch.Tensor, activation: str, weights: list[torch.Tensor],
                       biases: list[torch.Tensor]) -> torch.Tensor:
    """``linear_cat(act_and_mul(gate, up, activation), weights, biases)``."""
    return linear_cat_reference(act_and_mul_reference(gate, up, activation), weights, biases)


@act_and_mul_linear.register_fake
def _(gate, up, activation, weights, biases):
    return gate.new_empty(linear_cat_shape(gate, weights), dtype=torch.promote_types(gate.dtype, up.dtype))


# Backward: the two ops' own gradients, chained (the intermediate is recomputed, not saved: these ops exist for
# inference speed, and a training graph's memory is better spent elsewhere).

def _norm_linear_grads(ctx, rows, grad):
    """(d rows in fp32, d norm weight, [d W_i], [d b_i]) through the linear and the norm of ``rows``."""
    norm_weight, *weights = ctx.saved_tensors[1:]
    normed = rms_norm_reference(rows, norm_weight, ctx.eps, ctx.weight_offset, ctx.cast_to, ctx.norm_dtype)
    grad_normed, grad_weights, grad_biases = linear_cat_grads(normed, weights, grad, ctx.has_bias)
    grad_rows, grad_norm_weight = rms_norm_grads(rows, norm_weight, grad_normed, ctx.eps, ctx.weight_offset,
                                                 ctx.needs_norm_weight_grad)
    return grad_rows, grad_norm_weight, grad_weights, grad_biases


def _norm_setup(ctx, rows, norm_weight, eps, weight_offset, cast_to, norm_dtype, weights, biases, weight_index):
    ctx.save_for_backward(rows, norm_weight, *weights)
    ctx.eps, ctx.weight_offset, ctx.cast_to, ctx.norm_dtype = eps, weight_offset, cast_to, norm_dtype
    ctx.has_bias = bool(biases)
    ctx.needs_norm_weight_grad = ctx.needs_input_grad[weight_index]


def _rms_norm_linear_setup(ctx, inputs, output):
    x, norm_weight, eps, weight_offset, cast_to, norm_dtype, weights, biases = inputs
    _norm_setup(ctx, x, norm_weight, eps, weight_offset, cast_to, norm_dtype, weights, biases, weight_index=1)


def _rms_norm_linear_backward(ctx, grad):
    x = ctx.saved_tensors[0]
    grad_x, grad_norm_weight, grad_weights, grad_biases = _norm_linear_grads(ctx, x, grad)
    return grad_x.to(x.dtype), grad_norm_weight, None, None, None, None, grad_weights, grad_biases


rms_norm_linear.register_autograd(_rms_norm_linear_backward, setup_context=_rms_norm_linear_setup)


def _add_rms_norm_linear_setup(ctx, inputs, output):
    x, residual, norm_weight, eps, weight_offset, cast_to, norm_dtype, weights, biases = inputs
    ctx.x_dtype, ctx.residual_dtype = x.dtype, residual.dtype
    _norm_setup(ctx, output[1], norm_weight, eps, weight_offset, cast_to, norm_dtype, weights, biases, weight_index=2)


def _add_rms_norm_linear_backward(ctx, grad, grad_summed):
    """As add_rms_norm's: the residual stream's own gradient adds to the one coming back through the norm."""
    grad_x, grad_norm_weight, grad_weights, grad_biases = _norm_linear_grads(ctx, ctx.saved_tensors[0], grad)
    grad_x = grad_x + grad_summed.float()
    return (grad_x.to(ctx.x_dtype), grad_x.to(ctx.residual_dtype), grad_norm_weight, None, None, None, None,
            grad_weights, grad_biases)


add_rms_norm_linear.register_autograd(_add_rms_norm_linear_backward, setup_context=_add_rms_norm_linear_setup)


def _act_and_mul_linear_setup(ctx, inputs, output):
    gate, up, ctx.activation, weights, biases = inputs
    ctx.save_for_backward(gate, up, *weights)
    ctx.has_bias = bool(biases)


def _act_and_mul_linear_backward(ctx, grad):
    gate, up, *weights = ctx.saved_tensors
    activated = act_and_mul_reference(gate, up, ctx.activation)
    grad_activated, grad_weights, grad_biases = linear_cat_grads(activated, weights, grad, ctx.has_bias)
    grad_gate, grad_up = act_and_mul_grads(gate, up, ctx.activation, grad_activated, *ctx.needs_input_grad[:2])
    return grad_gate, grad_up, None, grad_weights, grad_biases


act_and_mul_linear.register_autograd(_act_and_mul_linear_backward, setup_context=_act_and_mul_linear_setup)
