"""ksbackend.optimize(model).generate(...) against HF eager generate, on CPU in fp32."""

import pytest
import torch

from transformers.generation.logits_process import MinPLogitsWarper
from transformers.generation.logits_process import TemperatureLogitsWarper
from transformers.generation.logits_process import TopKLogitsWarper
from transformers.generation.logits_process import TopPLogitsWarper

import ksbackend

from ksbackend.models import FAMILIES
from ksbackend.models import build_model
from ksbackend.models import tiny_config
from ksbackend.runtime.kv_pool import KVPoolExhausted

from .conftest import ragged_batch

FX = {"backend_options": {"executor": "fx"}}


def hf_and_kernelstack(family, calls, options=FX, **gen):
    model = build_model(tiny_config(family))
    batches = [ragged_batch(lengths) for lengths in calls]
    refs = [model.generate(ids, attention_mask=mask, pad_token_id=0, **gen) for ids, mask in batches]
    ksbackend.optimize(model, **options)
    outs = [model.generate(ids, attention_mask=mask, pad_token_id=0, **gen) for ids, mask in batches]
    return model, refs, outs


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_is_token_identical_to_hf_across_calls(family):
    calls = [[5, 9, 3, 12, 7], [6], [4, 10, 8]]
    model, refs, outs = hf_and_kernelstack(family, calls, max_new_tokens=32, do_sample=False)
    for ref, out in zip(refs, outs):
        assert ref.shape == out.shape and ref.shape[1] >= 32
        assert torch.equal(ref, out)
    report = ksbackend.explain(model)
    assert [g.purpose for g in report.graphs] == ["prefill", "decode"], report  # one graph per path
    assert report.matched("attention") == 2 * len(report.graphs)
    pool = model._kernelstack_engine.runner.pool
    assert not pool.sequences and pool.allocator.num_used == 1  # every page came back (the runner keeps one scratch page)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_inductor_serves_one_token_and_many_from_one_graph_per_path(family):
    """Inductor once added a ``2 <= tokens`` guard while lowering the views of q/k/v, so a batch of one (or a
    one-token prompt) compiled each path again: 15-17 s per model on an H100. Qwen3 also views q/k for its
    per-head norms. The graphs compiled at 3 rows serve 1 and 2 rows, with HF's tokens."""
    calls = [[6, 4, 9], [1], [7, 2]]  # prefill 19, 1 and 9 tokens; decode 3, 1 and 2 rows
    model, refs, outs = hf_and_kernelstack(family, calls, options={}, max_new_tokens=6, do_sample=False)
    for ref, out in zip(refs, outs):
        assert torch.equal(ref, out)
    report = ksbackend.explain(model)
    assert [g.purpose for g in report.graphs] == ["prefill", "decode"], report


def test_the_size_oblivious_view_strides_are_undone_by_the_last_thread_out():
    """Threads compiling at once share one patch of torch's stride function; none leaves it patched, nested or not.
    Inside kernelstack's compile scope a view of a sliced tensor gets the strides torch gives, with no guard on
    the token count (torch alone guards ``s != 1`` there, even with backed_size_oblivious on)."""
    import threading

    from torch._dynamo.source import ConstantSource
    from torch._subclasses import fake_impls
    from torch.fx.experimental import _config
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from ksbackend.hf import _no_size_one_specialization
    from ksbackend.hf import _size_oblivious_view_strides

    original = fake_impls._compute_stride
    inside = threading.Barrier(4)
    seen = []

    def compile_in_a_thread():
        with _size_oblivious_view_strides(), _size_oblivious_view_strides():
            inside.wait()
            seen.append(fake_impls._compute_stride is not original)

    threads = [threading.Thread(target=compile_in_a_thread) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == [True] * 4 and fake_impls._compute_stride is original

    def view_strides(scope):  # [1, s, 32] sliced from a [1, s, 128] row -> [1, s, 2, 16], s of any size
        env = ShapeEnv()
        s = env.create_symintnode(env.create_symbol(5, ConstantSource("tokens"), do_not_specialize_zero_one=True),
                                   hint=5)
        with scope():
            strides = fake_impls._compute_stride([1, s, 32], [128 * s, 128, 1], [1, s, 2, 16])
        return [str(x).replace(str(s), "s") for x in strides], [str(g.expr) for g in env.guards]

    with_patch, guards = view_strides(_no_size_one_specialization)
    without, torch_guards = view_strides(lambda: _config.patch(backed_size_oblivious=True))
    assert with_patch == without == ["128*s", "128", "16", "1"] and not guards and torch_guards


def test_eos_stops_sequences_and_pads_like_hf():
    model = build_model(tiny_config("llama"))
    ids, mask = ragged_batch([4, 7, 5])
    free_run = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0)
    eos = int(free_run[1, ids.shape[1] + 3])  # a token row 1 emits early: it will stop there
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0, eos_token_id=eos)
    ksbackend.optimize(model, **FX)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0, eos_token_id=eos)
    assert torch.equal(ref, out)
    assert (out[1, ids.shape[1] + 4:] == 0).all()  # finished row is padded after its eos
    assert "generate: 3 sequences, 16 prompt tokens (5 pad tokens skipped)" in str(ksbackend.explain(model))


