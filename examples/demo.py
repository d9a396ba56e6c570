"""kernelstack in two steps, on whatever this machine has.

On CPU: a small Llama built from a config (random weights), fp32, executing kernelstack's op references.
On a GPU: Llama-3.2-1B's real shapes in bf16, on FlashInfer attention and Triton kernels.

    python examples/demo.py [--model llama-3.2-1b] [--new-tokens 64]
"""

import argparse
import copy
import time

import torch

import ksbackend

from ksbackend.models import build_model
from ksbackend.models import real_config
from ksbackend.models import tiny_config


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    parser.add_argument("--model", default="llama-3.2-1b" if cuda else "tiny-llama")
    parser.add_argument("--new-tokens", type=int, default=64 if cuda else 24)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()

    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    config = tiny_config("llama", hidden_size=128, intermediate_size=256, num_hidden_layers=3) \
        if args.model == "tiny-llama" else real_config(args.model)
    model = build_model(config, dtype=dtype, device=device)
    print(f"model {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params, random weights) "
          f"on {device} in {dtype}")

    # 1. The backend by name: any forward call.
    torch.manual_seed(0)
    ids = torch.randint(3, config.vocab_size, (2, 16), device=device)
    with torch.no_grad():
        ref = model(ids).logits.float()
        out = torch.compile(model, backend="kernelstack", options={"executor": "fx"})(ids).logits.float()
    print(f"\n[1] torch.compile(model, backend='kernelstack'): max |logits - HF| = {(out - ref).abs().max():.2e}")
    print(ksbackend.explain())

    # 2. The drop-in: generate on a ragged, left-padded batch.
    lengths = [int(n) for n in torch.randint(8, 64, (args.batch,))]
    width = max(lengths)
    prompts = torch.randint(3, config.vocab_size, (args.batch, width), device=device)
    mask = torch.zeros_like(prompts)
    for row, n in enumerate(lengths):
        mask[row, width - n:] = 1
    prompts[mask == 0] = 0
    gen = dict(attention_mask=mask, max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    hf_model = copy.deepcopy(model)
    hf_out, hf_s = timed(lambda: hf_model.generate(prompts, **gen))
    ksbackend.optimize(model)
    timed(lambda: model.generate(prompts, **gen))  # compile + warm-up
    ks_out, ks_s = timed(lambda: model.generate(prompts, **gen))
    same = (hf_out == ks_out).all(dim=1)
    steps = hf_out.shape[1] - width
    print(f"\n[2] ksbackend.optimize(model); model.generate(...): batch {args.batch}, prompts {min(lengths)}..{max(lengths)} "
          f"tokens, {steps} new")
    print(f"    HF eager     {1e3 * hf_s / steps:8.2f} ms/token")
    print(f"    kernelstack  {1e3 * ks_s / steps:8.2f} ms/token   ({hf_s / ks_s:.2f}x)")
    print(f"    greedy tokens identical to HF eager for {int(same.sum())}/{len(same)} prompts")
    print(ksbackend.explain(model))


if __name__ == "__main__":
    main()
