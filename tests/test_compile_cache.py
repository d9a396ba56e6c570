"""The compile cache: what invalidates its key, that a second process reuses the first one's compile (and that
an edited pass does not), and that a broken or half-written entry is never used."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import types

from pathlib import Path

import pytest
import torch

import ksbackend
import passes

from ksbackend import compile_cache
from ksbackend.compile_cache import ARTIFACTS
from ksbackend.compile_cache import KEY_FILE
from ksbackend.compile_cache import CacheStats
from ksbackend.compile_cache import CompileCache
from ksbackend.compile_cache import PrecompiledFunction
from ksbackend.compile_cache import cache_key
from ksbackend.compile_cache import model_signature
from ksbackend.compile_cache import progress
from ksbackend.config import RuntimeOptions
from ksbackend.models import build_model
from ksbackend.models import tiny_config

ROOT = Path(__file__).resolve().parent.parent


def key_for(config=None, dtype=torch.float32, **options):
    model = build_model(config or tiny_config("llama"), dtype=dtype)
    return cache_key(model_signature(model), RuntimeOptions.from_options(options).graph_options())


def fuse_nothing(gm, result):
    pass


def fuse_nothing_either(gm, result):
    result.leave("everything", "an experiment")


# -- the key ------------------------------------------------------------------------------------------------
def test_key_is_stable():
    assert key_for() == key_for()
    extra = {"extra_passes": [fuse_nothing]}
    assert key_for(backend_options=extra) == key_for(backend_options=dict(extra))


def test_key_changes_when_a_pass_source_changes(monkeypatch):
    before = key_for()
    edited = type(passes.DEFAULT_PASSES[0])
    monkeypatch.setattr(edited, "source_hash", lambda self: "an edited rewrite")
    assert key_for() != before
    monkeypatch.undo()
    assert key_for() == before
    passes.register_pass(fuse_nothing)
    try:
        assert key_for() != before
    finally:
        passes.unregister_pass("fuse_nothing")


def test_key_changes_with_options():
    keys = {key_for(), key_for(page_size=32), key_for(backend_options={"disable_passes": ["rope"]}),
            key_for(backend_options={"extra_passes": [fuse_nothing]}),
            key_for(backend_options={"extra_passes": [fuse_nothing_either]}), key_for(trace_cache=False),
            key_for(kv_cache_dtype="fp8_e4m3")}
    assert len(keys) == 7


def test_options_only_the_runtime_reads_share_the_compiled_graphs():
    """The pool's size, batching, CUDA-graph replay and the attention implementation change nothing that is
    compiled (the opaque attention op dispatches each step), so a change in them reuses the entry; a second process
    loading it with all of them changed: ``test_a_process_with_other_runtime_options_loads_the_stored_traces``."""
    assert key_for(**RUNTIME_CHANGES) == key_for()


RUNTIME_CHANGES = dict(max_kv_tokens=512, kv_memory_fraction=0.3, max_batch_size=2, max_prefill_tokens=8,
                       decode_buckets=(1, 2), cuda_graphs=False, decode_kernel="triton", attention="reference")


def test_key_changes_with_the_gemv_prologue_switch(monkeypatch):
    """KERNELSTACK_GEMV_PROLOGUE decides what the linear_prologue pass rewrites: a stored trace of one setting must
    not load under the other."""
    monkeypatch.delenv("KERNELSTACK_GEMV_PROLOGUE", raising=False)
    off = key_for()
    monkeypatch.setenv("KERNELSTACK_GEMV_PROLOGUE", "1")
    assert key_for() != off


def test_key_changes_with_model_config_and_versions(monkeypatch):
    keys = {key_for(), key_for(tiny_config("llama", hidden_size=128)),
            key_for(tiny_config("llama", num_hidden_layers=3)), key_for(tiny_config("qwen2")),
            key_for(dtype=torch.bfloat16)}
    assert len(keys) == 5
    monkeypatch.setattr(torch, "__version__", "0.0.1")
    assert key_for() not in keys


def test_directory_argument_then_env_then_home(tmp_path, monkeypatch):
    monkeypatch.setenv("KERNELSTACK_CACHE_DIR", str(tmp_path / "env"))
    assert CompileCache("k").path == tmp_path / "env" / "k"
    assert CompileCache("k", tmp_path / "arg").path == tmp_path / "arg" / "k"
    monkeypatch.delenv("KERNELSTACK_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert CompileCache("k").path == Path.home() / ".cache" / "kernelstack" / "k"


# -- entries on disk ----------------------------------------------------------------------------------------
def fake_artifacts(monkeypatch, payload):
    """What torch.compiler.save_cache_artifacts returns once a process compiled (one artifact per payload)."""
    info = types.SimpleNamespace(inductor_artifacts=[f"fake-{hash(payload)}"])
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (payload, info))


def test_no_entry_is_a_plain_miss(tmp_path):
    cache = CompileCache("k", tmp_path)
    with cache:
        pass
    assert not cache.stats.hit and cache.stats.error is None
    assert cache.describe().startswith(f"compile cache {cache.path}: miss;")


def test_save_writes_a_checked_entry_once(tmp_path, monkeypatch):
    fake_artifacts(monkeypatch, b"artifacts")
    cache = CompileCache("k", tmp_path, description={"what": "went into the key"})
    assert cache.save() == len(b"artifacts")
    assert cache.save() == 0  # unchanged: not rewritten
    assert (cache.path / ARTIFACTS).read_bytes().endswith(b"\nartifacts")
    assert json.loads((cache.path / KEY_FILE).read_text()) == {"what": "went into the key"}
    assert cache.stats.saved_bytes == len(b"artifacts")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "not torch's"])
def test_an_unreadable_entry_is_ignored(tmp_path, monkeypatch, caplog, damage):
    fake_artifacts(monkeypatch, b"x" * 1000)
    CompileCache("k", tmp_path).save()
    file = tmp_path / "k" / ARTIFACTS
    whole = file.read_bytes()
    file.write_bytes({"truncated": whole[:-10], "garbage": b"\x00garbage",
                      "not torch's": compile_cache._pack(b"not serialized cache artifacts")}[damage])
    cache = CompileCache("k", tmp_path)
    with cache:  # the block runs: an unusable entry costs a compile, never the model
        ran = True
    assert ran and not cache.stats.hit and "ignored" in cache.stats.error
    assert "ignored" in caplog.text and "miss (ignored" in cache.describe()


def test_gemm_choices_measured_in_one_process_are_adopted_by_the_next(tmp_path, monkeypatch, caplog):
    from ksbackend.kernels import small_m_linear
    from ksbackend.report import GLOBAL

    gpu = torch.device("cuda", 0)  # only a device object: nothing runs on it
    measured = small_m_linear.ShapeChoices()
    key = (1, 3072, 2048, torch.bfloat16, False, 0)
    measured.winners[key] = ("Triton 8x512/4", {"cuBLAS": 14.2, "Triton 8x512/4": 10.9})
    measured.winners[(1, 64, 64, torch.float16, True, 1)] = ("cuBLAS", {"cuBLAS": 3.0})  # another GPU: not stored
    monkeypatch.setattr(small_m_linear, "SHAPE_CHOICES", measured)
    with CompileCache("k", tmp_path, device=gpu):
        pass
    fresh = small_m_linear.ShapeChoices()
    monkeypatch.setattr(small_m_linear, "SHAPE_CHOICES", fresh)
    cache = CompileCache("k", tmp_path, device=gpu)
    with cache:
        pass
    assert fresh.winners == {key: measured.winners[key]}
    assert "1 GEMM choices loaded" in cache.describe()
    assert any("N=3072 K=2048 bfloat16: Triton 8x512/4" in e and "earlier process" in e
               for e in GLOBAL.snapshot().events)
    # a file with one malformed row adopts nothing
    file = tmp_path / "k" / compile_cache.GEMM_FILE
    rows = json.loads(compile_cache._unpack(file.read_bytes()))
    good = file.read_bytes()
    file.write_bytes(compile_cache._pack(json.dumps(rows + [[1, 8, 8, "not_a_dtype", False, "cuBLAS",
                                                             {"cuBLAS": 1.0}]]).encode()))
    monkeypatch.setattr(small_m_linear, "SHAPE_CHOICES", small_m_linear.ShapeChoices())
    with CompileCache("k", tmp_path, device=gpu):
        pass
    assert small_m_linear.SHAPE_CHOICES.winners == {} and "not a GEMM choice" in caplog.text
    file.write_bytes(good)
    # a damaged file costs the timing only
    file.write_bytes(file.read_bytes()[:-5])
    monkeypatch.setattr(small_m_linear, "SHAPE_CHOICES", small_m_linear.ShapeChoices())
    with CompileCache("k", tmp_path, device=gpu):
        pass
    assert small_m_linear.SHAPE_CHOICES.winners == {} and "ignored" in caplog.text
    # a CPU model keeps no choices, and a disabled cache reads none
    assert CompileCache("c", tmp_path, device=torch.device("cpu")).device is None
    with CompileCache("k", tmp_path, enabled=False, device=gpu):
        pass
    assert small_m_linear.SHAPE_CHOICES.winners == {}


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / ARTIFACTS
    compile_cache.write_atomic(target, b"old")

    def replace_fails(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", replace_fails)
    with pytest.raises(OSError):
        compile_cache.write_atomic(target, b"new")
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == [ARTIFACTS]


def test_a_save_that_cannot_write_is_logged_not_raised(tmp_path, monkeypatch, caplog):
    fake_artifacts(monkeypatch, b"artifacts")
    (tmp_path / "k").write_text("a file where the entry's directory should be")
    cache = CompileCache("k", tmp_path)
    assert cache.save() == 0 and "not saved" in cache.stats.error and "not saved" in caplog.text


KILLED_WRITER = """
import os, pathlib, signal, sys
from ksbackend.compile_cache import write_atomic
os.replace = lambda src, dst: os.kill(os.getpid(), signal.SIGKILL)  # killed after writing, before the rename
write_atomic(pathlib.Path(sys.argv[1]), b"new" * 1_000_000)
"""


def test_a_killed_writer_leaves_no_partial_entry(tmp_path, monkeypatch):
    fake_artifacts(monkeypatch, b"old artifacts")
    CompileCache("k", tmp_path).save()
    file = tmp_path / "k" / ARTIFACTS
    old = file.read_bytes()
    done = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(file)], check=False, cwd=ROOT, timeout=120)
    assert done.returncode == -signal.SIGKILL
    assert file.read_bytes() == old  # the entry is the old one, whole
    temps = [p for p in file.parent.iterdir() if p.name.endswith(".tmp")]
    assert len(temps) == 1  # what the killed writer left: never read, and removed once stale
    os.utime(temps[0], (0, 0))
    fake_artifacts(monkeypatch, b"new artifacts")
    CompileCache("k", tmp_path).save()
    assert sorted(p.name for p in file.parent.iterdir()) == [ARTIFACTS]


# -- progress -----------------------------------------------------------------------------------------------
def test_progress_is_quiet_off_a_tty_unless_asked(monkeypatch, capsys):
    monkeypatch.delenv("KERNELSTACK_PROGRESS", raising=False)
    with progress(2, "kernelstack: compiling") as bar:
        bar.update()
    assert bar.disable and "compiling" not in capsys.readouterr().err
    monkeypatch.setenv("KERNELSTACK_PROGRESS", "1")
    with progress(2, "kernelstack: compiling") as bar:
        bar.update(2)
    assert "kernelstack: compiling" in capsys.readouterr().err
    with progress(2, "kernelstack: compiling", enabled=False) as bar:
        bar.update(2)
    assert "compiling" not in capsys.readouterr().err


# -- across processes ---------------------------------------------------------------------------------------
# One layer: what these processes check (a second process reuses the compile, an edited pass does not) does not
# depend on depth, and each layer costs every fresh process Dynamo and Inductor time. (The trace-cache scripts below
# keep two: with one, the patched rotate_half no longer changes HF's greedy tokens for these prompts.)
FIRST_GENERATE = """
import dataclasses, json
import ksbackend
from ksbackend.compile_cache import CompileCache
from ksbackend.models import build_model, left_pad, tiny_config

