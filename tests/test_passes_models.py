"""Every attention, norm, RoPE and activation site of each supported family is rewritten, and the
rewritten forward computes what HF's did (fp32, CPU), in prefill and decode, with Dynamic and Static caches."""

import copy

import pytest
import torch

from transformers import DynamicCache
from transformers import StaticCache

import ksbackend

from ksbackend.models import FAMILIES
from ksbackend.models import build_model
from ksbackend.models import tiny_config

from .conftest import compile_fx

LAYERS = 2


@pytest.fixture(autouse=True)
def gemv_prologue_on(monkeypatch):
    """The linear_prologue pass folds only with the GEMV prologue on: these tests check its rewrites too."""
    monkeypatch.setenv("KERNELSTACK_GEMV_PROLOGUE", "1")


def expected_counts(family):
    qk_norms = 2 * LAYERS if family == "qwen3" else 0
    return {"rope_cos_sin": 1, "rope": LAYERS, "attention": LAYERS, "rms_norm": 2 * LAYERS + 1 + qk_norms,
            "act_and_mul": LAYERS, "projections": 4 * LAYERS + 1,  # q/k/v, gate/up, o, down; lm_head
            "linear_prologue": 3 * LAYERS}  # input norm, post-attention norm, SiLU*mul (lm_head reads a slice)


def assert_counts(report, family, graphs=1):
    for name, count in expected_counts(family).items():
        assert report.matched(name) == count * graphs, f"{family}: pass {name}\n{report.to_text(verbose=True)}"
    for graph in report.graphs:
        assert all(p.error is None for p in graph.passes), report.to_text()


