"""Triton kernels: the CUDA implementations of kernelstack's ops (generated from chains where the op
is a chain: norms, activations; hand-written where layout is the point: RoPE).

``register_cuda_kernels`` attaches them to the op contracts; Triton is imported only when a kernel
first runs, so the CPU path never needs it.
"""

import torch

from .. import ops


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


def _rope_paged_attention(q, k, v, cos, sin, layer, scale, window_left):
    from .rope_append import rope_paged_attention_triton

    return rope_paged_attention_triton(q, k, v, cos, sin, layer, scale, window_left)


def _linear_cat(x, weights, biases):
    from ..ops.linear import is_packed_parameter, packed_weight
    from .small_m_linear import linear_cuda

    # only a packed parameter group is never written during a step; a concatenated copy (weights not back to back)
    # or any other tensor may be, and a GEMV under PDL must not read it before the wait
    weight = packed_weight(weights)
    return linear_cuda(x, weight, packed_weight(biases) if biases else None, static_weight=is_packed_parameter(weight))


def register_cuda_kernels():
    for name, fn, what in [
        ("rms_norm", _rms_norm, "generated Triton row kernel"),
        ("add_rms_norm", _add_rms_norm, "generated Triton row kernel (residual add fused)"),
        ("act_and_mul", _act_and_mul, "generated Triton pointwise kernel"),
        ("rope", _rope, "Triton kernel (q and k in one launch)"),
        ("sample", _sample,
         "Triton sampler (2 launches, no vocabulary sort: per-chunk shortlists, per-row warpers and draw)"),
        ("rope_paged_attention", _rope_paged_attention,
         "Triton RoPE + K/V append (one launch), then the step's attention kernel (the runtime report names it)"),
        ("linear_cat", _linear_cat, "one GEMM over weights laid out back to back: cuBLAS, or for 1-8 rows a "
                                    "Triton GEMV where it measured faster at that shape (the runtime report names it)"),
    ]:
        torch.library.register_kernel(f"kernelstack::{name}", "cuda", fn)
        ops.register_implementation(name, "cuda", what)
    ops.register_implementation("paged_attention", "cuda", "FlashInfer prefill (ragged/paged); paged decode by the "
                                                           "kernel the runtime report names")
    ops.register_implementation("attention", "cuda", "torch SDPA with native GQA (flash/efficient kernels)")
    ops.register_implementation("rope_cos_sin", "cuda", "torch ops, once per step (opaque to Inductor, "
                                                         "which would otherwise recompute the table per layer)")
