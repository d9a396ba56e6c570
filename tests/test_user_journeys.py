"""kernelstack used the way people use Hugging Face models (CPU, fp32, tiny models from configs), against
the same model untouched: HF's default generation settings, no length argument, deepcopy, threads,
eos lists, batches larger than the pool or the batch limit, fp8 KV, the report's own words."""

import collections
import copy
import logging
import pathlib
import random
import re
import subprocess
import sys
import tempfile
import threading
import warnings

import pytest
import torch
import transformers

import ksbackend
import ksbackend.hf

from ksbackend.models import FAMILIES
from ksbackend.models import build_model
from ksbackend.models import tiny_config

from .conftest import compile_fx
from .conftest import ragged_batch

FX = {"backend_options": {"executor": "fx"}}


def optimized_copy(model, **options):
    return ksbackend.optimize(copy.deepcopy(model), **{**FX, **options})


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_no_length_argument_uses_hf_default_of_20_new_tokens(family):
    model = build_model(tiny_config(family))
    ids, mask = ragged_batch([6, 9])
    ref = model.generate(ids, attention_mask=mask, pad_token_id=0)
    out = optimized_copy(model).generate(ids, attention_mask=mask, pad_token_id=0)
    assert ref.shape[1] == ids.shape[1] + 20
    assert torch.equal(out, ref)


def test_backend_by_name_in_grad_mode_gives_hf_logits_and_gradients():
    """The README's first line, in PyTorch's default grad mode: no crash, HF's logits, HF's gradients."""
    model = build_model(tiny_config("llama"))
    ids = torch.randint(3, 256, (2, 7))
    reference = copy.deepcopy(model)
    ref = reference(ids).logits
    out = compile_fx(model)(ids).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    ref.pow(2).mean().backward()
    out.pow(2).mean().backward()
    assert ksbackend.explain().matched("rms_norm") > 0
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_sampling_follows_hf_resolved_defaults_top_k_50():
    """do_sample=True with no top_k: transformers applies top-k 50, so must kernelstack."""
    model = build_model(tiny_config("llama"))
    prompt = torch.randint(3, 256, (1, 8))
    with torch.no_grad():
        allowed = model(prompt).logits[0, -1].topk(50).indices
    batch = prompt.repeat(64, 1)
    out = optimized_copy(model).generate(batch, attention_mask=torch.ones_like(batch), do_sample=True,
                                         max_new_tokens=1, pad_token_id=0)
    first = out[:, -1]
    assert torch.isin(first, allowed).all(), "drew a token outside HF's default top-50"
    assert len(first.unique()) > 5  # and it really sampled


def test_deepcopy_of_an_optimized_model_generates_with_its_own_weights():
    model = build_model(tiny_config("qwen2"))
    ids, mask = ragged_batch([5, 8])
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    optimized = optimized_copy(model)
    optimized.generate(ids, **kwargs)  # the runtime exists now: the copy must not share it
    twin = copy.deepcopy(optimized)
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(0.05 * torch.randn_like(p))
    twin_ref = copy.deepcopy(twin)
    twin_ref.generate = type(twin_ref).generate.__get__(twin_ref)  # plain HF on the perturbed weights
    assert torch.equal(twin.generate(ids, **kwargs), twin_ref.generate(ids, **kwargs))
    assert torch.equal(optimized.generate(ids, **kwargs), model.generate(ids, **kwargs))
    assert twin._kernelstack_engine is not optimized._kernelstack_engine


def test_three_threads_four_calls_each_get_their_own_answers():
    model = build_model(tiny_config("llama"))
    optimized = optimized_copy(model)
    work = [ragged_batch(lengths) for lengths in ([3, 7], [5], [9, 2, 4], [6, 6], [1, 8], [4], [7, 3, 5], [2, 2],
                                             [8], [5, 9], [3], [6, 1, 2])]
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    expected = [model.generate(ids, attention_mask=mask, **kwargs) for ids, mask in work]
    results, errors = {}, []

    def worker(indices):
        try:
            for i in indices:
                results[i] = optimized.generate(work[i][0], attention_mask=work[i][1], **kwargs)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(range(t, 12, 3),)) for t in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, ref in enumerate(expected):
        assert torch.equal(results[i], ref), f"call {i}"


