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


def act_and_mul_triton(gate, up, activation):
    out = torch.empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
    kernel = compile_chain(act_and_mul_chain(activation, gate.dtype))
    kernel({"g": gate.contiguous().view(-1), "u": up.contiguous().view(-1), "out": out.view(-1)}, out.numel())
    return out
