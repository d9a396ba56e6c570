"""Autograd through the kernelstack ops: every backward against gradcheck in fp64, or, where the op's
reference computes in fp32, against autograd through the chain as transformers writes it; opcheck with
its default tests (autograd registration, AOT dispatch with dynamic shapes); and end to end, the
rewritten graph's parameter grads against HF eager's for every family."""

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F

import ksbackend

from ksbackend.models import FAMILIES
from ksbackend.models import build_model
from ksbackend.models import tiny_config
from ksbackend.ops.paged_attention import paged_attention_reference
from ksbackend.runtime.context import ForwardContext
from ksbackend.runtime.context import forward_context
from ksbackend.runtime.kv_pool import KVPool

from .conftest import compile_fx

ks = torch.ops.kernelstack
F64 = dict(dtype=torch.float64, requires_grad=True)
PASSES = ("rope_cos_sin", "rope", "attention", "rms_norm", "act_and_mul", "projections")


@contextlib.contextmanager
def one_thread():
    """For thousands of tiny ops: on a small, shared CPU, intra-op thread wake-ups cost 100x the op."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def leaves(*tensors):
    return [t.detach().requires_grad_() for t in tensors]


def hf_rms_norm(x, w, eps, gemma):
    """LlamaRMSNorm / GemmaRMSNorm forward as transformers writes it."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (normed * (1.0 + w.float())).type_as(x) if gemma else w * normed.to(x.dtype)


@pytest.mark.parametrize("gemma", [False, True])
def test_rms_norm_grads_match_the_hf_chain(gemma):
    """The reference computes in fp32 whatever the input dtype, so fp64 gradcheck cannot apply: fp32 grads
    of the op against autograd through HF's chain."""
    x, w = leaves(torch.randn(3, 5, 32), torch.randn(32) * 0.3 + (0.0 if gemma else 1.0))
    g = torch.randn(3, 5, 32)
    offset, cast_to = (1.0, None) if gemma else (0.0, torch.float32)
    got = torch.autograd.grad(ks.rms_norm(x, w, 1e-6, offset, cast_to, torch.float32), (x, w), g)
    expected = torch.autograd.grad(hf_rms_norm(x, w, 1e-6, gemma), (x, w), g)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.library.opcheck(ks.rms_norm.default, (x, w, 1e-6, offset, cast_to, torch.float32))


@pytest.mark.parametrize("gemma", [False, True])
def test_add_rms_norm_grads_match_the_hf_chain(gemma):
    """Both outputs carry gradient: the residual stream's adds to the one through the norm."""
    x, residual, w = leaves(torch.randn(2, 7, 32), torch.randn(2, 7, 32), torch.randn(32) * 0.3)
    g_out, g_summed = torch.randn(2, 7, 32), torch.randn(2, 7, 32)
    offset, cast_to = (1.0, None) if gemma else (0.0, torch.float32)
    upstream = (g_out, g_summed)
    outputs = ks.add_rms_norm(x, residual, w, 1e-6, offset, cast_to, torch.float32)
    got = torch.autograd.grad(outputs, (x, residual, w), upstream)
    summed = x + residual
    expected = torch.autograd.grad((hf_rms_norm(summed, w, 1e-6, gemma), summed), (x, residual, w), upstream)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.library.opcheck(ks.add_rms_norm.default, (x, residual, w, 1e-6, offset, cast_to, torch.float32))


def test_rms_norm_low_precision_grads_come_back_in_input_dtypes():
    """bf16 inputs with Llama's bf16 rounding point: grads are bf16, close to the fp32 chain's."""
    x, w = torch.randn(4, 64, dtype=torch.bfloat16), torch.randn(64, dtype=torch.bfloat16)
    g = torch.randn(4, 64, dtype=torch.bfloat16)
    xb, wb = leaves(x, w)
    got = torch.autograd.grad(ks.rms_norm(xb, wb, 1e-6, 0.0, torch.bfloat16, torch.bfloat16), (xb, wb), g)
    assert [t.dtype for t in got] == [torch.bfloat16, torch.bfloat16]
    xf, wf = leaves(x.float(), w.float())
    expected = torch.autograd.grad(hf_rms_norm(xf, wf, 1e-6, False), (xf, wf), g.float())
    for a, b in zip(got, expected):
        torch.testing.assert_close(a.float(), b, atol=0.05 * b.abs().max().item(), rtol=0.02)