model = ksbackend.optimize(build_model(tiny_config("llama", num_hidden_layers=1)), trace_cache=False)
cache = CompileCache.for_model(model, model._kernelstack_engine.opts.graph_options())
ids, mask = left_pad([[5, 6, 7, 8, 9], [10, 11, 12]])
with cache:
    out = model.generate(ids, attention_mask=mask, max_new_tokens=4)
print(json.dumps({"stats": dataclasses.asdict(cache.stats), "tokens": out.tolist()}))
"""


def first_generate(tmp, inductor_dir, pythonpath=ROOT):
    """A fresh process: optimize a tiny Llama with the cache holding Inductor's artifacts only (Dynamo traces in
    every process) and run its first generate inside the cache; its stats."""
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp / inductor_dir), KERNELSTACK_CACHE_DIR=str(tmp / "ks"),
               KERNELSTACK_PROGRESS="0", PYTHONPATH=os.pathsep.join(map(str, [pythonpath, ROOT])))
    done = subprocess.run([sys.executable, "-c", FIRST_GENERATE], check=False, cwd=tmp, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def cold(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compile_cache")
    return tmp, first_generate(tmp, "inductor")


@pytest.mark.slow
def test_a_second_process_reuses_the_compile(cold):
    tmp, first = cold
    assert not first["stats"]["hit"] and first["stats"]["graphs_compiled"] >= 2 and first["stats"]["saved_bytes"] > 0
    second = first_generate(tmp, "inductor")  # same model and options, same machine
    stats = second["stats"]
    assert stats["key"] == first["stats"]["key"] and stats["hit"]
    assert stats["loaded_bytes"] == first["stats"]["saved_bytes"]
    assert stats["graphs_compiled"] == 0 and stats["graphs_from_cache"] == first["stats"]["graphs_compiled"]
    assert stats["compile_seconds"] < 0.75 * first["stats"]["compile_seconds"], (stats, first["stats"])
    assert second["tokens"] == first["tokens"]
    # The entry alone, into an empty Inductor directory (another machine, a wiped /tmp): Inductor finds every
    # graph's code in it (on CPU gcc still rebuilds the C++ kernels; on CUDA the entry carries the Triton binaries).
    elsewhere = first_generate(tmp, "empty_inductor")["stats"]
    assert elsewhere["hit"] and elsewhere["graphs_compiled"] == 0 and elsewhere["graphs_from_cache"] >= 2


def edited_passes(tmp):
    """A copy of ``passes/`` under ``tmp`` whose activation pass really changed (it fuses nothing), to put first on
    a process's path; its folder."""
    edited = tmp / "edited"
    shutil.copytree(ROOT / "passes", edited / "passes", ignore=shutil.ignore_patterns("__pycache__"))
    source = (edited / "passes" / "activation.py").read_text()
    changed, n = re.subn(r"(\n    def run\(self[^)]*\):\n)", r"\1        return  # edited: fuse nothing\n", source,
                         count=1)
    assert n == 1, "ActivationMulPass.run not found"
    (edited / "passes" / "activation.py").write_text(changed)
    return edited


