"""The op contracts: torch.library.opcheck (schema, fake impl, autograd registration, dispatch) and
each CPU reference against the chain as transformers writes it, over odd shapes and dtypes."""

import pytest
import torch
import torch.nn.functional as F

import ksbackend  # noqa: F401

from ksbackend.ops.rope import rotate_half

ks = torch.ops.kernelstack
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def opcheck(op, args):
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


@pytest.mark.parametrize("shape", [(1, 1, 7), (3, 5, 64), (2, 33, 96)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_llama_and_gemma_chains(shape, dtype):
    x = torch.randn(shape, dtype=dtype)
    w = torch.randn(shape[-1], dtype=dtype)
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
    llama = w * normed.to(dtype)
    gemma = (normed * (1.0 + w.float())).type_as(x)
    assert torch.equal(ks.rms_norm(x, w, 1e-6, 0.0, dtype, dtype), llama)
    assert torch.equal(ks.rms_norm(x, w, 1e-6, 1.0, None, dtype), gemma)
    residual = torch.randn(shape, dtype=dtype)
    out, summed = ks.add_rms_norm(x, residual, w, 1e-6, 0.0, dtype, dtype)
    assert torch.equal(summed, x + residual)
    assert torch.equal(out, ks.rms_norm(x + residual, w, 1e-6, 0.0, dtype, dtype))
    opcheck(ks.rms_norm.default, (x, w, 1e-6, 0.0, dtype, dtype))
    opcheck(ks.add_rms_norm.default, (x, residual, w, 1e-6, 1.0, None, dtype))


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_act_and_mul(activation, dtype):
    gate, up = torch.randn(3, 7, 37, dtype=dtype), torch.randn(3, 7, 37, dtype=dtype)
    act = F.silu if activation == "silu" else (lambda t: F.gelu(t, approximate="tanh"))
    assert torch.equal(ks.act_and_mul(gate, up, activation), act(gate) * up)
    opcheck(ks.act_and_mul.default, (gate, up, activation))
    with pytest.raises(ValueError, match="unknown activation"):
        ks.act_and_mul(gate, up, "relu")


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_rotates_q_and_k(dtype):
    q, k = torch.randn(2, 4, 9, 16, dtype=dtype), torch.randn(2, 2, 9, 16, dtype=dtype)
    cos, sin = torch.randn(2, 1, 9, 16, dtype=dtype), torch.randn(2, 1, 9, 16, dtype=dtype)
    q_out, k_out = ks.rope(q, k, cos, sin)
    assert torch.equal(q_out, q * cos + rotate_half(q) * sin)
    assert torch.equal(k_out, k * cos + rotate_half(k) * sin)
    opcheck(ks.rope.default, (q, k, cos, sin))


def test_rope_cos_sin_both_transformers_forms():
    pos = torch.randint(0, 4000, (3, 17))
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 64, 2).float() / 64))
    cos, sin = ks.rope_cos_sin(pos, inv_freq, 0.7)
    f523 = pos[..., None].float() * inv_freq
    f517 = (inv_freq[None, :, None].expand(3, -1, 1).float() @ pos[:, None, :].float()).transpose(1, 2)
    for freqs in (f523, f517):
        emb = torch.cat((freqs, freqs), dim=-1)
        assert torch.equal(cos, emb.cos() * 0.7) and torch.equal(sin, emb.sin() * 0.7)
    opcheck(ks.rope_cos_sin.default, (pos, inv_freq, 1.0))


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_attention_matches_repeated_kv_sdpa(kv_heads):
    q = torch.randn(2, 4, 7, 32)
    k, v = torch.randn(2, kv_heads, 11, 32), torch.randn(2, kv_heads, 11, 32)
    mask = torch.rand(2, 1, 7, 11) > 0.3
    mask[..., 0] = True
    rep = 4 // kv_heads
    expected = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                              attn_mask=mask, scale=0.3)
    torch.testing.assert_close(ks.attention(q, k, v, mask, 0.3, False), expected, atol=1e-5, rtol=1e-5)
    opcheck(ks.attention.default, (q, k, v, mask, 0.3, False))
    opcheck(ks.attention.default, (q, k, v, None, 0.3, True))
