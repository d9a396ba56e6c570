"""The backend's contract: entry point, options, the mode= keyword, the pass API and its safety net."""

import logging
import subprocess
import sys

import pytest
import torch

import ksbackend
import passes

from ksbackend.models import build_model
from ksbackend.models import tiny_config
from passes.base import is_op

from .conftest import compile_fx


def small_model_and_input(family="llama"):
    model = build_model(tiny_config(family))
    return model, torch.randint(3, 256, (2, 6))


def test_backend_found_by_name_without_importing_ksbackend():
    code = ("import torch; from torch._dynamo import list_backends; "
            "assert 'kernelstack' in list_backends(), list_backends(); "
            "norm = lambda x: torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * x; "
            "f = torch.compile(norm, backend='kernelstack', options={'executor': 'fx'}); "
            "x = torch.randn(3, 8); print(float((f(x) - norm(x)).abs().max()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.strip().splitlines()[-1]) == 0.0


def test_unknown_option_lists_valid_ones():
    model, ids = small_model_and_input()
    with pytest.raises(Exception, match="unknown kernelstack option.*executor"):
        compile_fx(model, exectuor="fx")(ids)


def test_bad_option_value_lists_choices():
    with pytest.raises(ksbackend.OptionError, match="choose one of"):
        ksbackend.BackendOptions.from_options({"executor": "tvm"})
    with pytest.raises(ksbackend.OptionError, match="choose one of"):
        ksbackend.BackendOptions.from_options({"disable_passes": ["no_such_pass"]})
    with pytest.raises(ksbackend.OptionError, match="must be a bool"):
        ksbackend.BackendOptions.from_options({"fuse_residual_add": "yes"})


def test_mode_keyword_from_hf_compile_config():
    """HF's CompileConfig calls the backend with mode=...; it must be accepted."""
    model, ids = small_model_and_input()
    gm_calls = []

    def capture(gm, example_inputs):
        gm_calls.append(gm)
        return ksbackend.kernelstack_backend(gm, example_inputs, mode="default", options={"executor": "fx"})

    with torch.no_grad():
        ref = model(ids).logits
        out = torch.compile(model, backend=capture)(ids).logits
    assert gm_calls and torch.allclose(out, ref, atol=1e-4)
    with pytest.raises(ksbackend.OptionError, match="mode"):
        ksbackend.BackendOptions.from_options(None, mode="turbo")


def test_failing_pass_is_undone_and_reported():
    model, ids = small_model_and_input()

    def breaks_halfway(gm, result):
        for node in list(gm.graph.nodes):
            if is_op(node, "rsqrt"):
                node.replace_all_uses_with(node.args[0])  # a wrong rewrite...
                raise RuntimeError("bug in user pass")    # ...then a crash: it must not survive

    with torch.no_grad():
        ref = model(ids).logits
        out = compile_fx(model, disable_passes=["rms_norm"], extra_passes=[breaks_halfway])(ids).logits
    result = ksbackend.explain().graphs[0].pass_result("breaks_halfway")
    assert result.error and "bug in user pass" in result.error
    assert "FAILED and undone" in str(ksbackend.explain())
    assert (out - ref).abs().max() <= 1e-4


def test_user_pass_registered_before_builtin_sees_original_graph():
    model, ids = small_model_and_input()

    def count_rsqrt(gm, result):
        for node in gm.graph.nodes:
            if is_op(node, "rsqrt"):
                result.match(node.name)

    passes.register_pass(count_rsqrt, before="rms_norm")
    try:
        names = [p.name for p in passes.DEFAULT_PASSES]
        assert names.index("count_rsqrt") < names.index("rms_norm")
        with torch.no_grad():
            compile_fx(model)(ids)
        report = ksbackend.explain()
        assert report.matched("count_rsqrt") == 5 and report.matched("rms_norm") == 5
        with pytest.raises(ValueError, match="already registered"):
            passes.register_pass(count_rsqrt)
    finally:
        passes.unregister_pass("count_rsqrt")
    assert "count_rsqrt" not in [p.name for p in passes.DEFAULT_PASSES]


def test_pass_hash_is_stable_and_distinct(monkeypatch):
    hashes = [p.source_hash() for p in passes.DEFAULT_PASSES]
    assert hashes == [p.source_hash() for p in passes.DEFAULT_PASSES]
    assert len(set(hashes)) == len(hashes)
    # no AST parsing: CPython 3.11's is not thread-safe, and runtimes hash the passes in the user's threads
    import ast

    def no_parse(*args, **kwargs):
        raise AssertionError("source_hash parsed an AST")

    monkeypatch.setattr(ast, "parse", no_parse)
    assert [p.source_hash() for p in passes.DEFAULT_PASSES] == hashes


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_inductor_executor_end_to_end(family):
    """The default executor: Inductor compiles what remains around the kernelstack ops."""
    model, ids = small_model_and_input(family)
    with torch.no_grad():
        ref = model(ids).logits
        out = torch.compile(model, backend="kernelstack")(ids).logits
    graph = ksbackend.explain().graphs[0]
    assert graph.executor == "inductor" and graph.matched("attention") == 2
    assert (out - ref).abs().max() <= 1e-4


class Unprintable:
    def __str__(self):
        raise AssertionError("an argument's IR was printed")


def test_inductor_names_ops_without_printing_their_arguments_ir_while_kernelstack_compiles(monkeypatch):
    """torch 2.12 and older format every argument's IR for a log line the first time Inductor meets a custom op,
    even with the log off (minutes for a 16-layer graph on an H100): during the backend's compile the message names
    the op and its arguments' types, nested and concurrent compiles included; afterwards torch's own is back."""
    from torch._inductor import compile_fx as compile_fx_module
    from torch._inductor.exc import OperatorIssue

    from ksbackend.backend import short_operator_messages

    original = OperatorIssue.__dict__["operator_str"]
    with short_operator_messages():
        with short_operator_messages():
            message = OperatorIssue.operator_str(torch.ops.kernelstack.rms_norm.default, [Unprintable(), 1e-5], {})
        assert OperatorIssue.__dict__["operator_str"] is not original  # the outer compile still runs
    assert "kernelstack.rms_norm" in message and "Unprintable" in message
    assert OperatorIssue.__dict__["operator_str"] is original
    with pytest.raises(AssertionError, match="IR was printed"):
        OperatorIssue.operator_str("op", [Unprintable()], {})
    with monkeypatch.context() as patched:  # a torch without the method: compiles go on, nothing is patched
        patched.delattr(OperatorIssue, "operator_str")
        with short_operator_messages():
            assert "operator_str" not in OperatorIssue.__dict__

    seen = []
    real = compile_fx_module.compile_fx

    def watching(*args, **kwargs):
        seen.append(OperatorIssue.__dict__["operator_str"] is not original)
        return real(*args, **kwargs)

    monkeypatch.setattr(compile_fx_module, "compile_fx", watching)
    model, ids = small_model_and_input("llama")
    with torch.no_grad():
        ref = model(ids).logits
        out = torch.compile(model, backend="kernelstack")(ids).logits
    assert seen == [True] and (out - ref).abs().max() <= 1e-4


def test_a_custom_op_first_met_deep_in_the_graph_is_named_not_printed(monkeypatch):
    """The stall the H100 hit, replayed on the CPU: with the GEMV prologue on, the final norm is the graph's only plain
    add_rms_norm, so Inductor meets that op first after every layer, and printing its arguments' IR grows
    exponentially with depth (2 layers: 12M characters; 3 layers: 172M, 48 s; 4 layers: over 10 minutes). torch
    2.11 builds the string always; 2.13 only when its log is on, as here."""
    from torch._inductor import config as inductor_config
    from torch._inductor.lowering import lowerings

    monkeypatch.setenv("KERNELSTACK_GEMV_PROLOGUE", "1")
    monkeypatch.setattr(inductor_config, "fx_graph_cache", False)  # lowered here, not loaded from an earlier run
    # Inductor makes (and logs) an op's implicit fallback once per process: an earlier test in this worker may
    # have lowered the op already
    monkeypatch.delitem(lowerings, torch.ops.kernelstack.add_rms_norm.default, raising=False)
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    graph_log = logging.getLogger("torch._inductor.graph")  # torch's loggers do not propagate to caplog's
    level = graph_log.level
    graph_log.setLevel(logging.INFO)  # (setLevel clears the cached answers of an earlier test's log calls)
    graph_log.addHandler(handler)
    model = build_model(tiny_config("llama"))  # 2 layers: enough to tell a name from a printed tree
    ids = torch.randint(3, 256, (1, 9))
    try:
        with torch.no_grad():
            ref = model(ids).logits
            out = torch.compile(model, backend="kernelstack")(ids).logits
    finally:
        graph_log.removeHandler(handler)
        graph_log.setLevel(level)
    fallbacks = [m for m in messages if "implicit fallback" in m]
    assert any("add_rms_norm.default" in m for m in fallbacks)  # the deep first encounter happened
    assert max(map(len, fallbacks)) < 2000
    assert ksbackend.explain().graphs[0].executor == "inductor" and (out - ref).abs().max() <= 1e-4


class RotaryEmbedding517(torch.nn.Module):
    """transformers 5.17's LlamaRotaryEmbedding.forward, written as it is there (matmul form)."""

    def __init__(self, dim=16, base=10000.0):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim)), persistent=False)
        self.attention_scaling = 1.0

    def forward(self, x, position_ids):
        inv_freq_expanded = self.inv_freq[None, :, None].expand(position_ids.shape[0], -1, 1).to(dtype=torch.float,
                                                                                                 device=x.device)
        position_ids_expanded = position_ids[:, None, :].float()
        with torch.autocast(device_type="cpu", enabled=False):
            freqs = (inv_freq_expanded @ position_ids_expanded).transpose(1, 2)
            emb = torch.cat((freqs, freqs), dim=-1)
            cos = emb.cos() * self.attention_scaling
            sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def test_rope_table_in_the_transformers_517_form():
    rotary = RotaryEmbedding517()
    x, pos = torch.randn(2, 5, 16), torch.arange(5).repeat(2, 1) + torch.tensor([[0], [3]])
    ref = rotary(x, pos)
    out = compile_fx(rotary)(x, pos)
    assert ksbackend.explain().matched("rope_cos_sin") == 1
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