def test_eos_list_without_pad_pads_with_the_first_eos_like_hf():
    model = build_model(tiny_config("mistral"))
    ids, mask = ragged_batch([4, 7, 5])
    free_run = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
    new = free_run[:, ids.shape[1]:]
    eos = [int(new[1, 2]), int(new[0, 3])]  # rows stop at different steps
    if eos[0] == eos[1]:
        eos[1] = (eos[0] + 1) % 256
    eos = [max(eos), min(eos)]  # the first is not the smallest
    kwargs = dict(attention_mask=mask, max_new_tokens=16, do_sample=False, eos_token_id=eos)
    model.generation_config.pad_token_id = None
    ref = model.generate(ids, **kwargs)
    out = optimized_copy(model).generate(ids, **kwargs)
    assert torch.equal(out, ref)
    assert (ref == eos[0]).any()


def test_seventy_prompts_of_300_tokens_under_default_options():
    model = build_model(tiny_config("llama"))
    ids, mask = ragged_batch([300] * 70)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(optimized_copy(model).generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                                      pad_token_id=0), ref)


def test_more_prompts_than_max_batch_size_run_in_waves():
    model = build_model(tiny_config("llama"))
    ids, mask = ragged_batch([int(n) for n in torch.randint(2, 12, (300,))])
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    optimized = optimized_copy(model)
    out = optimized.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(out, ref)
    assert "2 prefill steps" in str(ksbackend.explain(optimized))  # 256, then the other 44


def test_pool_exhausted_during_decode_preempts_and_keeps_every_token(monkeypatch):
    """Two rows that each fit, but not together to the end: the younger is preempted mid-decode, re-queued
    with its tokens so far, and finishes later; the output is HF's."""
    monkeypatch.setattr(ksbackend.hf, "RESERVE_TOKENS", 16)
    model = build_model(tiny_config("llama"))
    ids, mask = ragged_batch([10, 10])
    kwargs = dict(attention_mask=mask, max_new_tokens=30, do_sample=False, pad_token_id=0)
    optimized = optimized_copy(model, max_kv_tokens=96, page_size=16)  # 5 usable pages; each row ends on 3
    assert torch.equal(optimized.generate(ids, **kwargs), model.generate(ids, **kwargs))
    assert "1 preemptions" in str(ksbackend.explain(optimized))


def test_fp8_kv_scales_do_not_depend_on_what_ran_before():
    model = build_model(tiny_config("llama"))
    small, small_mask = ragged_batch([6])
    big, big_mask = ragged_batch([9])
    with torch.no_grad():
        model.model.embed_tokens.weight[big[0]] *= 30  # this prompt's activations are far larger
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    first = optimized_copy(model, kv_cache_dtype="fp8_e4m3")
    first.generate(big, attention_mask=big_mask, **kwargs)
    after_big = first.generate(small, attention_mask=small_mask, **kwargs)
    fresh = optimized_copy(model, kv_cache_dtype="fp8_e4m3").generate(small, attention_mask=small_mask, **kwargs)
    assert torch.equal(after_big, fresh)
    pool = first._kernelstack_engine.runner.pool
    assert pool.fp8 and len(set(pool.k_scales)) > 1  # per-layer scales, from the model
    assert "fp8 KV scales from a fixed" in str(ksbackend.explain(first))


class _PackedProjection(torch.nn.Module):
    """A projection as quantized layers hold one (GPTQ's, AWQ's ``qweight``): no ``weight`` attribute."""

    def __init__(self, linear):
        super().__init__()
        self.qweight = torch.nn.Parameter(linear.weight.detach().clone())
        self.out_features = linear.out_features

    def forward(self, x):
        return x @ self.qweight.t()


def test_projections_without_a_weight_run_and_match_hf():
    model = build_model(tiny_config("llama"))
    for layer in model.model.layers:
        for name in ("q_proj", "k_proj"):
            setattr(layer.self_attn, name, _PackedProjection(getattr(layer.self_attn, name)))
    ids, mask = ragged_batch([7, 4, 9])
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    got = optimized_copy(model).generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, expected)