def test_sampling_is_reproducible_with_a_seed():
    model = build_model(tiny_config("qwen2"))
    ksbackend.optimize(model, **FX)
    ids, mask = ragged_batch([6, 3])
    kwargs = dict(attention_mask=mask, max_new_tokens=16, do_sample=True, temperature=0.8, top_k=20, top_p=0.9,
                  min_p=0.02, pad_token_id=0)
    torch.manual_seed(7)
    first = model.generate(ids, **kwargs)
    torch.manual_seed(7)
    second = model.generate(ids, **kwargs)
    torch.manual_seed(8)
    third = model.generate(ids, **kwargs)
    assert torch.equal(first, second)
    assert not torch.equal(first, third)


def test_sampling_with_top_k_1_is_greedy():
    model = build_model(tiny_config("mistral"))
    ids, mask = ragged_batch([5, 8])
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    ksbackend.optimize(model, **FX)
    sampled = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=True, top_k=1, pad_token_id=0)
    assert torch.equal(greedy, sampled)


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [(0.7, 50, 0.9, 0.0), (1.3, 0, 0.5, 0.0),
                                                           (1.0, 10, 1.0, 0.1), (0.5, 3, 0.8, 0.05)])
def test_sampler_keeps_exactly_what_hf_warpers_keep(temperature, top_k, top_p, min_p):
    from ksbackend.ops.sampling import sampling_mask

    logits = torch.randn(6, 300) * 3
    scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    if min_p:
        scores = MinPLogitsWarper(min_p)(None, scores)
    allowed = torch.isfinite(scores)
    params = [torch.full((6,), v) for v in (temperature, top_k, top_p, min_p)]
    params[1] = params[1].long()
    _, mask = sampling_mask(logits, *params)
    assert torch.equal(mask, allowed)
    ones, zeros = torch.ones(6), torch.zeros(6)
    for offset in range(50):  # and sampling never leaves the allowed set
        tokens = torch.ops.kernelstack.sample(logits, *params, ones, zeros, zeros, None, None, torch.zeros(6, dtype=torch.bool),
                                              torch.tensor([7]), torch.tensor([offset]))
        assert allowed.gather(1, tokens[:, None]).all()


def test_batch_larger_than_the_pool_runs_in_waves():
    model = build_model(tiny_config("llama"))
    ids, mask = ragged_batch([30, 30, 30])
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    ksbackend.optimize(model, max_kv_tokens=64, page_size=16, **FX)  # 3 usable pages: one sequence at a time
    out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(out, ref)
    pool = model._kernelstack_engine.runner.pool
    assert not pool.sequences and pool.allocator.num_used == 1
    assert "3 prefill steps" in str(ksbackend.explain(model))


def test_a_sequence_that_can_never_fit_is_an_error_before_any_work():
    model = build_model(tiny_config("llama"))
    ksbackend.optimize(model, max_kv_tokens=64, page_size=16, **FX)
    ids, mask = ragged_batch([10, 60])
    with pytest.raises(KVPoolExhausted, match="max_kv_tokens") as raised:
        model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    message = str(raised.value)
    assert "32.0 KiB" in message and "kv_memory_fraction" not in message  # what the CPU pool really is and takes
    pool = model._kernelstack_engine.runner.pool
    assert not pool.sequences and pool.allocator.num_used == 1
    assert "prefill" not in str(ksbackend.explain(model))  # nothing ran


def test_kv_memory_follows_real_tokens_not_padding():
    model = build_model(tiny_config("llama"))
    ksbackend.optimize(model, page_size=4, **FX)
    lengths, new = [3, 61, 4, 5, 2], 8
    ids, mask = ragged_batch(lengths)
    model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=None, do_sample=False, pad_token_id=0)
    pool = model._kernelstack_engine.runner.pool
    real_pages = sum(-(-(n + new) // 4) for n in lengths)
    padded_pages = len(lengths) * -(-(max(lengths) + new) // 4)
    assert pool.allocator.high_water <= real_pages + 1  # + the runner's scratch page
    assert pool.allocator.high_water >= real_pages - len(lengths)  # at most each row's last step short
    assert pool.allocator.high_water * 2.5 < padded_pages  # a padded cache would take > 2.5x the memory here


def test_unsupported_family_falls_back_with_warning():
    model = build_model(tiny_config("gemma2"), attn_implementation="eager")
    ids, mask = ragged_batch([5, 3])
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with pytest.warns(UserWarning, match="not supported"):
        ksbackend.optimize(model)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0), ref)
    assert "gemma2" in str(ksbackend.explain(model))


def test_unsupported_generate_setting_falls_back_with_reason():
    model = build_model(tiny_config("llama"))
    ids, mask = ragged_batch([5, 3])
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=6, num_beams=2, do_sample=False, pad_token_id=0)
    ksbackend.optimize(model, **FX)
    with pytest.warns(UserWarning, match="beam_search"):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=6, num_beams=2, do_sample=False, pad_token_id=0)
    assert torch.equal(out, ref)
    assert "beam_search" in str(ksbackend.explain(model))


def test_batch_above_max_batch_size_runs_in_waves():
    model = build_model(tiny_config("llama"))
    ids, mask = ragged_batch([3, 5, 4])
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    ksbackend.optimize(model, max_batch_size=2, **FX)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(out, ref)
    assert "2 prefill steps" in str(ksbackend.explain(model))


def test_bad_runtime_option_is_an_error():
    model = build_model(tiny_config("llama"))
    with pytest.raises(ksbackend.OptionError, match="page_size"):
        ksbackend.optimize(model, page_size=12)
    with pytest.raises(ksbackend.OptionError, match="unknown kernelstack option"):
        ksbackend.optimize(model, kv_tokens=100)
    with pytest.raises(ksbackend.OptionError, match="decode_kernel"):
        ksbackend.optimize(model, decode_kernel="flash")
