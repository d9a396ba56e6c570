"""The compile cache: what invalidates its key, that a second process reuses the first one's compile (and that
an edited pass does not), and that a broken or half-written entry is never used."""

import dataclasses
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

import passes
from ksbackend import compile_cache
from ksbackend.compile_cache import ARTIFACTS, KEY_FILE, CompileCache, cache_key, model_signature, progress
from ksbackend.config import RuntimeOptions
from ksbackend.models import build_model, tiny_config

ROOT = Path(__file__).resolve().parent.parent


def key_for(config=None, dtype=torch.float32, **options):
    model = build_model(config or tiny_config("llama"), dtype=dtype)
    return cache_key(model_signature(model), dataclasses.asdict(RuntimeOptions.from_options(options)))


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
            key_for(backend_options={"extra_passes": [fuse_nothing_either]})}
    assert len(keys) == 5


def test_key_changes_with_model_config_and_versions(monkeypatch):
    keys = {key_for(), key_for(tiny_config("llama", hidden_size=128)), key_for(tiny_config("llama", num_hidden_layers=3)),
            key_for(tiny_config("qwen2")), key_for(dtype=torch.bfloat16)}
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
    assert not cache.stats.hit and cache.stats.error is None and cache.describe().startswith(f"compile cache {cache.path}: miss;")


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
FIRST_GENERATE = """
import dataclasses, json
import ksbackend
from ksbackend.compile_cache import CompileCache
from ksbackend.models import build_model, left_pad, tiny_config

model = ksbackend.optimize(build_model(tiny_config("llama")))
cache = CompileCache.for_model(model, dataclasses.asdict(model._kernelstack_engine.opts))
ids, mask = left_pad([[5, 6, 7, 8, 9], [10, 11, 12]])
with cache:
    out = model.generate(ids, attention_mask=mask, max_new_tokens=4)
print(json.dumps({"stats": dataclasses.asdict(cache.stats), "tokens": out.tolist()}))
"""


def first_generate(tmp, inductor_dir, pythonpath=ROOT):
    """A fresh process: optimize a tiny Llama and run its first generate inside the cache; its stats."""
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
    assert stats["key"] == first["stats"]["key"] and stats["hit"] and stats["loaded_bytes"] == first["stats"]["saved_bytes"]
    assert stats["graphs_compiled"] == 0 and stats["graphs_from_cache"] == first["stats"]["graphs_compiled"]
    assert stats["compile_seconds"] < 0.75 * first["stats"]["compile_seconds"], (stats, first["stats"])
    assert second["tokens"] == first["tokens"]
    # The entry alone, into an empty Inductor directory (another machine, a wiped /tmp): Inductor finds every
    # graph's code in it (on CPU gcc still rebuilds the C++ kernels; on CUDA the entry carries the Triton binaries).
    elsewhere = first_generate(tmp, "empty_inductor")["stats"]
    assert elsewhere["hit"] and elsewhere["graphs_compiled"] == 0 and elsewhere["graphs_from_cache"] >= 2


@pytest.mark.slow
def test_editing_a_pass_source_invalidates_the_cache(cold):
    """A real edit of passes/activation.py (a copy first on the path): a new key, and Inductor compiles the
    graphs the edit changed instead of reusing the old code."""
    tmp, first = cold
    edited = tmp / "edited"
    shutil.copytree(ROOT / "passes", edited / "passes", ignore=shutil.ignore_patterns("__pycache__"))
    source = (edited / "passes" / "activation.py").read_text()
    changed, n = re.subn(r"(\n    def run\(self[^)]*\):\n)", r"\1        return  # edited: fuse nothing\n", source, count=1)
    assert n == 1, "ActivationMulPass.run not found"
    (edited / "passes" / "activation.py").write_text(changed)

    stats = first_generate(tmp, "inductor", pythonpath=edited)["stats"]
    assert stats["key"] != first["stats"]["key"] and not stats["hit"] and stats["graphs_compiled"] >= 1
    old, new = (json.loads((tmp / "ks" / s["key"] / KEY_FILE).read_text())["passes"] for s in (first["stats"], stats))
    assert [p for p in old if p not in new] == [p for p in old if p[0] == "act_and_mul"]