def test_right_padding_warns_like_hf():
    model = build_model(tiny_config("llama"))
    ids, mask = ragged_batch([5, 3])
    ids, mask = ids.flip(1), mask.flip(1)  # right-padded, as a tokenizer with padding_side="right" gives
    optimized = optimized_copy(model)
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    hf_logger = transformers.utils.logging.get_logger("transformers")
    hf_logger.addHandler(handler)
    try:
        optimized.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    finally:
        hf_logger.removeHandler(handler)
    assert any("right-padding was detected" in m for m in seen), seen  # transformers' own logger and words
    assert "right-padded input" in str(ksbackend.explain(optimized))


def test_disable_passes_takes_a_single_name():
    model = build_model(tiny_config("llama"))
    with torch.no_grad():
        compile_fx(model, disable_passes="rope")(torch.randint(3, 256, (1, 5)))
    report = ksbackend.explain()
    assert [p.name for p in report.graphs[0].passes].count("rope") == 0 and report.matched("attention") == 2
    assert ksbackend.BackendOptions.from_options({"disable_passes": "rope"}).disable_passes == ("rope",)


def test_gemma2_soft_capping_is_reported_as_such():
    model = build_model(tiny_config("gemma2"), attn_implementation="eager")
    with torch.no_grad():
        compile_fx(model)(torch.randint(3, 256, (1, 5)))
    reasons = [reason for p in ksbackend.explain().graphs[0].passes for _, reason in p.left]
    assert any("soft-capping" in r for r in reasons), reasons


