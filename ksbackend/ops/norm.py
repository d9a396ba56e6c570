"""``kernelstack::rms_norm`` and ``kernelstack::add_rms_norm``.

One contract covers both RMSNorm forms transformers writes:
- Llama/Mistral/Qwen: ``weight * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(cast_to)``
- Gemma: ``(x.float() * rsqrt(...) * (1.0 + weight.float())).to(x.dtype)``
``weight_offset`` is 0.0 or 1.0, ``cast_to`` is the dtype the normalised value is rounded to before
the weight multiply (None: no rounding), ``out_dtype`` the chain's result dtype. Keeping the exact
rounding points makes the op bit-compatible with the chain it replaces.
"""

from typing import Optional

import torch


def rms_norm_reference(x, weight, eps, weight_offset, cast_to, out_dtype):
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
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