@pytest.mark.slow
def test_editing_a_pass_source_invalidates_the_cache(cold):
    """A real edit of passes/activation.py (a copy first on the path): a new key, and Inductor compiles the
    graphs the edit changed instead of reusing the old code."""
    tmp, first = cold
    stats = first_generate(tmp, "inductor", pythonpath=edited_passes(tmp))["stats"]
    assert stats["key"] != first["stats"]["key"] and not stats["hit"] and stats["graphs_compiled"] >= 1
    old, new = (json.loads((tmp / "ks" / s["key"] / KEY_FILE).read_text())["passes"] for s in (first["stats"], stats))
    assert [p for p in old if p not in new] == [p for p in old if p[0] == "act_and_mul"]


# -- whole compiled functions (Dynamo's trace stored too) ---------------------------------------------------
def eager_backend(gm, example_inputs):
    return gm.forward  # nothing torch can serialize


def counted(fn, calls):
    def fallback(*args):
        calls.append(args)
        return fn(*args)

    return fallback


def test_dim_marks_are_dropped_on_an_alias_only():
    ids = torch.arange(6).reshape(1, 6)
    torch._dynamo.maybe_mark_dynamic(ids, 1)
    plain = compile_cache._unmarked(ids)
    assert plain is not ids and plain.data_ptr() == ids.data_ptr() and plain.stride() == ids.stride()
    assert not any(hasattr(plain, name) for name in compile_cache._DIM_MARKINGS)
    assert hasattr(ids, "_has_dynamo_dim_marking")
    unmarked = torch.ones(3)
    assert compile_cache._unmarked(unmarked) is unmarked and compile_cache._unmarked(3) == 3


