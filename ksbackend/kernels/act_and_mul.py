"""``act(gate) * up`` as a generated pointwise kernel: the CUDA implementation of ``kernelstack::act_and_mul``.
Reads gate and up once, writes once; the activation is rounded to the input dtype before the product,
as the eager chain rounds it."""

import functools

import torch

from .generator import compile_chain


@functools.lru_cache(maxsize=None)
def act_and_mul_chain(activation: str, dtype):
    return (("load", "g"), ("load", "u"), ("f32", "gf", "g"), (activation, "a", "gf"), ("cast", "ac", "a", dtype),
            ("f32", "uf", "u"), ("mul", "o", "ac", "uf"), ("store", "out", "o"))


def as_rows(t):
    """``t`` as [rows, last dim] with unit column stride, a view where it can be (the halves of a fused gate_up
    output are: a copy of each cost two launches per layer at batch 32)."""
    t = t if t.stride(-1) == 1 else t.contiguous()
    return t.reshape(-1, t.shape[-1])


def act_and_mul_triton(gate, up, activation):
    out = torch.empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
    if out.numel() == 0:
        return out
    kernel = compile_chain(act_and_mul_chain(activation, gate.dtype))
    kernel({"g": as_rows(gate), "u": as_rows(up), "out": out.view(-1, out.shape[-1])}, out.shape[-1])
    return out
