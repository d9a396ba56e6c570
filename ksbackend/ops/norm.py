"""``kernelstack::rms_norm`` and ``kernelstack::add_rms_norm``.

One contract covers both RMSNorm forms transformers writes:
- Llama/Mistral/Qwen: ``weight * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(cast_to)``
- Gemma: ``(x.float() * rsqrt(...) * (1.0 + weight.float())).to(x.dtype)``
``weight_offset`` is 0.0 or 1.0, ``cast_to`` is the dtype the normalised value is rounded to before
the weight multiply (None: no rounding), ``out_dtype`` the chain's result dtype. Keeping the exact
rounding points makes the op bit-compatible with the chain it replaces.

Both ops are differentiable (training through ``torch.compile(model, backend="kernelstack")``): the
backward computes in fp32, treats the rounding casts as identity and returns each grad in its
input's dtype.
"""

from typing import Optional

import torch


def _normalize(x, eps):
    """fp32 (x * rstd, rstd) over the last dim."""
    h = x.float()
    rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return h * rstd, rstd


def rms_norm_reference(x, weight, eps, weight_offset, cast_to, out_dtype):
    h, _ = _normalize(x, eps)
    if cast_to is not None:
        h = h.to(cast_to)
    w = weight if weight_offset == 0.0 else weight.float() + weight_offset
    return (w * h).to(out_dtype)


@torch.library.custom_op("kernelstack::rms_norm", mutates_args=())
def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    weight_offset: float,
    cast_to: Optional[torch.dtype],
    out_dtype: torch.dtype,
) -> torch.Tensor:
    return rms_norm_reference(x, weight, eps, weight_offset, cast_to, out_dtype).contiguous()


@rms_norm.register_fake
def _(x, weight, eps, weight_offset, cast_to, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype)


def rms_norm_grads(x, weight, grad, eps, weight_offset, weight_needs_grad):
    """Grads of ``rms_norm_reference``, computed in fp32 with the casts as identity: (dx in fp32, dw in
    weight's dtype, or None if not needed).

    With n = x * rstd and gn = grad * (weight + offset): dx = rstd * (gn - n * mean(gn * n)), dw = sum(grad * n).
    """
    normed, rstd = _normalize(x, eps)
    grad = grad.float()
    grad_normed = grad * (weight.float() + weight_offset)
    grad_x = rstd * (grad_normed - normed * (grad_normed * normed).mean(-1, keepdim=True))
    grad_weight = (grad * normed).sum_to_size(weight.shape).to(weight.dtype) if weight_needs_grad else None
    return grad_x, grad_weight


def _rms_norm_setup_context(ctx, inputs, output):
    x, weight, ctx.eps, ctx.weight_offset = inputs[:4]
    ctx.save_for_backward(x, weight)


def _rms_norm_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    grad_x, grad_weight = rms_norm_grads(x, weight, grad, ctx.eps, ctx.weight_offset, ctx.needs_input_grad[1])
    return grad_x.to(x.dtype), grad_weight, None, None, None, None


rms_norm.register_autograd(_rms_norm_backward, setup_context=_rms_norm_setup_context)


@torch.library.custom_op("kernelstack::add_rms_norm", mutates_args=())
def add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    weight_offset: float,
    cast_to: Optional[torch.dtype],
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (norm(x + residual), x + residual): the residual stream and the normalised value in one pass."""
    summed = (x + residual).contiguous()
    return rms_norm_reference(summed, weight, eps, weight_offset, cast_to, out_dtype).contiguous(), summed


@add_rms_norm.register_fake
def _(x, residual, weight, eps, weight_offset, cast_to, out_dtype):
    summed_dtype = torch.promote_types(x.dtype, residual.dtype)
    return x.new_empty(x.shape, dtype=out_dtype), x.new_empty(x.shape, dtype=summed_dtype)


def _add_rms_norm_setup_context(ctx, inputs, output):
    x, residual, weight, ctx.eps, ctx.weight_offset = inputs[:5]
    ctx.x_dtype, ctx.residual_dtype = x.dtype, residual.dtype
    ctx.save_for_backward(output[1], weight)


def _add_rms_norm_backward(ctx, grad, grad_summed):
    """The residual stream's own gradient (at ``summed``) adds to the one coming back through the norm;
    x and residual both receive the total."""
    summed, weight = ctx.saved_tensors
    grad_x, grad_weight = rms_norm_grads(summed, weight, grad, ctx.eps, ctx.weight_offset, ctx.needs_input_grad[2])
    grad_x = grad_x + grad_summed.float()
    return grad_x.to(ctx.x_dtype), grad_x.to(ctx.residual_dtype), grad_weight, None, None, None, None


add_rms_norm.register_autograd(_add_rms_norm_backward, setup_context=_add_rms_norm_setup_context)
