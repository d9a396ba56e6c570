"""Triton kernels: the CUDA implementations of kernelstack's ops (generated from chains where the op
is a chain: norms, activations; hand-written where layout is the point: RoPE).

``register_cuda_kernels`` attaches them to the op contracts; Triton is imported only when a kernel
first runs, so the CPU path never needs it.
"""

import os

import torch

from .. import ops


def step_kernels_enabled() -> bool:
    """A decode step's head and tail (the rope table, the positions and slots, the greedy pick and the lengths'
    advance) run as Triton kernels on CUDA; ``KERNELSTACK_STEP_KERNELS=0`` runs them as the torch ops they replace,
    which the benchmark's ``torch-step`` system uses to measure what they save."""
    return os.environ.get("KERNELSTACK_STEP_KERNELS", "1") != "0"


def gemv_prologue_enabled() -> bool:
    """``KERNELSTACK_GEMV_PROLOGUE=1`` folds norms and SiLU*mul into the linear after them (the ``linear_prologue``
    pass) and runs them in the GEMV's prologue where the Triton GEMV won the shape. Off by default until a GPU run
    has measured it against the two launches it replaces (the benchmark's ``gemv-prologue`` system): it saves a
    launch, but every program of the GEMV also reads the residual or the up half, which may cost more than the
    launch on the 8B's 28672-wide gate/up."""
    return os.environ.get("KERNELSTACK_GEMV_PROLOGUE", "0") == "1"


def _rms_norm(x, weight, eps, weight_offset, cast_to, out_dtype):
    from .rms_norm import rms_norm_triton

    return rms_norm_triton(x, weight, eps, weight_offset, cast_to, out_dtype)


def _add_rms_norm(x, residual, weight, eps, weight_offset, cast_to, out_dtype):
    from .rms_norm import rms_norm_triton

    return rms_norm_triton(x, weight, eps, weight_offset, cast_to, out_dtype, residual=residual)


def _act_and_mul(gate, up, activation):
    from .act_and_mul import act_and_mul_triton

    return act_and_mul_triton(gate, up, activation)


def _rope(q, k, cos, sin):
    from .rope import rope_triton

    return rope_triton(q, k, cos, sin)


def _sample(logits, temperature, top_k, top_p, min_p, repetition_penalty, frequency_penalty, presence_penalty,
            token_counts, allowed_bitmask, greedy, seed, offset):
    from .sampler import sample_triton

    return sample_triton(logits, temperature, top_k, top_p, min_p, repetition_penalty, frequency_penalty,
                         presence_penalty, token_counts, allowed_bitmask, greedy, seed, offset)


def _rope_cos_sin(position_ids, inv_freq, scaling):
    if not step_kernels_enabled():
        from ..ops.rope import rope_cos_sin_reference

        return rope_cos_sin_reference(position_ids, inv_freq, scaling)
    from .rope_table import rope_cos_sin_triton

    return rope_cos_sin_triton(position_ids, inv_freq, scaling)


def _rope_paged_attention(q, k, v, cos, sin, layer, scale, window_left):
    from .rope_append import rope_paged_attention_triton

    return rope_paged_attention_triton(q, k, v, cos, sin, layer, scale, window_left)


def _packed(weights, biases):
    """The one weight and bias of a linear_cat, and whether no kernel of a step writes the weight."""
    from ..ops.linear import is_packed_parameter
    from ..ops.linear import packed_weight

    # only a packed parameter group is never written during a step; a concatenated copy (weights not back to back)
    # or any other tensor may be, and a GEMV under PDL must not read it before the wait
    weight = packed_weight(weights)
    return weight, packed_weight(biases) if biases else None, is_packed_parameter(weight)


def _linear_cat(x, weights, biases):
    from .small_m_linear import linear_cuda

    weight, bias, static = _packed(weights, biases)
    return linear_cuda(x, weight, bias, static_weight=static)