def random_prompt(vocab, batch, length, pad_rows=0):
    ids = torch.randint(3, vocab, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(pad_rows):  # left padding, as generate does for batches
        mask[row, : 1 + row] = 0
    return ids, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_rewrites_every_site_and_matches(family):
    model = build_model(tiny_config(family))
    ids, mask = random_prompt(model.config.vocab_size, 3, 11, pad_rows=2)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        out = compile_fx(model)(ids, attention_mask=mask).logits
    report = ksbackend.explain()
    assert_counts(report, family)
    # q/k/v and gate/up, each group laid out once (and Qwen2's q/k/v biases)
    assert report.graphs[0].packed == (3 if family == "qwen2" else 2) * LAYERS
    keep = mask.bool()  # padded positions are garbage in both; compare the real ones
    assert (out - ref)[keep].abs().max() <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_with_dynamic_cache(family):
    model = build_model(tiny_config(family))
    ids, _ = random_prompt(model.config.vocab_size, 2, 9)
    with torch.no_grad():
        cache = model(ids, past_key_values=DynamicCache(config=model.config), use_cache=True).past_key_values
        step = torch.randint(3, model.config.vocab_size, (2, 1))
        ref = model(step, past_key_values=copy.deepcopy(cache)).logits
        out = compile_fx(model)(step, past_key_values=copy.deepcopy(cache)).logits
    assert_counts(ksbackend.explain(), family)
    assert (out - ref).abs().max() <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_and_decode_with_static_cache(family):
    model = build_model(tiny_config(family))
    compiled = compile_fx(model)
    ids, _ = random_prompt(model.config.vocab_size, 2, 6)
    steps = torch.randint(3, model.config.vocab_size, (3, 2, 1))
    with torch.no_grad():
        outs = []
        for fn in (model, compiled):
            cache = StaticCache(config=model.config, max_cache_len=32)
            logits = [fn(ids, past_key_values=cache, cache_position=torch.arange(6)).logits[:, -1]]
            for i, step in enumerate(steps):
                logits.append(fn(step, past_key_values=cache, cache_position=torch.tensor([6 + i])).logits[:, -1])
            outs.append(torch.stack(logits))
    report = ksbackend.explain()
    assert len(report.graphs) >= 2  # prefill and decode are separate graphs
    assert_counts(report, family, graphs=len(report.graphs))
    assert (outs[0] - outs[1]).abs().max() <= 1e-4


def test_eager_attention_chain_is_rewritten():
    model = build_model(tiny_config("llama"), attn_implementation="eager")
    ids, mask = random_prompt(model.config.vocab_size, 2, 8, pad_rows=1)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        out = compile_fx(model)(ids, attention_mask=mask).logits
    report = ksbackend.explain()
    assert report.matched("attention") == LAYERS
    assert any("eager" in site for g in report.graphs for site in g.pass_result("attention").matched)
    assert (out - ref)[mask.bool()].abs().max() <= 1e-4


def test_unknown_attention_variant_is_left_with_reason():
    """Gemma-2 soft-caps the attention scores with tanh: no kernelstack op knows that, so the site
    stays as HF wrote it, the report says why, and the answer is still right."""
    model = build_model(tiny_config("gemma2"), attn_implementation="eager")
    ids, _ = random_prompt(model.config.vocab_size, 2, 10)
    with torch.no_grad():
        ref = model(ids).logits
        out = compile_fx(model)(ids).logits
    report = ksbackend.explain()
    attention = report.graphs[0].pass_result("attention")
    assert len(attention.matched) == 0
    reasons = [reason for _, reason in attention.left]
    assert len(reasons) == LAYERS and all("unknown attention variant" in r for r in reasons), reasons
    assert "unknown attention variant" in str(report)
    assert (out - ref).abs().max() <= 1e-4
    # the rest of the model is still rewritten
    assert report.matched("act_and_mul") == LAYERS


def test_disabled_pass_leaves_its_sites():
    model = build_model(tiny_config("llama"))
    ids, _ = random_prompt(model.config.vocab_size, 1, 5)
    with torch.no_grad():
        ref = model(ids).logits
        out = compile_fx(model, disable_passes=["rms_norm", "attention"])(ids).logits
    report = ksbackend.explain()
    names = [p.name for p in report.graphs[0].passes]
    assert "rms_norm" not in names and "attention" not in names
    assert report.matched("rope") == LAYERS
    assert (out - ref).abs().max() <= 1e-4


def test_unfused_residual_option():
    model = build_model(tiny_config("mistral"))
    ids, _ = random_prompt(model.config.vocab_size, 1, 5)
    with torch.no_grad():
        ref = model(ids).logits
        out = compile_fx(model, fuse_residual_add=False)(ids).logits
    graph = ksbackend.explain().graphs[0]
    assert not {"kernelstack::add_rms_norm", "kernelstack::add_rms_norm_linear"} & set(graph.ops)
    assert graph.ops["kernelstack::rms_norm"] + graph.ops["kernelstack::rms_norm_linear"] == 2 * LAYERS + 1
    assert (out - ref).abs().max() <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_rope_into_attention_hands_the_bf16_model_the_fp32_table(family):
    """In a bf16 model the fused op reads the fp32 cos/sin table and rounds it itself (a cast fed to an opaque op
    cost Inductor one copy kernel per layer); tokens equal those of the unfused rope + attention path."""
    model = build_model(tiny_config(family), dtype=torch.bfloat16)
    ids, mask = random_prompt(model.config.vocab_size, 3, 9, pad_rows=2)
    settings = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    fx = {"executor": "fx"}
    unfused = ksbackend.optimize(copy.deepcopy(model), backend_options=dict(fx, disable_passes=["rope_into_attention"]))
    reference = unfused.generate(ids, **settings)
    fused = ksbackend.optimize(copy.deepcopy(model), backend_options=fx)
    assert torch.equal(fused.generate(ids, **settings), reference)
    sites = [s for g in ksbackend.explain(fused).graphs for s in g.pass_result("rope_into_attention").matched]
    assert len(sites) == 2 * LAYERS and all(s.endswith("(the fp32 table, rounded in the op)") for s in sites)


def test_linear_prologue_is_off_by_default_and_says_why(monkeypatch):
    monkeypatch.delenv("KERNELSTACK_GEMV_PROLOGUE")
    model = build_model(tiny_config("llama"))
    ids, _ = random_prompt(model.config.vocab_size, 2, 7)
    with torch.no_grad():
        ref = model(ids).logits
        out = compile_fx(model)(ids).logits
    report = ksbackend.explain()
    pass_report = next(p for p in report.graphs[0].passes if p.name == "linear_prologue")
    assert not pass_report.matched and len(pass_report.left) == 3 * LAYERS
    assert all("KERNELSTACK_GEMV_PROLOGUE=1" in reason for _, reason in pass_report.left)
    ops = report.graphs[0].ops
    assert not [name for name in ops if name.endswith("_linear")]  # norms and SiLU*mul stay their own ops
    assert ops["kernelstack::linear_cat"] == 4 * LAYERS + 1
    assert (out - ref).abs().max() <= 1e-4
