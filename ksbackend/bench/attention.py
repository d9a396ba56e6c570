"""Decode attention: HF's SDPA against kernelstack's decode kernels at the anchor shapes, fp8 KV, and the
measured table behind ``decode_kernel="auto"`` (batch x context x head size, per kernel)."""

import torch

from .common import bench_us
from .common import table

HQ, HKV, D = 32, 8, 128


def decode_us(lens, hq, hkv, d, kv_dtype, decode_kernel, page=None):
    """Time one layer's decode over contexts ``lens`` (random K/V, the same draw for every kernel);
    returns (microseconds, output). Pages default to what ``ksbackend.optimize`` uses."""
    from ksbackend.config import RuntimeOptions
    from ksbackend.runtime.context import ForwardContext
    from ksbackend.runtime.context import forward_context
    from ksbackend.runtime.flashinfer_attention import FlashInferAttention
    from ksbackend.runtime.kv_pool import KVPool

    page = page or RuntimeOptions().page_size
    pool = KVPool(1, hkv, d, sum(-(-n // page) for n in lens) + 1, page, kv_dtype, "cuda")
    kv = torch.randn(pool.caches[0].shape, device="cuda", dtype=torch.bfloat16,
                     generator=torch.Generator("cuda").manual_seed(1))
    pool.caches[0].copy_(kv)  # fp8: scale 1.0, values well inside e4m3's range
    del kv
    attention = FlashInferAttention(pool, hq, torch.bfloat16, d ** -0.5, -1, decode_kernel=decode_kernel)
    ids = list(range(len(lens)))
    pool.extend(ids, [n - 1 for n in lens])
    pool.extend(ids, [1] * len(lens))  # the step's own token is the last one
    meta, table_host, lens_host = pool.decode_metadata(ids)
    step = attention.new_decode()
    step.plan(table_host, lens_host)
    gen = torch.Generator("cuda").manual_seed(2)
    q = torch.randn(len(lens), hq, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    kv_new = torch.randn(len(lens), hkv, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    ctx = ForwardContext(pool, meta, step)

    def run():
        with forward_context(ctx):
            return torch.ops.kernelstack.paged_attention(q, kv_new, kv_new, 0, d ** -0.5, -1)

    return bench_us(run), run()


def anchor_shapes(bw, out):
    shapes = [(1, [1024], 4096), (1, [8192], 16384), (32, [1024] * 32, 4096),
              (32, torch.randint(64, 4097, (32,), generator=torch.Generator().manual_seed(0)).tolist(), 4096),
              (64, [2048] * 64, 4096)]

    def rows():
        for batch, lens, max_len in shapes:
            q = torch.randn(batch, HQ, 1, D, device="cuda", dtype=torch.bfloat16)
            cache_k = torch.randn(batch, HKV, max_len, D, device="cuda", dtype=torch.bfloat16)
            cache_v = torch.randn_like(cache_k)
            mask = (torch.arange(max_len, device="cuda")[None, :] < torch.tensor(lens, device="cuda")[:, None])
            mask = mask[:, None, None, :]

            def hf_sdpa():
                k = cache_k[:, :, None].expand(batch, HKV, HQ // HKV, max_len, D).reshape(batch, HQ, max_len, D)
                v = cache_v[:, :, None].expand(batch, HKV, HQ // HKV, max_len, D).reshape(batch, HQ, max_len, D)
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)

            def gqa_sdpa():
                return torch.nn.functional.scaled_dot_product_attention(q, cache_k, cache_v, attn_mask=mask,
                                                                        enable_gqa=True)

            t_hf, t_gqa = bench_us(hf_sdpa), bench_us(gqa_sdpa)
            t_tc = decode_us(lens, HQ, HKV, D, torch.bfloat16, "tensor_cores")[0]
            t_xqa = decode_us(lens, HQ, HKV, D, torch.bfloat16, "xqa")[0]
            best = min(t_tc, t_xqa)
            floor = sum(lens) * HKV * D * 2 * 2 / bw * 1e6
            label = f"{batch}, {'ragged 64..4096' if len(set(lens)) > 1 else lens[0]} ({max_len})"
            yield [label, f"{t_hf:.1f}", f"{t_gqa:.1f}", f"{t_tc:.1f}", f"{t_xqa:.1f}", f"{floor:.1f}",
                   f"{floor / best:.0%}", f"{t_hf / best:.1f}x", f"{t_gqa / best:.2f}x"]

    table(out, f"Decode attention ({HQ} q / {HKV} kv heads, head_dim {D}, bf16), microseconds",
          ["batch, context (static max)", "HF SDPA (expand + mask)", "SDPA enable_gqa", "tensor cores", "XQA",
           "HBM floor", "best BW util", "best vs HF SDPA", "best vs enable_gqa"], rows())


def fp8(bw, out):
    """fp8 KV against bf16 KV at batch 64, context 4096: time, bandwidth and output error of each kernel."""
    lens = [4096] * 64
    kv_bytes = 64 * 4096 * HKV * D * 2 * 2
    t_bf16 = decode_us(lens, HQ, HKV, D, torch.bfloat16, "tensor_cores")[0]
    reference = decode_us(lens, HQ, HKV, D, torch.bfloat16, "tensor_cores")[1].float()

    def rows():
        for kv_dtype, kernel in [(torch.bfloat16, "xqa"), (torch.float8_e4m3fn, "tensor_cores"),
                                 (torch.float8_e4m3fn, "cuda_cores"), (torch.float8_e4m3fn, "xqa")]:
            label = [str(kv_dtype).replace("torch.", ""), kernel]
            try:
                t, result = decode_us(lens, HQ, HKV, D, kv_dtype, kernel)
            except Exception as exc:  # a kernel this FlashInfer build cannot run here: say so, keep the table
                yield label + [f"failed: {type(exc).__name__}: {str(exc)[:120]}", "", "", "", ""]
                continue
            floor = kv_bytes * torch.empty(0, dtype=kv_dtype).element_size() / 2 / bw * 1e6
            rel = ((result.float() - reference).norm() / reference.norm()).item()
            yield label + [f"{t:.1f}", f"{floor:.1f}", f"{floor / t:.0%}", f"{t_bf16 / t:.2f}x", f"{rel:.2%}"]

    table(out, f"fp8 (e4m3) KV decode, batch 64, context 4096 (KV {kv_bytes / 2**20:.0f} MiB in bf16), microseconds; "
               f"bf16 tensor cores: {t_bf16:.1f}",
          ["KV dtype", "decode kernel", "time", "HBM floor", "BW util", "speedup vs bf16 tensor cores",
           "output rel. error vs bf16 KV"], rows())


def choice(bw, out):
    """FlashInfer's tensor-core decode, XQA and kernelstack's Triton kernel at the benchmark models' decode shapes:
    the table ``auto`` follows."""
    shapes = [(32, 8, 64, "Llama-3.2-1B"), (32, 8, 128, "Llama-3.1-8B"), (28, 4, 128, "Qwen2.5-7B"), (9, 3, 64, "135M")]
    kernels = {"tensor cores": "tensor_cores", "XQA": "xqa", "Triton": "triton"}

    def rows():
        for hq, hkv, d, name in shapes:
            for batch in (1, 4, 8, 32, 64):
                for context in (128, 1024, 4096):
                    lens = [context] * batch
                    times = {label: decode_us(lens, hq, hkv, d, torch.bfloat16, kernel)[0]
                             for label, kernel in kernels.items()}
                    floor = batch * context * hkv * d * 4 / bw * 1e6
                    yield [name, f"{hq}/{hkv}/{d}", batch, context, *(f"{t:.1f}" for t in times.values()),
                           f"{floor:.1f}", min(times, key=times.get)]

    table(out, "Decode kernel by shape (bf16 KV, one layer, microseconds)",
          ["model", "q/kv heads/head dim", "batch", "context", *kernels, "HBM floor", "fastest"], rows())


def run(bw, out):
    anchor_shapes(bw, out)
    fp8(bw, out)
    choice(bw, out)
