"""RMSNorm (optionally with the residual add) as a generated row kernel: the CUDA implementation of
``kernelstack::rms_norm`` / ``add_rms_norm``. One read of x (and the residual), one write of the
output (and the sum): the floor for this op. Rounding points follow the op contract exactly."""

import functools

import torch

from .generator import compile_chain


@functools.lru_cache(maxsize=None)
def rms_norm_chain(residual: bool, weight_offset: float, cast_to, in_dtype):
    chain = [("load", "x")]
    if residual:  # the sum is rounded to the activation dtype, as HF's `residual + hidden` is
        chain += [("load", "r"), ("f32", "xf", "x"), ("f32", "rf", "r"), ("add", "s0", "xf", "rf"),
                  ("cast", "s", "s0", in_dtype), ("store", "sum", "s")]
    else:
        chain += [("f32", "s", "x")]
    chain += [("mean_sq", "var", "s"), ("add_arg", "ve", "var", "eps"), ("rsqrt", "inv", "ve"), ("mul", "h", "s", "inv")]
    if cast_to is not None:
        chain += [("cast", "hc", "h", cast_to)]
    chain += [("load_vec", "w"), ("f32", "wf", "w")]
    if weight_offset:
        chain += [("add_const", "wo", "wf", repr(float(weight_offset)))]
    chain += [("mul", "o", "wo" if weight_offset else "wf", "hc" if cast_to is not None else "h"), ("store", "out", "o")]
    return tuple(chain)


def rms_norm_triton(x, weight, eps, weight_offset, cast_to, out_dtype, residual=None):
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    tensors = {"x": x2, "w": weight.contiguous(), "out": out.view(-1, n)}
    summed = None
    if residual is not None:
        summed = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, residual.dtype), device=x.device)
        tensors.update(r=residual.reshape(-1, n).contiguous(), sum=summed.view(-1, n))
    kernel = compile_chain(rms_norm_chain(residual is not None, weight_offset, cast_to, x.dtype))
    kernel(tensors, n, eps=eps)
    return out if residual is None else (out, summed)