def test_methods_of_other_objects_are_hidden_while_guards_are_saved():
    model = torch.nn.Linear(2, 2)
    engine = types.SimpleNamespace(generate=lambda: "engine")
    model.generate = types.MethodType(lambda self: "bound elsewhere", engine)
    model.own = types.MethodType(lambda self: "bound to the module", model)
    with compile_cache._foreign_methods_hidden(model):
        assert "generate" not in vars(model) and "own" in vars(model)
    assert model.generate() == "bound elsewhere"


@pytest.mark.parametrize("why", ["graph break", "backend result torch cannot serialize"])
def test_a_function_torch_cannot_store_runs_plain_torch_compile_and_is_not_retried(tmp_path, monkeypatch, why):
    if compile_cache.precompile_unavailable():
        pytest.skip(compile_cache.precompile_unavailable())
    model = torch.nn.Linear(4, 4)

    def forward(x):  # holds the model in its closure
        if why == "graph break":
            torch._dynamo.graph_break()
        return model(x)

    calls, x = [], torch.randn(2, 4)
    cache = CompileCache("k", tmp_path)
    fn = PrecompiledFunction(forward, eager_backend, cache, "forward", model, fallback=counted(forward, calls))
    assert torch.equal(fn(x), model(x)) and torch.equal(fn(x), model(x)) and len(calls) == 2
    assert "aot_compile failed" in cache.stats.precompile_off and "tracing not cached" in cache.describe()
    # the next process reads that from the entry and does not try again
    monkeypatch.setattr(PrecompiledFunction, "_compile", lambda self, args: pytest.fail("tried to aot_compile again"))
    later = CompileCache("k", tmp_path)
    fn = PrecompiledFunction(forward, eager_backend, later, "forward", model, fallback=counted(forward, calls))
    assert torch.equal(fn(x), model(x)) and len(calls) == 3 and later.stats.precompile_off == cache.stats.precompile_off


