"""Accuracy: greedy agreement with HF eager next to HF's own spread, and teacher-forced KL / top-1 against
an fp32 run, for kernelstack in bf16 and with fp8 KV, beside HF bf16's own figures."""

import copy
import statistics

import torch

from .common import table

NEW_TOKENS = 64


def greedy(out):
    import ksbackend

    from ksbackend.agreement import agreement_rate
    from ksbackend.agreement import agreement_setup
    from ksbackend.agreement import divergences
    from ksbackend.agreement import first_divergences
    from ksbackend.hf import _AttentionImplementation

    def rows():
        for family in ("llama", "qwen3"):
            for weights in ("random", "copy-task"):
                model, ids, mask = agreement_setup(family, weights, "cuda")
                width = ids.shape[1]
                kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
                reference = model.generate(ids, attention_mask=mask, **kwargs)
                with _AttentionImplementation(model, "eager"):
                    eager_attention = model.generate(ids, attention_mask=mask, **kwargs)
                single = reference.clone()
                for i in range(len(ids)):
                    prompt = ids[i][mask[i].bool()][None]
                    new = model.generate(prompt, attention_mask=torch.ones_like(prompt), **kwargs)[0, prompt.shape[1]:]
                    single[i, width:width + len(new)] = new
                candidate = ksbackend.optimize(copy.deepcopy(model)).generate(ids, attention_mask=mask, **kwargs)
                fp8 = ksbackend.optimize(copy.deepcopy(model), kv_cache_dtype="fp8_e4m3")
                fp8_candidate = fp8.generate(ids, attention_mask=mask, **kwargs)
                found = divergences(copy.deepcopy(model).float(), ids, mask, reference, candidate)
                firsts = sorted(f for f in first_divergences(reference, candidate, width) if f is not None)
                margins = [d.margin for d in found]
                yield [f"{family} / {weights}", f"{agreement_rate(reference, eager_attention, width):.0%}",
                       f"{agreement_rate(reference, single, width):.0%}",
                       f"{agreement_rate(reference, candidate, width):.0%}",
                       f"{agreement_rate(reference, fp8_candidate, width):.0%}", ", ".join(map(str, firsts)) or "none",
                       f"{statistics.median(margins):.3f} / {max(margins):.3f}" if margins else "-",
                       f"{sum(d.reference_right for d in found)} / {sum(d.candidate_right for d in found)} "
                       f"of {len(found)}"]

    table(out, f"Greedy agreement with HF eager (bf16; 4 layers, hidden 512, 8/2 heads; 32 ragged prompts, "
               f"{NEW_TOKENS} new tokens; HF = batched generate with SDPA)",
          ["family / weights", "HF eager-attention vs HF SDPA", "HF one prompt at a time vs batched",
           "kernelstack vs HF", "kernelstack fp8 KV vs HF", "kernelstack first divergences (token index)",
           "fp32 margin at kernelstack divergences (median / max, in logit std)",
           "at those, fp32 argmax = HF / = kernelstack"], rows())


def teacher_forced(out, model_names=("llama-3.2-1b",)):
    """Along HF's own greedy sequences: mean KL(fp32 || system) and top-1 agreement with fp32."""
    import ksbackend

    from ksbackend.agreement import agreement_setup
    from ksbackend.agreement import kernelstack_forced
    from ksbackend.agreement import teacher_forced as forced
    from ksbackend.models import build_model
    from ksbackend.models import left_pad
    from ksbackend.models import real_config

    def setups():
        for name in model_names:
            model = build_model(real_config(name), dtype=torch.bfloat16, device="cuda")
            gen = torch.Generator().manual_seed(0)
            rows = [torch.randint(3, model.config.vocab_size, (int(n),), generator=gen)
                    for n in torch.randint(16, 200, (8,), generator=gen)]
            yield f"{name} / random", model, *left_pad(rows, device="cuda")
        yield "llama 4-layer / copy-task", *agreement_setup("llama", "copy-task", "cuda", prompts=16)

    def rows():
        for label, model, ids, mask in setups():
            fp32 = copy.deepcopy(model).float()
            candidates = {"kernelstack": kernelstack_forced(ksbackend.optimize(copy.deepcopy(model))),
                          "kernelstack fp8 KV": kernelstack_forced(
                              ksbackend.optimize(copy.deepcopy(model), kv_cache_dtype="fp8_e4m3"))}
            results = forced(model, fp32, ids, mask, 32, candidates)
            hf = results["HF"]
            for name, r in results.items():
                yield [label, name, f"{r.mean_kl:.2e}", f"{r.mean_kl / max(hf.mean_kl, 1e-12):.2f}x", f"{r.top1:.2%}",
                       r.positions]
            del fp32, model
            torch.cuda.empty_cache()

    table(out, "Teacher-forced accuracy against fp32 (along HF bf16's greedy sequences, 32 tokens)",
          ["model / weights", "system (bf16 weights)", "mean KL(fp32 || system), nats", "vs HF bf16",
           "top-1 = fp32", "positions"], rows())


def run(bw, out):
    greedy(out)
    teacher_forced(out)
