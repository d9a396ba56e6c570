"""GPU paths against the references (marked cuda; skipped without a GPU)."""

import copy

import pytest
import torch

import ksbackend
from ksbackend.models import build_model, tiny_config
from ksbackend.ops.paged_attention import paged_attention_reference
from ksbackend.runtime.kv_pool import KVPool

pytestmark = pytest.mark.cuda
BF16_TOL = dict(atol=2e-2, rtol=2e-2)


def run_steps(pool, attention, hq, steps, seed=0):
    """Prefill (ragged), a second chunk (paged prefill), then decode steps; returns all outputs."""
    from ksbackend.runtime.context import ForwardContext, forward_context

    gen = torch.Generator(device="cuda").manual_seed(seed)
    outs = []
    for new in steps:
        meta = pool.extend(list(range(len(new))), new)
        n = sum(new)
        q, k, v = (torch.randn(n, h, pool.head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
                   for h in (hq, pool.num_kv_heads, pool.num_kv_heads))
        if attention is None:
            outs.append(paged_attention_reference(q, k, v, 0, pool.head_dim ** -0.5, -1, pool, meta.to("cuda")))
        else:
            attention.plan(meta)
            with forward_context(ForwardContext(pool, meta.to("cuda"), attention)):
                outs.append(torch.ops.kernelstack.paged_attention(q, k, v, 0, pool.head_dim ** -0.5, -1))
    return outs


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_flashinfer_paths_match_reference(head_dim, kv_dtype):
    from ksbackend.runtime.flashinfer_attention import FlashInferAttention

    lengths = [1, 7, 33, 1000]
    steps = [lengths, [5, 1, 3, 2], [1] * 4, [1] * 4]
    hq, hkv = 8, 2
    ref_pool = KVPool(1, hkv, head_dim, 512, 16, torch.bfloat16, "cuda")
    pool = KVPool(1, hkv, head_dim, 512, 16, kv_dtype, "cuda")
    attention = FlashInferAttention(pool, hq, torch.bfloat16, head_dim ** -0.5, -1)
    expected = run_steps(ref_pool, None, hq, steps)
    got = run_steps(pool, attention, hq, steps)
    for e, g in zip(expected, got):
        if kv_dtype == torch.bfloat16:
            torch.testing.assert_close(g.float(), e.float(), **BF16_TOL)
        else:  # e4m3 keeps 3 mantissa bits: judge by relative error of the whole output, not elementwise
            rel = ((g.float() - e.float()).norm() / e.float().norm()).item()
            print(f"fp8 KV, head_dim {head_dim}: relative error {rel:.4f}")
            assert rel < 0.05


def test_triton_ops_registered_on_cuda_match_references():
    x, r = torch.randn(33, 4096, device="cuda", dtype=torch.bfloat16), torch.randn(33, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    from ksbackend.ops.norm import rms_norm_reference

    out, summed = torch.ops.kernelstack.add_rms_norm(x, r, w, 1e-5, 0.0, torch.bfloat16, torch.bfloat16)
    torch.testing.assert_close(out, rms_norm_reference(x + r, w, 1e-5, 0.0, torch.bfloat16, torch.bfloat16), **BF16_TOL)
    assert "Triton" in ksbackend.ops.implementation("add_rms_norm", "cuda")


def generate_pair(model, prompts, mask, new_tokens, **options):
    ref = model.generate(prompts, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    optimized = copy.deepcopy(model)
    ksbackend.optimize(optimized, **options)
    out = optimized.generate(prompts, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return ref, out, optimized


def agreement(ref, out, width):
    same = (ref == out).all(dim=1)
    first_diff = [(r[width:] != o[width:]).nonzero()[0].item() if not s else None for r, o, s in zip(ref, out, same)]
    return same.float().mean().item(), [d for d in first_diff if d is not None]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_generate_bf16_agrees_with_hf_eager(family):
    config = tiny_config(family, hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=2, head_dim=64, vocab_size=1024)
    model = build_model(config, dtype=torch.bfloat16, device="cuda")
    torch.manual_seed(0)
    lengths = torch.randint(4, 200, (32,)).tolist()
    width = max(lengths)
    prompts = torch.randint(3, 1024, (32, width), device="cuda")
    mask = torch.zeros_like(prompts)
    for row, n in enumerate(lengths):
        mask[row, width - n:] = 1
    prompts[mask == 0] = 0
    ref, out, optimized = generate_pair(model, prompts, mask, 64)
    rate, diverged_at = agreement(ref, out, width)
    print(f"{family}: bf16 greedy agreement {rate:.2%}, first divergences at {sorted(diverged_at)}")
    print(ksbackend.explain(optimized))
    assert rate >= 0.9 and all(d >= 8 for d in diverged_at)


def test_cuda_graph_decode_equals_eager_decode():
    config = tiny_config("llama", hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=512)
    model = build_model(config, dtype=torch.bfloat16, device="cuda")
    prompts = torch.randint(3, 512, (5, 20), device="cuda")
    mask = torch.ones_like(prompts)
    mask[0, :7] = 0
    graphs = copy.deepcopy(model)
    ksbackend.optimize(model, cuda_graphs=False)
    ksbackend.optimize(graphs, cuda_graphs=True)
    kwargs = dict(attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0)
    eager_out = model.generate(prompts, **kwargs)
    graph_out = graphs.generate(prompts, **kwargs)
    assert torch.equal(eager_out, graph_out)
    assert "decode CUDA graph captured" in str(ksbackend.explain(graphs))
