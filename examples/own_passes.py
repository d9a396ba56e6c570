"""The pass API, for compiler experiments: a pass of your own beside kernelstack's, a decode loop of your own whose
sampling chain becomes one fused op, and the per-site report of what every pass matched or left and why.
Runs anywhere (a tiny Llama from a config, fp32; on CPU kernelstack's ops run their references).

    python examples/own_passes.py
"""

import torch

import ksbackend
import passes

from ksbackend.models import build_model
from ksbackend.models import tiny_config


def count_rsqrt(gm, result):
    """A pass that rewrites nothing: it reports each rsqrt it sees. Registered before ``rms_norm``, it sees the
    norms that pass is about to fuse."""
    for node in gm.graph.nodes:
        if passes.base.is_op(node, "rsqrt"):
            result.leave(passes.base.describe(node), "counted, not rewritten")


def sample(logits, temperature=0.8, top_k=20):
    """gpt-fast's sampler: temperature, a top-k mask, softmax and a sync-free exponential-noise draw."""
    logits = logits / max(temperature, 1e-5)
    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
    logits = torch.where(logits < v.select(-1, -1).unsqueeze(-1), -float("inf"), logits)
    probs = torch.nn.functional.softmax(logits, dim=-1)
    q = torch.empty_like(probs).exponential_(1)
    return torch.argmax(probs / q, dim=-1, keepdim=True)


def main(new_tokens=6):
    torch.manual_seed(0)
    model = build_model(tiny_config("llama"))
    passes.register_pass(count_rsqrt, before="rms_norm")
    try:
        forward = torch.compile(model, backend="kernelstack", options={"executor": "fx"})
        draw = torch.compile(sample, backend="kernelstack", options={"executor": "fx"})
        ids = torch.randint(3, model.config.vocab_size, (2, 10))
        with torch.no_grad():
            for _ in range(new_tokens):  # no KV cache: the whole sequence each step, the simplest loop there is
                ids = torch.cat([ids, draw(forward(ids).logits[:, -1])], dim=-1)
    finally:
        passes.unregister_pass("count_rsqrt")
    print("tokens:", ids.tolist())
    for graph in ksbackend.explain().graphs:
        print(f"graph {graph.index}: {graph.nodes_before} -> {graph.nodes_after} nodes")
        for result in graph.passes:
            if result.matched or result.left:
                print(f"  {result.name}: matched {len(result.matched)}, left {len(result.left)}")
                for site in result.matched[:2]:
                    print(f"    + {site}")
                for site, reason in result.left[:2]:
                    print(f"    - {site}: {reason}")
    return ids


if __name__ == "__main__":
    main()