def test_plain_torch_compile_serving_a_model_with_hub_kernel_wrappers_compiles_once(tmp_path):
    """transformers wraps attention modules for hub kernels, and a stored function runs with those wrappers set
    aside. The fallback must not: each call would meet new forward objects, and Dynamo would compile every call."""
    if compile_cache.precompile_unavailable():
        pytest.skip(compile_cache.precompile_unavailable())
    model = build_model(tiny_config("llama"))
    assert compile_cache.hub_kernel_wrapped(model), "this transformers wraps no module: the test checks nothing"

    def forward(ids):
        return model(input_ids=ids).logits

    compiles = []

    def counting_backend(gm, example_inputs):
        compiles.append(gm)
        return gm.forward

    cache = CompileCache("k", tmp_path)
    fallback = torch.compile(forward, backend=counting_backend)
    fn = PrecompiledFunction(forward, eager_backend, cache, "forward", model, fallback=fallback)
    for _ in range(3):
        ids = torch.randint(3, 200, (2, 7))
        torch.testing.assert_close(fn(ids), forward(ids), rtol=0, atol=0)
    assert "aot_compile failed" in cache.stats.precompile_off and len(compiles) == 1


def test_running_out_of_memory_while_storing_is_not_remembered_for_later_processes(tmp_path):
    """Out of memory says something of this process (its pool, the GPU's other tenants), not of the function: plain
    torch.compile serves it here, and the entry records nothing that would stop the next process trying."""
    if compile_cache.precompile_unavailable():
        pytest.skip(compile_cache.precompile_unavailable())
    model = torch.nn.Linear(4, 4)

    def forward(x):
        return model(x)

    def out_of_memory(gm, example_inputs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    calls, x = [], torch.randn(2, 4)
    cache = CompileCache("k", tmp_path)
    fn = PrecompiledFunction(forward, out_of_memory, cache, "forward", model, fallback=counted(forward, calls))
    assert torch.equal(fn(x), model(x)) and torch.equal(fn(x), model(x)) and len(calls) == 2
    assert "out of memory" in cache.stats.precompile_off and not fn.file.exists()


def test_an_unreadable_precompiled_entry_is_ignored(tmp_path, caplog):
    if compile_cache.precompile_unavailable():
        pytest.skip(compile_cache.precompile_unavailable())
    model = torch.nn.Linear(4, 4)

    def forward(x):
        return model(x)

    cache = CompileCache("k", tmp_path)
    compile_cache.write_atomic(cache.path / compile_cache.PRECOMPILED.format("forward"), b"\x00garbage")
    calls, x = [], torch.randn(2, 4)
    fn = PrecompiledFunction(forward, eager_backend, cache, "forward", model, fallback=counted(forward, calls))
    assert torch.equal(fn(x), model(x)) and len(calls) == 1
    assert "ignored" in cache.stats.error and "ignored" in caplog.text


def test_a_function_reading_a_module_global_is_not_stored(tmp_path):
    if compile_cache.precompile_unavailable():
        pytest.skip(compile_cache.precompile_unavailable())
    cache = CompileCache("k", tmp_path)
    fn = PrecompiledFunction(module_global_forward, eager_backend, cache, "forward", GLOBAL_MODULE,
                             fallback=lambda x: x)
    assert "does not hold the model in its closure" in fn.off and fn(3) == 3 and not (tmp_path / "k").exists()


GLOBAL_MODULE = torch.nn.Linear(2, 2)


def module_global_forward(x):
    return GLOBAL_MODULE(x)


def test_no_cache_means_plain_torch_compile(tmp_path):
    model = torch.nn.Linear(4, 4)
    calls, x = [], torch.randn(2, 4)
    cache = CompileCache("k", tmp_path, enabled=False)
    fn = PrecompiledFunction(lambda t: model(t), eager_backend, cache, "forward", model,
                             fallback=counted(lambda t: model(t), calls))
    assert torch.equal(fn(x), model(x)) and len(calls) == 1 and not (tmp_path / "k").exists()


PRECOMPILED_FORWARD = """
import dataclasses, json, torch
from ksbackend import backend
from ksbackend.compile_cache import CompileCache, PrecompiledFunction, _dynamo_compile_seconds, hub_kernel_wrapped
from ksbackend.models import build_model, tiny_config
from ksbackend.ops.linear import adjacent_base

def forward_of(model):  # the model in the function's closure, as hf's forward_prefill holds it
    def forward(ids):
        return model(input_ids=ids, use_cache=False).logits
    return forward

model = build_model(tiny_config("llama"))
routed = len(hub_kernel_wrapped(model))  # transformers 5.2x with `kernels`: attention modules carry hub-kernel routing
forward = forward_of(model)
cache = CompileCache("precompiled")
fn = PrecompiledFunction(forward, backend.kernelstack_backend, cache, "forward", model)
sums = []
with torch.inference_mode(), cache:
    for rows, width in [(1, 5), (1, 9), (2, 5)]:  # the second fits the first's guards, the third does not
        ids = torch.arange(rows * width).reshape(rows, width) % 256
        torch._dynamo.maybe_mark_dynamic(ids, 1)
        sums.append(fn(ids).double().sum().item())
attn = model.model.layers[0].self_attn
print(json.dumps({"stats": dataclasses.asdict(cache.stats), "sums": sums, "entries": len(fn.entries),
                  "compile_seconds": _dynamo_compile_seconds(),
                  "executors": [g.executor for g in backend.GLOBAL.graphs],
                  "packed": adjacent_base([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]) is not None,
                  "routing": [routed, len(hub_kernel_wrapped(model)), "forward" in vars(attn)]}))
"""


def fresh_process(script, tmp, pythonpath=ROOT):
    """Run ``script`` in a new interpreter with its caches under ``tmp`` (the same ones on every call) and
    ``pythonpath`` first on its path; the JSON it printed last."""
    path = os.pathsep.join(filter(None, [str(pythonpath), str(ROOT), os.environ.get("PYTHONPATH")]))  # (FlashInfer)
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp / "inductor"), KERNELSTACK_CACHE_DIR=str(tmp / "ks"),
               KERNELSTACK_PROGRESS="0", PYTHONPATH=path)
    done = subprocess.run([sys.executable, "-c", script], check=False, cwd=tmp, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.slow
def test_a_second_process_loads_the_whole_compiled_function(tmp_path):
    """Dynamo's trace is stored with Inductor's graph: the next process traces nothing, lays the weights out as
    the backend did, reports the graphs, and computes the same logits."""
    if compile_cache.precompile_unavailable():
        pytest.skip(compile_cache.precompile_unavailable())
    first, second = fresh_process(PRECOMPILED_FORWARD, tmp_path), fresh_process(PRECOMPILED_FORWARD, tmp_path)
    assert first["entries"] == 2 and first["stats"]["graphs_precompiled"] == 0 and first["compile_seconds"] > 0
    assert first["stats"]["graphs_compiled"] == 2 and second["stats"]["graphs_compiled"] == 0
    assert first["packed"] and first["stats"]["precompile_off"] is None and len(first["executors"]) == 2
    assert second["entries"] == 2 and second["stats"]["graphs_precompiled"] == 2 and second["compile_seconds"] == 0
    assert second["packed"] and all("loaded whole" in e for e in second["executors"]) and len(second["executors"]) == 2
    assert second["sums"] == first["sums"] and "2 graphs loaded whole" in CacheStats(**second["stats"]).describe()
    # where transformers routes attention to hub kernels, the calls set that routing aside and put it back
    routed, routed_after, own_forward = second["routing"]
    assert routed_after == routed and not own_forward


TRACED_GENERATE = """
import dataclasses, json
import ksbackend
from ksbackend.models import build_model, left_pad, tiny_config

model = ksbackend.optimize(build_model(tiny_config("llama")))  # the default: traces stored too
ids, mask = left_pad([[5, 6, 7, 8, 9], [10, 11, 12]])
out = model.generate(ids, attention_mask=mask, max_new_tokens=4)
print(json.dumps({"stats": dataclasses.asdict(model._kernelstack_engine.compile_cache.stats), "tokens": out.tolist(),
                  "report": str(ksbackend.explain(model))}))
"""


@pytest.fixture(scope="module")
def traced_cold(tmp_path_factory):
    """The cold process both trace-cache tests start from (HF eager's tokens, then ``optimize(model)``, whose
    compile cache stores the traces of prefill and decode by default); each test runs its later processes on a
    copy of these caches, so neither sees what the other's processes stored."""
    if compile_cache.precompile_unavailable():
        pytest.skip(compile_cache.precompile_unavailable())
    tmp = tmp_path_factory.mktemp("traced_cold")
    return tmp, fresh_process(TRACED_CHANGED.replace("sys.argv[1]", "'none'"), tmp)


def from_cold(traced_cold, tmp_path):
    """A copy of the cold process's caches (Inductor's and kernelstack's) in ``tmp_path``; its result."""
    cold_tmp, cold = traced_cold
    shutil.copytree(cold_tmp, tmp_path, dirs_exist_ok=True)
    return cold


@pytest.mark.slow
def test_trace_cache_lets_a_second_process_generate_without_tracing(tmp_path, traced_cold):
    """``optimize(model)`` with its default trace cache, end to end: the second process loads prefill and decode
    whole, compiles nothing, says so in the explain report, and generates the same tokens."""
    first = from_cold(traced_cold, tmp_path)
    second = fresh_process(TRACED_GENERATE, tmp_path)
    assert first["same"] and first["stats"]["graphs_compiled"] == 2
    assert first["stats"]["graphs_precompiled"] == 0 and first["stats"]["precompile_off"] is None
    assert second["stats"]["graphs_precompiled"] == 2 and second["stats"]["graphs_compiled"] == 0
    assert "loaded whole from the compile cache" in second["report"] and "kernelstack::act_and_mul" in second["report"]
    assert second["tokens"] == first["tokens"]


@pytest.mark.slow
def test_a_process_with_other_runtime_options_loads_the_stored_traces(tmp_path, traced_cold):
    """Options only the runtime reads, all changed (a small pool, two rows, 8-token prefill steps, the reference
    attention): the same entry, both graphs loaded whole, nothing compiled, and the cold process's tokens. (Both
    prompts still prefill in one step: a batch-1 decode step would need an entry of its own, see R12.)"""
    first = from_cold(traced_cold, tmp_path)
    options = ", ".join(f"{k}={v!r}" for k, v in RUNTIME_CHANGES.items())
    script = TRACED_GENERATE.replace('tiny_config("llama")))', f'tiny_config("llama")), {options})')
    assert script != TRACED_GENERATE
    second = fresh_process(script, tmp_path)
    assert second["stats"]["key"] == first["stats"]["key"] and second["stats"]["graphs_compiled"] == 0
    assert second["stats"]["graphs_precompiled"] == 2 and second["tokens"] == first["tokens"]


@pytest.mark.slow
def test_editing_a_pass_source_leaves_the_stored_traces_unused(tmp_path, traced_cold):
    """The default mode too: a process whose pass source changed has a new key, traces and compiles its graphs,
    and never loads the traces stored under the old source."""
    first = from_cold(traced_cold, tmp_path)
    second = fresh_process(TRACED_GENERATE, tmp_path, pythonpath=edited_passes(tmp_path))
    assert second["stats"]["key"] != first["stats"]["key"] and not second["stats"]["hit"]
    assert second["stats"]["graphs_precompiled"] == 0 and second["stats"]["graphs_compiled"] == 2
    assert re.search(r"pass act_and_mul +matched 0,", second["report"]) and "loaded whole" not in second["report"]


TRACED_CHANGED = """
import json, sys, torch
import ksbackend
from transformers.models.llama import modeling_llama
from ksbackend.models import build_model, left_pad, tiny_config

change = sys.argv[1]
model = build_model(tiny_config("llama"))
ids, mask = left_pad([[5, 6, 7, 8, 9], [10, 11, 12]])
greedy = dict(attention_mask=mask, max_new_tokens=4, do_sample=False)
original_rotate_half, original_mlp_forward = modeling_llama.rotate_half, modeling_llama.LlamaMLP.forward

def rotate_half_the_other_way(x):  # what a kernel library's patch might get wrong: every rotated logit moves
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x2, -x1), dim=-1)

def apply(change):
    if change in ("rotate_half", "after"):
        modeling_llama.rotate_half = rotate_half_the_other_way
    if change == "hook":
        model.model.layers[0].mlp.register_forward_hook(lambda module, args, out: out * 3)
    if change == "class_forward":
        modeling_llama.LlamaMLP.forward = lambda self, x: original_mlp_forward(self, x) * 3

unchanged = model.generate(ids, **greedy).tolist()  # HF eager
if change == "after":  # HF eager with the patch a later call will see, then the patch taken back
    apply(change)
    expected_after = model.generate(ids, **greedy).tolist()
    modeling_llama.rotate_half = original_rotate_half
else:
    apply(change)
expected = model.generate(ids, **greedy).tolist()
ksbackend.optimize(model)
out = model.generate(ids, **greedy).tolist()
result = {"same": out == expected, "changes_hf": expected != unchanged, "tokens": out,
          "stats": vars(model._kernelstack_engine.compile_cache.stats)}
if change == "after":  # patched after this process loaded (or compiled) the trace
    apply(change)
    stats = model._kernelstack_engine.compile_cache.stats
    result.update(same_after=model.generate(ids, **greedy).tolist() == expected_after,
                  changes_hf=expected_after != unchanged, off=stats.precompile_off)
print(json.dumps(result, default=str))
"""


@pytest.mark.slow
def test_trace_cache_never_runs_a_stale_trace_after_a_patch_or_a_hook(tmp_path, traced_cold):
    """What a stored trace's saved guards cannot check: a patched module function (as kernel libraries patch
    ``rotate_half``), a hook, a patched class method. A process with any of them, or one that patches after loading,
    generates HF eager's tokens for the model as it is, never the stored trace's."""
    cold = from_cold(traced_cold, tmp_path)
    assert cold["same"] and cold["stats"]["precompile_off"] is None
    for change in ("rotate_half", "hook", "class_forward", "after"):
        r = fresh_process(TRACED_CHANGED.replace("sys.argv[1]", repr(change)), tmp_path)
        assert r["changes_hf"], f"{change}: the change must change HF's tokens for this test to mean anything"
        assert r["same"], change
        if change == "after":  # it loaded the stored trace, then served the patched call with full guards
            assert r["stats"]["graphs_precompiled"] == 2 and r["same_after"] and "changed since the trace" in r["off"]
        else:  # nothing stale was loaded
            assert r["stats"]["graphs_precompiled"] == 0, change


def test_the_compile_cache_off_stores_no_trace_and_no_entry(tmp_path, monkeypatch):
    """``compile_cache=False`` turns the trace cache off with it (its default is on): no trace, no entry."""
    from ksbackend.models import left_pad

    assert RuntimeOptions().trace_cache and not RuntimeOptions.from_options({"compile_cache": False}).compile_cache
    monkeypatch.setenv("KERNELSTACK_CACHE_DIR", str(tmp_path))
    model = build_model(tiny_config("llama", num_hidden_layers=1))
    ids, mask = left_pad([torch.randint(3, 200, (n,)).tolist() for n in (6, 3)])
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    ksbackend.optimize(model, compile_cache=False)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False), expected)
    assert list(tmp_path.iterdir()) == [] and model._kernelstack_engine.compile_cache.stats.graphs_precompiled == 0
