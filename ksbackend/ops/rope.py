"""``kernelstack::rope`` (rotate q and k together) and ``kernelstack::rope_cos_sin`` (the table).

``rope`` is HF's ``apply_rotary_pos_emb`` in the rotate_half form: ``x * cos + rotate_half(x) * sin``
with cos/sin broadcastable to q and k ([B, 1, T, D] against [B, H, T, D]).
``rope_cos_sin`` is the rotary embedding's forward: ``emb = cat(pos * inv_freq, pos * inv_freq)``,
``cos = cos(emb) * scaling``; transformers 5.17 computes ``pos * inv_freq`` as a K=1 matmul and 5.23
as a broadcast multiply, and both are exact products in fp32, so one reference serves both.

Both are differentiable: ``rope`` for q, k, cos and sin; ``rope_cos_sin`` for inv_freq (positions are
indices and get no gradient).
"""

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def token_major_like(x: torch.Tensor, dtype) -> torch.Tensor:
    """An empty [B, H, T, D] tensor laid out as [B, T, H, D] (the projection's own layout), whatever x's
    strides: the paged attention path then reads q/k as [tokens, heads, dim] without a copy, and the
    layout is fixed, so fake and real outputs agree for Inductor."""
    if x.dim() != 4:
        return x.new_empty(x.shape, dtype=dtype)
    b, h, t, d = x.shape
    return x.new_empty((b, t, h, d), dtype=dtype).transpose(1, 2)


@torch.library.custom_op("kernelstack::rope", mutates_args=())
def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    q_out = token_major_like(q, torch.promote_types(q.dtype, cos.dtype))
    k_out = token_major_like(k, torch.promote_types(k.dtype, cos.dtype))
    q_out.copy_(q * cos + rotate_half(q) * sin)
    k_out.copy_(k * cos + rotate_half(k) * sin)
    return q_out, k_out


@rope.register_fake
def _(q, k, cos, sin):
    return (token_major_like(q, torch.promote_types(q.dtype, cos.dtype)),
            token_major_like(k, torch.promote_types(k.dtype, cos.dtype)))


def _rope_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _rope_backward(ctx, grad_q, grad_k):
    """y = x * cos + rotate_half(x) * sin. rotate_half is a signed permutation whose transpose is
    ``cat(y[..., h:], -y[..., :h]) = -rotate_half(y)``, so dx = g * cos - rotate_half(g * sin);
    cos and sin collect g * x and g * rotate_half(x) from q and k, summed back to their broadcast shape."""
    q, k, cos, sin = ctx.saved_tensors
    grads = [None] * 4
    for i, (x, g) in enumerate(((q, grad_q), (k, grad_k))):
        if ctx.needs_input_grad[i]:
            grads[i] = (g * cos - rotate_half(g * sin)).to(x.dtype)
    if ctx.needs_input_grad[2]:
        grads[2] = ((grad_q * q).sum_to_size(cos.shape) + (grad_k * k).sum_to_size(cos.shape)).to(cos.dtype)
    if ctx.needs_input_grad[3]:
        grads[3] = ((grad_q * rotate_half(q)).sum_to_size(sin.shape)
                    + (grad_k * rotate_half(k)).sum_to_size(sin.shape)).to(sin.dtype)
    return tuple(grads)


rope.register_autograd(_rope_backward, setup_context=_rope_setup_context)


def _angles(position_ids, inv_freq):
    """emb = cat(pos * inv_freq, pos * inv_freq) in fp32: [*position_ids.shape, D]."""
    freqs = position_ids[..., None].float() * inv_freq.float()
    return torch.cat((freqs, freqs), dim=-1)


def rope_cos_sin_reference(position_ids, inv_freq, scaling):
    emb = _angles(position_ids, inv_freq)
    return emb.cos() * scaling, emb.sin() * scaling


@torch.library.custom_op("kernelstack::rope_cos_sin", mutates_args=())
def rope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor,
                 scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids: [B, T] (any int or float dtype); inv_freq: [D/2]. Returns fp32 (cos, sin): [B, T, D]."""
    return rope_cos_sin_reference(position_ids, inv_freq, scaling)


@rope_cos_sin.register_fake
def _(position_ids, inv_freq, scaling):
    shape = (*position_ids.shape, 2 * inv_freq.shape[0])
    return position_ids.new_empty(shape, dtype=torch.float32), position_ids.new_empty(shape, dtype=torch.float32)


def _rope_cos_sin_setup_context(ctx, inputs, output):
    position_ids, inv_freq, ctx.scaling = inputs
    ctx.save_for_backward(position_ids, inv_freq)


def _rope_cos_sin_backward(ctx, grad_cos, grad_sin):
    """d(s * cos(p * f)) / df = -s * sin(p * f) * p (and s * cos(p * f) * p for sin), summed over every
    position and over both halves of the table, which repeat the same frequencies. Positions are
    indices: no gradient."""
    if not ctx.needs_input_grad[1]:
        return None, None, None
    position_ids, inv_freq = ctx.saved_tensors
    emb = _angles(position_ids, inv_freq)
    grad_emb = (grad_sin.float() * emb.cos() - grad_cos.float() * emb.sin()) * ctx.scaling
    grad_emb = grad_emb * position_ids[..., None].float()
    half = inv_freq.shape[0]
    grad_freqs = grad_emb[..., :half] + grad_emb[..., half:]
    return None, grad_freqs.sum_to_size(inv_freq.shape).to(inv_freq.dtype), None


rope_cos_sin.register_autograd(_rope_cos_sin_backward, setup_context=_rope_cos_sin_setup_context)