def test_a_runtime_decision_reaches_the_models_report_and_the_global_one():
    from ksbackend.backend import record_event
    from ksbackend.backend import recording_into
    from ksbackend.report import GLOBAL
    from ksbackend.report import Recorder

    mine = Recorder()
    with recording_into(mine):
        record_event("linear M=1 N=7 K=5 bfloat16: cuBLAS, 1.0 us (cuBLAS 1.0 us)")
    record_event("after the block")
    assert mine.snapshot().events == ["linear M=1 N=7 K=5 bfloat16: cuBLAS, 1.0 us (cuBLAS 1.0 us)"]
    assert GLOBAL.snapshot().events[-2:] == [mine.snapshot().events[0], "after the block"]


def test_a_lone_linear_over_a_strided_weight_or_a_callers_tensor_stays_correct():
    """A lone linear becomes a one-weight ``linear_cat``. A weight that is not contiguous stays as it is (re-pointing
    it at a copy would change the strides Dynamo guards on, and the guard failed), and a tensor the caller passes
    in is not taken for a parameter no kernel writes (a GEMV under PDL would read it before waiting)."""
    from ksbackend.ops.linear import is_packed_parameter

    linear = torch.nn.Linear(5, 8, bias=False)
    linear.weight = torch.nn.Parameter(torch.randn(5, 8).t())
    x = torch.randn(3, 5)
    with torch.no_grad():
        torch.testing.assert_close(compile_fx(linear)(x), x @ linear.weight.T, rtol=0, atol=0)
    assert not linear.weight.is_contiguous()
    assert ksbackend.explain().matched("projections") == 1
    weight = torch.randn(8, 5)
    out = compile_fx(lambda x, w: torch.nn.functional.linear(x, w))(x, weight)
    torch.testing.assert_close(out, x @ weight.T, rtol=0, atol=0)
    assert not is_packed_parameter(weight)