def test_bench_help_names_only_files_in_the_repo():
    out = subprocess.run([sys.executable, "-m", "ksbackend.bench", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    root = pathlib.Path(__file__).resolve().parents[1]
    named = re.findall(r"[\w./-]+\.md", out.stdout)
    assert named and all((root / name).exists() for name in named), named


def test_bench_compiles_each_system_once_for_all_batch_sizes(monkeypatch):
    """The benchmark's cold time is mostly compiles: each system is optimized once and measures every batch size
    (twice as many compiles were half of the 10 minutes the whole benchmark may take). Tokens still match HF's."""
    from ksbackend.bench import generate
    from ksbackend.models import left_pad

    def prompts(model, batch, ragged):
        rows = [torch.randint(3, 256, (4 + i,)) for i in range(batch)]
        return (*left_pad(rows), [len(r) for r in rows])

    optimized = []
    real_optimize = ksbackend.optimize
    monkeypatch.setattr(ksbackend, "optimize", lambda model, **kw: optimized.append(kw) or real_optimize(model, **kw))
    monkeypatch.setattr(generate, "load", lambda name: build_model(tiny_config("llama")))
    monkeypatch.setattr(generate, "scenario_prompts", prompts)
    monkeypatch.setattr(generate, "SHORT", 2)
    monkeypatch.setattr(generate, "LONG", 6)
    for name in ("reset_peak_memory_stats", "empty_cache", "get_device_name"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: 0)
    results, spent = [], {}
    generate.run_model(1e12, [], results, "tiny", [1, 3], ["hf-eager", "kernelstack"], spent)
    assert len(optimized) == 1
    assert list(spent) == ["load models", "hf-eager", "kernelstack"] and min(spent.values()) > 0  # the run's total
    assert [r["batch"] for r in results] == [1, 3]
    assert [r["systems"]["kernelstack"]["same_tokens"] for r in results] == [1.0, 1.0]
    assert [r["systems"]["kernelstack"]["warm"] for r in results] == [False, True]  # the table says so


def test_inductor_failure_falls_back_to_fx_with_the_reason_in_the_report(monkeypatch, caplog, tmp_path):
    """An Inductor error on a rewritten graph (seen on the H100: CantSplit with the fused-kernel passes off) must not
    reach the user: the graph runs as FX, tokens equal HF's, and the report and the log say why."""
    import torch._inductor.compile_fx as inductor

    monkeypatch.setenv("KERNELSTACK_CACHE_DIR", str(tmp_path))  # an empty cache: the graphs compile here

    def broken(*args, **kwargs):
        raise RuntimeError("CantSplit: 2048 not divisible by 2048*s18")

    monkeypatch.setattr(inductor, "compile_fx", broken)
    model = build_model(tiny_config("llama"))
    ids, mask = ragged_batch([5, 8])
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with caplog.at_level(logging.WARNING, logger="ksbackend"):
        optimized = ksbackend.optimize(copy.deepcopy(model))
        out = optimized.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(out, ref)
    report = str(ksbackend.explain())
    assert "executor fx (Inductor failed: RuntimeError: CantSplit" in report
    assert "running it as FX instead" in caplog.text
    # the trace cache could not store an FX graph; its attempt's graphs are taken back, the fallback's reported
    own = ksbackend.explain(optimized)
    assert [g.purpose for g in own.graphs] == ["prefill", "decode"] and "tracing not cached" in str(own)


def test_two_optimized_models_generating_in_two_threads_keep_their_own_steps():
    """Each model's step context (KV pool, metadata) is its thread's: a deepcopy generating beside the original must
    neither crash on the other's pool nor read its K/V."""
    model = build_model(tiny_config("qwen3"))
    first = optimized_copy(model)
    second = copy.deepcopy(first)
    work = [ragged_batch(lengths) for lengths in ([5, 3, 1], [2, 9], [7], [4, 4, 6])]
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    expected = [model.generate(ids, attention_mask=mask, **kwargs) for ids, mask in work]
    results, errors = {}, []
    start = threading.Barrier(2)

    def worker(name, optimized):
        try:
            start.wait()
            for i, (ids, mask) in enumerate(work * 2):
                results[name, i] = optimized.generate(ids, attention_mask=mask, **kwargs)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(name, m)) for name, m in (("first", first), ("second", second))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for (name, i), out in results.items():
        assert torch.equal(out, expected[i % len(work)]), (name, i)
    graphs = [{id(g) for g in ksbackend.explain(m).graphs} for m in (first, second)]
    assert all(graphs) and not graphs[0] & graphs[1]  # each report holds the graphs its own model compiled


def test_a_fallback_generate_beside_a_fast_one_on_one_model_in_two_threads():
    """Beam search goes to HF's generate; while another thread's fast-path step has the model's attention switched to
    kernelstack's, that HF forward must not run (it would find no kernelstack step): calls on one model take turns."""
    model = build_model(tiny_config("llama"))
    optimized = optimized_copy(model)
    ids, mask = ragged_batch([6, 3, 8])
    fast = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    beams = dict(fast, num_beams=2)
    expected = {"fast": model.generate(ids, **fast), "beams": model.generate(ids, **beams)}
    results, errors = collections.defaultdict(list), []
    start = threading.Barrier(2)

    def worker(name, kwargs):
        try:
            start.wait()
            for _ in range(6):
                results[name].append(optimized.generate(ids, **kwargs))
        except Exception as exc:  # surfaced below
            errors.append(exc)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback warns on every call
        threads = [threading.Thread(target=worker, args=item) for item in (("fast", fast), ("beams", beams))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
    for name, outs in results.items():
        assert len(outs) == 6 and all(torch.equal(out, expected[name]) for out in outs), name


def test_a_dropped_model_frees_its_kv_pool_before_the_next_model_sizes_its_own():
    """A notebook that optimizes a model, drops it and optimizes another: the dropped one is a reference cycle
    (model, engine, compiled forwards), so without a collection its KV pool and graphs would stay allocated, and on a
    GPU the next pool, sized from free memory, would get half of what they left (the GPU suite ran out of memory
    that way, three tests in). Automatic collection is off here, so only kernelstack's own collection can free it."""
    import gc
    import weakref

    ids, mask = ragged_batch([5, 3])
    greedy = dict(attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    gc.collect()
    gc.disable()
    try:
        first = ksbackend.optimize(build_model(tiny_config("llama")))
        first.generate(ids, **greedy)
        pool = weakref.ref(first._kernelstack_engine.runner.pool)
        del first
        assert pool() is not None  # the cycle keeps it: nothing but a collection frees it
        second = ksbackend.optimize(build_model(tiny_config("qwen3")))
        out = second.generate(ids, **greedy)
        assert pool() is None and out.shape == (2, ids.shape[1] + 3)
        kept = weakref.ref(second._kernelstack_engine.runner.pool)
        ksbackend.restore(second)  # and restore frees a runtime at once
        assert kept() is None
    finally:
        gc.enable()


def test_bench_runs_models_on_several_gpus_one_process_each(monkeypatch, tmp_path):
    """With several GPUs the whole benchmark takes about as long as its slowest model: one child process per model,
    never two on one GPU, the parent's GPU list honoured, rows back in the asked order, and a child that fails is
    reported without losing the others."""
    import json

    from ksbackend.bench import generate

    started, live, most = [], set(), [0]

    class Child:
        def __init__(self, command, stdout, stderr, env):
            self.model = command[command.index("--model") + 1]
            self.json = command[command.index("--json") + 1]
            self.device = env["CUDA_VISIBLE_DEVICES"]
            assert self.device not in live and command[command.index("--gpus") + 1] == "1"
            live.add(self.device)
            most[0] = max(most[0], len(live))
            started.append((self.model, self.device, command.count("--batch")))
            self.polls = random.randint(1, 3)

        def poll(self):
            self.polls -= 1
            if self.polls > 0:
                return None
            live.discard(self.device)
            if self.model == "broken":
                self.returncode = 1
                return 1
            rows = [dict(model=self.model, batch=b, scenario=f"{b} / 128", copy_bandwidth=3e12, systems={})
                    for b in (1, 32)]
            with open(self.json, "w") as f:
                json.dump(dict(copy_bandwidth=3e12, spent={"hf-eager": 2.0}, results=rows), f)
            self.returncode = 0
            return 0

    monkeypatch.setattr(subprocess, "Popen", Child)
    monkeypatch.setattr(generate.time, "sleep", lambda s: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,7")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    out = []
    models = ["a", "b", "broken", "c", "d"]
    results, spent, per_model = generate.run_on_gpus(out, models, [1, 32], ["hf-eager"], gpus=2)
    assert most[0] == 2 and {device for _, device, _ in started} == {"3", "5"}
    assert [m for m, _, _ in started] == models and all(n == 2 for _, _, n in started)
    assert [(r["model"], r["batch"]) for r in results] == [(m, b) for m in "abcd" for b in (1, 32)]
    assert spent == {"hf-eager": 8.0}
    assert "broken failed on GPU" in "".join(out) and "broken" in per_model and "d " in per_model


def test_an_interrupted_multi_gpu_bench_leaves_no_child_running(monkeypatch, tmp_path):
    from ksbackend.bench import generate

    children = []

    class Child:
        def __init__(self, command, stdout, stderr, env):
            self.killed = False
            children.append(self)

        def poll(self):
            return None

        def kill(self):
            self.killed = True

    def interrupted(seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr(subprocess, "Popen", Child)
    monkeypatch.setattr(generate.time, "sleep", interrupted)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        generate.run_on_gpus([], ["a", "b", "c"], [1], ["hf-eager"], gpus=2)
    assert len(children) == 2 and all(child.killed for child in children)


def test_bench_compiles_hf_static_for_each_batch_size_as_a_fresh_process_would():
    """HF's compile leaves ``dynamic`` to Dynamo: the second scenario in one process (its static cache longer) would get
    a dynamic-shape graph, and Dynamo's on-disk profile would pass that to later runs, so the batch-32 baseline would
    depend on what ran before it. The bench compiles each scenario static, as a process running only it would."""
    from ksbackend.bench.generate import fresh_compile

    graphs = []

    def backend(gm, example_inputs):
        values = [node.meta["example_value"] for node in gm.graph.find_nodes(op="placeholder")]
        graphs.append(any(isinstance(s, torch.SymInt) for v in values
                          for s in (v.shape if isinstance(v, torch.Tensor) else [v])))
        return gm.forward

    compiled = torch.compile(lambda x: torch.nn.functional.silu(x) * 2, backend=backend)
    for length in (272, 1168):  # HF's static cache length follows the prompt: 128 + 144, then 1024 + 144
        compiled(torch.randn(2, length))
    assert graphs == [False, True]  # what the second scenario gets without the bench's care
    for length in (272, 1168):
        with fresh_compile("hf-static"):
            compiled(torch.randn(2, length))
            assert not torch._dynamo.config.automatic_dynamic_local_pgo
    assert graphs == [False, True, False, False]
    with fresh_compile("kernelstack"):  # other systems compile as they always do
        compiled(torch.randn(2, 64))
    assert graphs == [False, True, False, False, False] and torch._dynamo.config.automatic_dynamic_local_pgo