def _add_rms_norm_linear(x, residual, norm_weight, eps, weight_offset, cast_to, norm_dtype, weights, biases):
    from .small_m_linear import RMS_NORM
    from .small_m_linear import Prologue
    from .small_m_linear import fused_tile
    from .small_m_linear import small_m_linear_triton

    weight, bias, static = _packed(weights, biases)
    x2d = x.reshape(-1, x.shape[-1])
    rows = None if residual is None else residual.reshape(-1, x.shape[-1])
    fusable = (x.dtype == norm_dtype == weight.dtype and cast_to in (None, x.dtype) and norm_weight.dim() == 1
               and (rows is None or (residual.shape == x.shape and residual.dtype == x.dtype and rows.stride(-1) == 1)))
    tile = fused_tile(x2d, weight, bias) if fusable else None
    if tile is None:  # the norm's kernel, then the GEMM the shape measured fastest
        if residual is None:
            normed, summed = _rms_norm(x, norm_weight, eps, weight_offset, cast_to, norm_dtype), None
        else:
            normed, summed = _add_rms_norm(x, residual, norm_weight, eps, weight_offset, cast_to, norm_dtype)
        return _linear_cat(normed, weights, biases), summed
    summed = None if rows is None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    prologue = Prologue(RMS_NORM, aux=rows, norm_weight=norm_weight.contiguous(), eps=eps, weight_offset=weight_offset,
                        summed=None if summed is None else summed.view(-1, x.shape[-1]))
    out = small_m_linear_triton(x2d, weight, bias, tile, static, prologue)
    return out.view(*x.shape[:-1], weight.shape[0]), summed


def _rms_norm_linear(x, norm_weight, eps, weight_offset, cast_to, norm_dtype, weights, biases):
    return _add_rms_norm_linear(x, None, norm_weight, eps, weight_offset, cast_to, norm_dtype, weights, biases)[0]


def _act_and_mul_linear(gate, up, activation, weights, biases):
    from .act_and_mul import as_rows
    from .small_m_linear import ACT_MUL
    from .small_m_linear import ACTIVATIONS
    from .small_m_linear import Prologue
    from .small_m_linear import fused_tile
    from .small_m_linear import small_m_linear_triton

    weight, bias, static = _packed(weights, biases)
    gate2d, up2d = as_rows(gate), as_rows(up)
    same = gate.dtype == up.dtype == weight.dtype and gate.shape == up.shape
    tile = fused_tile(gate2d, weight, bias) if same else None
    if tile is None:
        return _linear_cat(_act_and_mul(gate, up, activation), weights, biases)
    prologue = Prologue(ACT_MUL, aux=up2d, activation=ACTIVATIONS[activation])
    out = small_m_linear_triton(gate2d, weight, bias, tile, static, prologue)
    return out.view(*gate.shape[:-1], weight.shape[0])


PROLOGUE_NOTE = " (with KERNELSTACK_GEMV_PROLOGUE=1, one launch where the Triton GEMV won the shape)"


def register_cuda_kernels():
    for name, fn, what in [
        ("rms_norm", _rms_norm, "generated Triton row kernel"),
        ("add_rms_norm", _add_rms_norm, "generated Triton row kernel (residual add fused)"),
        ("act_and_mul", _act_and_mul, "generated Triton pointwise kernel"),
        ("rope", _rope, "Triton kernel (q and k in one launch)"),
        ("rope_cos_sin", _rope_cos_sin, "Triton kernel, once per step (cos and sin in one launch; opaque to "
                                        "Inductor, which would otherwise recompute the table per layer)"),
        ("sample", _sample,
         "Triton sampler (2 launches, no vocabulary sort: per-chunk shortlists, per-row warpers and draw)"),
        ("rope_paged_attention", _rope_paged_attention,
         "Triton RoPE + K/V append (one launch), then the step's attention kernel (the runtime report names it)"),
        ("linear_cat", _linear_cat, "one GEMM over weights laid out back to back: cuBLAS, or for 1-8 rows a "
                                    "Triton GEMV where it measured faster at that shape (the runtime report names it)"),
        ("rms_norm_linear", _rms_norm_linear, "the norm's kernel, then the measured GEMM" + PROLOGUE_NOTE),
        ("add_rms_norm_linear", _add_rms_norm_linear, "the norm's kernel, then the measured GEMM" + PROLOGUE_NOTE),
        ("act_and_mul_linear", _act_and_mul_linear, "the activation's kernel, then the measured GEMM" + PROLOGUE_NOTE),
    ]:
        torch.library.register_kernel(f"kernelstack::{name}", "cuda", fn)
        ops.register_implementation(name, "cuda", what)
    ops.register_implementation("paged_attention", "cuda", "FlashInfer prefill (ragged/paged); paged decode by the "
                                                           "kernel the runtime report names")
    ops.register_implementation("attention", "cuda", "torch SDPA with native GQA (flash/efficient kernels)")