@pytest.mark.parametrize("cos_batch", [2, 1])
def test_rope_gradcheck(cos_batch):
    """cos/sin broadcast over heads (and over the batch when cos_batch is 1): their grads are reduced back."""
    q, k = torch.randn(2, 4, 5, 8, **F64), torch.randn(2, 2, 5, 8, **F64)
    cos, sin = torch.randn(cos_batch, 1, 5, 8, **F64), torch.randn(cos_batch, 1, 5, 8, **F64)
    assert torch.autograd.gradcheck(lambda *a: ks.rope(*a), (q, k, cos, sin))
    torch.library.opcheck(ks.rope.default, (q.float(), k.float(), cos.float(), sin.float()))


def test_rope_cos_sin_inv_freq_grad_matches_the_hf_chain():
    """fp32 reference (positions are cast to float32), so: against autograd through HF's table."""
    pos = torch.randint(0, 50, (3, 11))
    (inv_freq,) = leaves(torch.rand(8) + 0.05)
    g_cos, g_sin = torch.randn(3, 11, 16), torch.randn(3, 11, 16)
    (got,) = torch.autograd.grad(ks.rope_cos_sin(pos, inv_freq, 0.7), inv_freq, (g_cos, g_sin))
    freqs = pos[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    (expected,) = torch.autograd.grad((emb.cos() * 0.7, emb.sin() * 0.7), inv_freq, (g_cos, g_sin))
    torch.testing.assert_close(got, expected, atol=1e-5 * expected.abs().max().item(), rtol=1e-5)
    torch.library.opcheck(ks.rope_cos_sin.default, (pos, inv_freq, 0.7))


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_act_and_mul_gradcheck(activation):
    gate, up = torch.randn(3, 7, 13, **F64), torch.randn(3, 7, 13, **F64)
    assert torch.autograd.gradcheck(lambda g, u: ks.act_and_mul(g, u, activation), (gate, up))
    torch.library.opcheck(ks.act_and_mul.default, (gate.float(), up.float(), activation))


@pytest.mark.parametrize("bias", [False, True])
def test_linear_cat_gradcheck_and_packed_weights(bias):
    """Gradients of the fused GEMM equal the separate linears'; packing changes no value."""
    from ksbackend.ops.linear import adjacent_base
    from ksbackend.ops.linear import pack_adjacent

    x = torch.randn(2, 3, 5, **F64)
    weights = [torch.randn(n, 5, **F64) for n in (4, 2, 3)]
    biases = [torch.randn(n, **F64) for n in (4, 2, 3)] if bias else []
    assert torch.autograd.gradcheck(lambda x, *p: ks.linear_cat(x, list(p[:3]), list(p[3:])), (x, *weights, *biases))
    torch.library.opcheck(ks.linear_cat.default, (x.float(), [w.float() for w in weights],
                                                  [b.float() for b in biases]))
    params = [torch.nn.Parameter(w.detach().clone()) for w in weights]
    before = ks.linear_cat(x.detach(), params, [])
    assert adjacent_base(params) is None and pack_adjacent(params) and adjacent_base(params) is not None
    assert torch.equal(ks.linear_cat(x.detach(), params, []), before)
    assert all(torch.equal(p, w) for p, w in zip(params, weights))


def test_only_packed_parameter_groups_count_as_never_written():
    """Under PDL a GEMV reads a weight before waiting for the kernel before only if no kernel of a step can write
    it: a group ``pack_adjacent`` laid out, not any tensors that merely sit back to back."""
    from ksbackend.ops.linear import adjacent_base
    from ksbackend.ops.linear import is_packed_parameter
    from ksbackend.ops.linear import pack_adjacent

    params = [torch.nn.Parameter(torch.randn(n, 6)) for n in (3, 2)]
    assert pack_adjacent(params) and is_packed_parameter(adjacent_base(params))
    buffer = torch.randn(5, 6)
    assert not is_packed_parameter(adjacent_base([buffer[:3], buffer[3:]]))
    packed = adjacent_base(params)
    params[0].data = torch.randn(3, 6)  # re-pointed by the user: the old buffer no longer holds that parameter
    assert not is_packed_parameter(packed)


def attention_masks(t, s):
    """(name, mask, is_causal) for every mask form; the bool mask has a query row that attends to nothing."""
    bool_mask = torch.rand(2, 1, t, s) > 0.4
    bool_mask[..., 0] = True
    bool_mask[1, 0, 2] = False  # a query that attends to nothing
    return [
        ("none", None, False),
        ("causal", None, True),  # t < s: SDPA's top-left causal mask
        ("bool", bool_mask, False),
        ("additive, requires grad", torch.randn(2, 1, t, s, **F64), False),
    ]


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_attention_gradcheck(kv_heads):
    q = torch.randn(2, 4, 5, 8, **F64)
    k, v = torch.randn(2, kv_heads, 7, 8, **F64), torch.randn(2, kv_heads, 7, 6, **F64)
    masks = attention_masks(5, 7)
    for name, mask, is_causal in masks:
        with one_thread():  # the numerical Jacobian runs SDPA twice per input element
            assert torch.autograd.gradcheck(lambda *a: ks.attention(*a, 0.3, is_causal), (q, k, v, mask)), name
    additive = masks[-1][1]
    torch.library.opcheck(ks.attention.default, (q.float(), k.float(), v.float(), None, 0.3, True))
    torch.library.opcheck(ks.attention.default, (q.float(), k.float(), v.float(), additive.float(), 0.3, False))


def test_attention_grads_match_sdpa_and_fully_masked_rows_give_zero():
    """fp32, GQA through repeat_kv as HF's SDPA path writes it, with a row that attends to nothing."""
    q, k, v = leaves(torch.randn(2, 4, 6, 16), torch.randn(2, 2, 6, 16), torch.randn(2, 2, 6, 16))
    mask = torch.ones(2, 1, 6, 6, dtype=torch.bool).tril()
    mask[0, :, :, :2] = False  # left padding: row 0's first two queries see nothing
    g = torch.randn(2, 4, 6, 16)
    got = torch.autograd.grad(ks.attention(q, k, v, mask, 0.25, False), (q, k, v), g)
    repeat_kv = lambda t: t.repeat_interleave(2, 1)  # noqa: E731
    out = F.scaled_dot_product_attention(q, repeat_kv(k), repeat_kv(v), attn_mask=mask, scale=0.25)
    expected = torch.autograd.grad(out, (q, k, v), g)
    for a, b in zip(got, expected):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert got[0][0, :, :2].abs().max() == 0  # the queries that attend to nothing get no gradient
    assert got[0].abs().max() > 0


def test_paged_attention_refuses_gradients():
    """Inference-only: with q/k/v that require grad it raises, naming why; under no_grad it runs."""
    pool = KVPool(1, 2, 8, 16, 4, torch.float32, "cpu")
    meta = pool.extend([0], [5])
    q, k, v = torch.randn(5, 4, 8), torch.randn(5, 2, 8), torch.randn(5, 2, 8)
    with forward_context(ForwardContext(pool, meta)):
        with torch.no_grad():
            out = ks.paged_attention(q.requires_grad_(), k, v, 0, 0.3, -1)
        torch.testing.assert_close(out, paged_attention_reference(q.detach(), k, v, 0, 0.3, -1, pool, meta))
        with pytest.raises(RuntimeError, match="inference-only.*no gradient"):
            ks.paged_attention(q, k, v, 0, 0.3, -1)


def padded_batch(vocab):
    ids = torch.randint(3, vocab, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, :3], mask[1, :1] = 0, 0  # left padding
    return ids, mask


def loss_and_grads(model, forward, ids, mask):
    keep = mask.bool()  # padded positions are garbage in HF too; the loss reads the real ones
    loss = forward(ids, attention_mask=mask).logits[keep].float().pow(2).mean()
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


def assert_grads_match(grads, expected):
    assert grads.keys() == expected.keys()
    scale = max(g.abs().max() for g in expected.values())
    for name, g in expected.items():
        assert grads[name] is not None, name
        assert (grads[name] - g).abs().max() <= 1e-4 * scale, name


@pytest.mark.parametrize("family", FAMILIES)
def test_rewritten_graph_gives_hf_gradients(family):
    model = build_model(tiny_config(family))
    reference = copy.deepcopy(model)
    ids, mask = padded_batch(model.config.vocab_size)
    expected_loss, expected = loss_and_grads(reference, reference, ids, mask)
    loss, grads = loss_and_grads(model, compile_fx(model), ids, mask)
    report = ksbackend.explain()
    for name in PASSES:
        assert report.matched(name) > 0, f"{name}\n{report}"
    assert report.graphs[0].ops.get("kernelstack::add_rms_norm", 0) > 0
    torch.testing.assert_close(loss, expected_loss, atol=1e-6, rtol=1e-5)
    assert_grads_match(grads, expected)


@pytest.mark.slow
def test_inductor_executor_trains():
    """The default executor: AOTAutograd traces the backward formulas and Inductor compiles them."""
    model = build_model(tiny_config("llama"))
    reference = copy.deepcopy(model)
    ids, mask = padded_batch(model.config.vocab_size)
    keep = mask.bool()
    logits = torch.compile(model, backend="kernelstack")(ids, attention_mask=mask).logits
    expected_logits = reference(ids, attention_mask=mask).logits
    assert (logits - expected_logits)[keep].abs().max() <= 1e-4
    logits[keep].float().pow(2).mean().backward()
    expected_logits[keep].float().pow(2).mean().backward()
    graph = ksbackend.explain().graphs[0]
    assert graph.executor == "inductor" and all(graph.matched(name) > 0 for name in PASSES)
    assert_grads_match({n: p.grad for n, p in model.named_parameters()},
                       {n: p.grad for n, p in reference.named_parameters()})


@pytest.mark.parametrize("producer", ["rms_norm", "add_rms_norm", "act_and_mul"])
def test_fused_linear_ops_equal_their_two_ops_forward_and_backward(producer):
    """Each fused op's value and every gradient equal those of the two ops it replaces, exactly (its backward
    chains theirs); opcheck runs its registrations."""
    x, residual = leaves(torch.randn(3, 5, 16), torch.randn(3, 5, 16))
    norm_weight, *weights = leaves(torch.randn(16), torch.randn(4, 16), torch.randn(6, 16))
    biases = list(leaves(torch.randn(4), torch.randn(6)))
    if producer == "rms_norm":
        args = (x, norm_weight, 1e-6, 1.0, None, torch.float32)
        fused = ks.rms_norm_linear(*args, weights, biases)
        pair = ks.linear_cat(ks.rms_norm(*args), weights, biases)
    elif producer == "add_rms_norm":
        args = (x, residual, norm_weight, 1e-6, 0.0, torch.float32, torch.float32)
        fused = ks.add_rms_norm_linear(*args, weights, biases)
        normed, summed = ks.add_rms_norm(*args)
        pair = (ks.linear_cat(normed, weights, biases), summed)
    else:
        args = (x, residual, "silu")
        fused = ks.act_and_mul_linear(*args, weights, biases)
        pair = ks.linear_cat(ks.act_and_mul(*args), weights, biases)
    fused, pair = (v if isinstance(v, tuple) else (v,) for v in (fused, pair))
    inputs = [t for t in (x, residual, norm_weight) if any(t is a for a in args)] + weights + biases
    grads = [torch.randn_like(v) for v in fused]
    assert all(torch.equal(f, p) for f, p in zip(fused, pair))
    for got, expected in zip(torch.autograd.grad(fused, inputs, grads), torch.autograd.grad(pair, inputs, grads)):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    op = getattr(ks, f"{producer}_linear").default
    torch.library.opcheck(op, tuple(a.detach().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args)
                          + ([w.detach() for w in weights], [b.detach() for b in biases]))
