"""A compile cache across processes: a second process that compiles the same model with the same options
loads the first one's Inductor work instead of redoing it.

Inductor already keeps on-disk caches (FX graph, AOTAutograd, autotune, compiled C++/Triton kernels) under
``TORCHINDUCTOR_CACHE_DIR``, keyed on the graph kernelstack hands it, so after the passes: a pass edit that
changes the rewrite misses there by itself. What Inductor does not give is an entry that survives a wiped or
fresh Inductor directory, is scoped to one model + options + pass sources + versions, and says what it did.
``CompileCache`` adds that: PyTorch's portable cache artifacts (``torch.compiler.save_cache_artifacts``) in
one file under ``~/.cache/kernelstack/<key>/``, loaded before the first compile and saved after it.

Those artifacts still leave Dynamo's tracing (bytecode analysis, fake-tensor propagation: about half of a warm
start), the passes and AOTAutograd's cache lookup to every process. ``PrecompiledFunction`` skips them too: it
compiles a function with Dynamo's ahead-of-time API (``torch.compile(...).aot_compile``: one full graph, its
guards and its Inductor code, serializable) and stores that in the entry as ``<name>.dynamo``; a later process
loads it, checks its guards on each call and runs it, tracing nothing. A call its guards reject compiles (and
stores) one more; whatever the API cannot serve falls back to plain ``torch.compile``.

    cache = CompileCache.for_model(model, opts.graph_options())
    prefill = PrecompiledFunction(forward_prefill, backend, cache, "prefill", model)
    with cache, progress(2, "kernelstack: compiling") as bar:
        ...  # the first generate: prefill and decode are loaded (or compiled) here
    print(cache.describe())
"""

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import os
import pickle
import sys
import tempfile
import threading
import time

from pathlib import Path

import torch

from tqdm import tqdm

log = logging.getLogger("ksbackend")

ARTIFACTS = "artifacts.bin"  # PyTorch's cache artifacts, behind a header that lets a reader prove them whole
KEY_FILE = "key.json"  # what went into the key, to diff when an entry is not reused
GEMM_FILE = "gemm_choices.json"  # the small-M GEMM winners measured on this GPU model (kernels.small_m_linear)
_MAGIC = b"kernelstack-compile-cache-1\n"
_ARTIFACT_KINDS = ("inductor", "autotune", "aot_autograd", "pgo", "precompile")
_STALE_TEMP_SECONDS = 3600  # a temp file this old was left by a killed writer
PRECOMPILED = "{}.dynamo"  # a PrecompiledFunction's compiled entries (Dynamo's code and guards, Inductor's graph)
PRECOMPILE_LIMIT = 8  # entries (guard sets) per function, as Dynamo's own recompile limit
_PRECOMPILE_FORMAT = 2  # 2: each entry stores the namespaces its trace read
# What Dynamo records on a tensor that mark_dynamic / maybe_mark_dynamic marked. A serialized guard set loses
# the compile-time markings (its tensors come back as plain meta tensors) and then rejects any marked tensor.
_DIM_MARKINGS = ("_has_dynamo_dim_marking", "_dynamo_dynamic_indices", "_dynamo_weak_dynamic_indices",
                 "_dynamo_unbacked_indices", "_dynamo_strict_unbacked_indices", "_dynamo_static_indices")


# -- the key ------------------------------------------------------------------------------------------------
def model_signature(model) -> dict:
    """What of a model shapes its compiled graphs: its config, dtype and device (with the GPU's model), and its
    module tree as code sees it (classes, methods, hooks: what a stored trace's guards no longer check)."""
    from .traced_state import module_tree

    device = next(model.parameters()).device
    signature = {"config": model.config.to_dict(), "dtype": str(model.dtype), "device": device.type,
                 "module_tree": module_tree(model)}
    if device.type == "cuda":
        signature["gpu"] = [torch.cuda.get_device_name(device), list(torch.cuda.get_device_capability(device))]
    return signature


def key_inputs(model_config: dict, options: dict) -> dict:
    """Everything the key hashes: a change in any of it gives a new entry."""
    import passes

    from .kernels import gemv_prologue_enabled

    return {
        "model": model_config,
        "options": options,
        "passes": [[p.name, p.source_hash()] for p in passes.DEFAULT_PASSES],
        "switches": {"gemv_prologue": gemv_prologue_enabled()},  # environment that changes what a pass rewrites
        "source": _source_digest(),
        "versions": _versions(),
    }


def cache_key(model_config: dict, options: dict) -> str:
    """Hash of the model config, kernelstack options, every pass's source, kernelstack's own source and the
    versions of kernelstack, Python, torch, triton and transformers."""
    return _hash_key(key_inputs(model_config, options))


def _hash_key(inputs: dict) -> str:
    return hashlib.sha256(_canonical(inputs).encode()).hexdigest()[:32]


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True, default=_jsonable)


def _jsonable(value):
    """Passes (``extra_passes``) by name and source hash; dtypes and devices by name; anything else by repr
    (a repr with an address gives an entry per process: never reused, never wrong)."""
    import passes

    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    if isinstance(value, (set, frozenset)):
        return sorted(map(_canonical, value))
    if isinstance(value, passes.GraphPass) or callable(value):
        graph_pass = passes.as_pass(value)
        return ["pass", graph_pass.name, graph_pass.source_hash()]
    return repr(value)


def _source_digest() -> str:
    """kernelstack's own source (ops schemas, backend, runtime): an editable install keeps its version on edits."""
    import passes

    digest = hashlib.sha256()
    for package in (Path(__file__).parent, Path(passes.__file__).parent):
        for path in sorted(package.rglob("*.py")):
            digest.update(f"{package.name}/{path.relative_to(package)}\0".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _versions() -> dict:
    versions = {"python": "{}.{}".format(*sys.version_info[:2]), "torch": torch.__version__, "cuda": torch.version.cuda}
    for name, dists in {"kernelstack": ["kernelstack"], "transformers": ["transformers"],
                        "triton": ["triton", "pytorch-triton"]}.items():
        versions[name] = next((v for v in map(_dist_version, dists) if v), None)
    return versions


def _dist_version(dist: str):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def cache_root(directory=None) -> Path:
    """Where entries live: ``directory``, else ``$KERNELSTACK_CACHE_DIR``, else ``~/.cache/kernelstack``."""
    if directory:
        return Path(directory).expanduser()
    if os.environ.get("KERNELSTACK_CACHE_DIR"):
        return Path(os.environ["KERNELSTACK_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kernelstack"


# -- files --------------------------------------------------------------------------------------------------
def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temp file beside ``path``, then rename it over ``path``: a reader (or a process
    killed mid-write) sees the old file or the new one, never part of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(temp, 0o644)  # mkstemp's 0600 would hide a shared cache directory from its other users
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def _pack(payload: bytes) -> bytes:
    return _MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload


def _unpack(data: bytes) -> bytes:
    """The payload, or ValueError if the file is not one whole entry (truncated, overwritten, foreign)."""
    if not data.startswith(_MAGIC):
        raise ValueError("not a kernelstack compile cache file")
    digest, _, payload = data[len(_MAGIC):].partition(b"\n")
    if hashlib.sha256(payload).hexdigest().encode() != digest:
        raise ValueError("checksum mismatch (truncated or corrupt)")
    return payload


def _remove_stale_temps(directory: Path) -> None:
    for temp in directory.glob(".*.tmp"):
        with contextlib.suppress(OSError):
            if time.time() - temp.stat().st_mtime > _STALE_TEMP_SECONDS:
                temp.unlink()


# -- the cache ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class CacheStats:
    """What the cache did, for the explain report."""

    key: str
    directory: str
    enabled: bool = True
    hit: bool = False  # an entry was found and loaded
    loaded_bytes: int = 0
    saved_bytes: int = 0
    load_seconds: float = 0.0
    save_seconds: float = 0.0
    compile_seconds: float = 0.0  # Dynamo's compile time (tracing, passes, Inductor) inside the blocks
    wall_seconds: float = 0.0  # the blocks' wall time (compiling plus running)
    graphs_from_cache: int = 0  # Inductor graphs whose compiled code was loaded (FX graph cache hits)
    graphs_compiled: int = 0  # Inductor graphs compiled from scratch (misses)
    graphs_uncacheable: int = 0  # Inductor graphs its cache refused (bypassed): compiled in every process
    graphs_precompiled: int = 0  # graphs loaded whole (Dynamo's code and guards too): nothing traced
    precompile_seconds: float = 0.0  # loading those
    precompile_off: str | None = None  # why a PrecompiledFunction falls back to tracing in every process
    gemm_choices_loaded: int = 0  # small-M GEMM shapes whose measured winner came from the entry (not re-timed)
    error: str | None = None  # why an entry was ignored or not saved

    def describe(self) -> str:
        entry = ("off" if not self.enabled
                 else f"hit ({self.loaded_bytes / 2**20:.1f} MiB loaded in {self.load_seconds:.2f} s)" if self.hit
                 else "hit" if self.graphs_precompiled
                 else f"miss ({self.error})" if self.error else "miss")
        saved = f", {self.saved_bytes / 2**20:.1f} MiB saved in {self.save_seconds:.2f} s" if self.saved_bytes else ""
        bypassed = f", {self.graphs_uncacheable} not cacheable" if self.graphs_uncacheable else ""
        whole = (f"{self.graphs_precompiled} graphs loaded whole (not traced) in {self.precompile_seconds:.1f} s, "
                 if self.graphs_precompiled else "")
        off = f"; tracing not cached ({self.precompile_off})" if self.precompile_off else ""
        gemm = f"; {self.gemm_choices_loaded} GEMM choices loaded (not timed again)" if self.gemm_choices_loaded else ""
        return (f"compile cache {self.directory}: {entry}{saved}; {whole}{self.graphs_from_cache} graphs from "
                f"Inductor's cache, {self.graphs_compiled} compiled{bypassed}; compiling {self.compile_seconds:.1f} s "
                f"of {self.wall_seconds:.1f} s{off}{gemm}")


def _artifact_keys(info) -> frozenset:
    """The (kind, key) pairs of a ``CacheInfo`` (its ``<kind>_artifacts`` lists exist in torch 2.11 and 2.13)."""
    return frozenset((kind, key) for kind in _ARTIFACT_KINDS for key in getattr(info, f"{kind}_artifacts", ()))


def _inductor_counts() -> tuple[int, int, int]:
    counts = torch._dynamo.utils.counters["inductor"]
    return counts["fxgraph_cache_hit"], counts["fxgraph_cache_miss"], counts["fxgraph_cache_bypass"]


def _dynamo_compile_seconds() -> float:
    """Dynamo's compiles (``torch.compile``'s, plus ``aot_compile``'s whole capture and backend compile)."""
    metrics = torch._dynamo.utils.compilation_time_metrics
    return sum(sum(metrics.get(name, ())) for name in ("_compile.compile_inner", "fullgraph_capture"))


def _choice_shape(entry) -> tuple:
    """(M, N, K, dtype, bias) of one stored GEMM choice."""
    return tuple(entry[:5])


class CompileCache:
    """``with cache:`` around the calls that compile: the first block loads the stored artifacts, and each
    block that compiled a graph saves them (atomically). An unreadable entry is logged and ignored; a cache
    that cannot be written is logged; neither stops the model."""

    def __init__(self, key: str, directory=None, enabled: bool = True, description: dict | None = None,
                 device: torch.device | None = None):
        """``description``: what went into the key, written beside the artifacts as key.json. ``device``: a CUDA
        device whose small-M GEMM choices the entry keeps (each is ~0.3 s of timing that a later process skips)."""
        self.path = cache_root(directory) / key
        self.description = description
        self.device = device if device is not None and device.type == "cuda" else None
        self._gemm_stored = set()  # shapes whose choice the entry's file holds, as far as this process knows
        self.stats = CacheStats(key=key, directory=str(self.path), enabled=enabled)
        self._loaded = not enabled
        self._stored = frozenset()  # the artifacts the entry on disk holds, as far as this process knows

    @classmethod
    def for_model(cls, model, options: dict, directory=None, enabled: bool = True) -> "CompileCache":
        inputs = key_inputs(model_signature(model), options)
        return cls(_hash_key(inputs), directory, enabled, description=inputs, device=next(model.parameters()).device)

    def describe(self) -> str:
        return self.stats.describe()

    def load(self) -> bool:
        """Load the entry's artifacts into PyTorch's caches; False (and a log line) if there is none usable."""
        self._loaded = True
        self._load_gemm_choices()
        file = self.path / ARTIFACTS
        start = time.perf_counter()
        try:
            payload = _unpack(file.read_bytes())
            info = torch.compiler.load_cache_artifacts(payload)
            if info is None:
                raise ValueError("torch could not read the artifacts")
        except FileNotFoundError:
            return False
        except Exception as exc:  # noqa: BLE001 - an unusable entry costs a compile, never the model
            self.stats.error = f"ignored {file}: {type(exc).__name__}: {exc}"
            log.warning("kernelstack compile cache: %s", self.stats.error)
            return False
        self._stored = _artifact_keys(info)
        self.stats.hit, self.stats.loaded_bytes = True, len(payload)
        self.stats.load_seconds = time.perf_counter() - start
        log.info("kernelstack compile cache: loaded %d bytes from %s in %.2f s", len(payload), file,
                 self.stats.load_seconds)
        return True

    def save(self) -> int:
        """Store every artifact this process has compiled or loaded (PyTorch keeps one cumulative list); returns
        the bytes written, 0 when the entry already holds them all."""
        start = time.perf_counter()
        result = torch.compiler.save_cache_artifacts()
        keys = _artifact_keys(result[1]) if result is not None else frozenset()
        if result is None or (keys and keys <= self._stored):
            return 0
        payload = result[0]
        try:
            write_atomic(self.path / ARTIFACTS, _pack(payload))
            if self.description is not None:
                write_atomic(self.path / KEY_FILE, json.dumps(self.description, sort_keys=True, indent=1,
                                                              default=_jsonable).encode())
            _remove_stale_temps(self.path)
        except OSError as exc:
            self.stats.error = f"not saved to {self.path}: {exc}"
            log.warning("kernelstack compile cache: %s", self.stats.error)
            return 0
        self._stored = keys
        self.stats.saved_bytes += len(payload)
        self.stats.save_seconds += time.perf_counter() - start
        log.info("kernelstack compile cache: saved %d bytes to %s", len(payload), self.path)
        return len(payload)

    def _load_gemm_choices(self) -> None:
        if self.device is None:
            return
        from .backend import record_event
        from .kernels.small_m_linear import SHAPE_CHOICES

        file = self.path / GEMM_FILE
        try:
            entries = json.loads(_unpack(file.read_bytes()))
            adopted = SHAPE_CHOICES.seed(entries, self.device.index)
        except FileNotFoundError:
            return
        except Exception as exc:  # noqa: BLE001 - an unusable file costs the timing, never the model
            log.warning("kernelstack compile cache: ignored %s: %s: %s", file, type(exc).__name__, exc)
            return
        self.stats.gemm_choices_loaded = len(adopted)
        self._gemm_stored = {_choice_shape(entry) for entry in entries}
        for key in adopted:
            record_event(f"linear {SHAPE_CHOICES.describe(key)} (measured by an earlier process)")

    def _save_gemm_choices(self) -> None:
        """Store this device's choices when there are more than the file holds (they only ever grow)."""
        if self.device is None:
            return
        from .kernels.small_m_linear import SHAPE_CHOICES

        entries = SHAPE_CHOICES.export(self.device.index)
        shapes = {_choice_shape(entry) for entry in entries}
        if shapes <= self._gemm_stored:
            return
        try:
            write_atomic(self.path / GEMM_FILE, _pack(json.dumps(entries).encode()))
        except OSError as exc:
            log.warning("kernelstack compile cache: GEMM choices not saved to %s: %s", self.path, exc)
            return
        self._gemm_stored = shapes

    def __enter__(self):
        if not self._loaded:
            self.load()
        self._start = (time.perf_counter(), _dynamo_compile_seconds(), _inductor_counts())
        return self

    def __exit__(self, exc_type, exc, tb):
        wall, compile_seconds, counts = self._start
        hits, misses, bypasses = (max(0, now - then) for now, then in zip(_inductor_counts(), counts))
        self.stats.wall_seconds += time.perf_counter() - wall
        self.stats.compile_seconds += max(0.0, _dynamo_compile_seconds() - compile_seconds)
        self.stats.graphs_from_cache += hits
        self.stats.graphs_compiled += misses
        self.stats.graphs_uncacheable += bypasses
        if self.stats.enabled and exc_type is None:
            if hits + misses:
                self.save()
            self._save_gemm_choices()
        return False


# -- whole compiled functions ------------------------------------------------------------------------------
try:  # torch 2.11 and 2.13 have the ahead-of-time API
    from torch._dynamo.aot_compile_types import BundledAOTAutogradSerializableCallable as _Bundled
    from torch._dynamo.aot_compile_types import SerializableCallable as _SerializableCallable
except ImportError:
    _Bundled = _SerializableCallable = None

if _SerializableCallable is not None:
    class _InductorOutput(_SerializableCallable):
        """What ``compile_fx`` returned to the backend, in the form ``aot_compile`` stores. torch 2.13 wraps any
        result that can serialize itself; torch 2.11 only its own Inductor backend's, and refuses the rest."""

        def __init__(self, compiled):
            self.bundled = _Bundled(compiled)

        @classmethod
        def serialize_compile_artifacts(cls, fn) -> bytes:
            return _Bundled.serialize_compile_artifacts(fn.bundled)

        @classmethod
        def deserialize_compile_artifacts(cls, data: bytes):
            return _Bundled.deserialize_compile_artifacts(data)

        def __call__(self, *args, **kwargs):
            return self.bundled(*args, **kwargs)


def _storable(backend):
    """``backend`` with its result wrapped for ``aot_compile`` when it can serialize itself (Inductor's can; the
    FX executor's cannot, and aot_compile then refuses it)."""

    def compile_for_storage(gm, example_inputs):
        compiled = backend(gm, example_inputs)
        if _SerializableCallable is not None and getattr(compiled, "serialize", None) is not None:
            return _InductorOutput(compiled)
        return compiled

    return compile_for_storage


def precompile_unavailable() -> str | None:
    """Why this torch cannot store a traced function (None when it can): it lacks the ahead-of-time API,
    ``torch._dynamo.aot_compile`` (torch 2.11 and 2.13 have it; 2.11 behind ``enable_aot_compile``)."""
    try:
        from torch._dynamo.aot_compile import AOTCompiledFunction
    except ImportError:
        return f"torch {torch.__version__} has no torch._dynamo.aot_compile"
    missing = [name for name in ("serialize", "deserialize", "guard_check") if not hasattr(AOTCompiledFunction, name)]
    return f"torch {torch.__version__}'s AOTCompiledFunction lacks {', '.join(missing)}" if missing else None


def _serializable_guards(guards) -> list:
    """Dynamo's guards a stored function keeps: those on its arguments and closure (tensor shapes, strides,
    dtypes, dispatch keys, dynamic-shape relations, the values of config attributes it read), not those on
    object identity or on module globals, which have no meaning in another process. The key (model config,
    every source file, versions) stands in for what is dropped."""
    from torch._dynamo.guards import CheckFunctionManager

    unsupported = set(CheckFunctionManager.UNSUPPORTED_SERIALIZATION_GUARD_TYPES)
    return [not (g.is_global or g.guard_type in unsupported or unsupported.intersection(g.derived_guard_types or ()))
            for g in guards]


def _of_this_process(exc: Exception) -> bool:
    """Whether a failed store says something of this process only (out of memory: a larger KV pool, another
    model on the GPU), not of the function: later processes, whatever their pool, should try again."""
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc)


def _unmarked(value):
    """``value``, or for a tensor that mark_dynamic marked, an alias without the marks (see ``_DIM_MARKINGS``)."""
    if isinstance(value, torch.Tensor) and any(hasattr(value, name) for name in _DIM_MARKINGS):
        return value.view(value.shape)
    return value


@contextlib.contextmanager
def _foreign_methods_hidden(model):
    """Take methods of non-module objects (``optimize``'s ``model.generate``) off the model while Dynamo saves
    its guards: it pickles the guarded model's attributes, and such a method would drag in its whole object."""
    hidden = {name: value for name, value in vars(model).items()
              if hasattr(value, "__self__") and callable(value) and not isinstance(value.__self__, torch.nn.Module)}
    for name in hidden:
        delattr(model, name)
    try:
        yield
    finally:
        for name, value in hidden.items():
            setattr(model, name, value)


def hub_kernel_wrapped(model) -> list:
    """The modules of ``model`` that ``kernels.use_kernelized_func`` wrapped: transformers (5.2x, with the
    ``kernels`` package it depends on) decorates attention with it. Each holds private wrappers of a class defined
    in a function body, which torch cannot store ("defined in local scope"), and its forward only routes calls to
    them."""
    return [m for m in model.modules() if "_kernel_funcs" in vars(m) and hasattr(type(m).forward, "__wrapped__")]


class _UnwrappedForward:
    """A wrapped module's forward without the hub-kernel routing: the function ``kernels.use_kernelized_func``
    wrapped. An instance (not a bound method) because Dynamo pickles the module for its guards, and a bound
    method would come back as the class's wrapped forward."""

    def __init__(self, module):
        self.module = module

    def __call__(self, *args, **kwargs):
        return type(self.module).forward.__wrapped__(self.module, *args, **kwargs)


@contextlib.contextmanager
def _hub_kernel_wrappers_off(modules):
    """``modules`` (from ``hub_kernel_wrapped``) as plain modules: their private wrappers set aside and their
    forward unwrapped, which calls the same functions while nothing is kernelized. A stored function is traced,
    stored, loaded, guard-checked and run this way in every process, so its guards always meet the modules as
    they were traced; nested uses change nothing."""
    hidden = [(m, m.__dict__.pop("_kernel_funcs"), m.__dict__.pop("forward", None)) for m in modules
              if "_kernel_funcs" in vars(m)]
    for m, _, _ in hidden:
        m.forward = _UnwrappedForward(m)
    try:
        yield
    finally:
        for m, funcs, own_forward in hidden:
            del m.forward
            if own_forward is not None:
                m.forward = own_forward
            m._kernel_funcs = funcs


def _unstorable(fn, model) -> str | None:
    """Why ``fn``'s module cannot be handed back on load (None when it can): it must reach ``model`` through its
    closure, and no other module (a module global's guards are dropped, and would not load)."""
    cells = [c.cell_contents for c in fn.__closure__ or ()]
    globals_ = [fn.__globals__.get(name) for name in fn.__code__.co_names]
    if not any(value is model for value in cells):
        return f"{fn.__qualname__} does not hold the model in its closure"
    others = [value for value in cells + globals_ if isinstance(value, torch.nn.Module) and value is not model]
    return f"{fn.__qualname__} reads other modules ({type(others[0]).__name__})" if others else None


@dataclasses.dataclass
class _Entry:
    function: object  # torch._dynamo.aot_compile.AOTCompiledFunction; None: stored, but not for this process
    stored: dict  # what the file holds of it: serialized function, packed weight names, graph reports
    reports: list  # graph reports not yet recorded in this process (recorded when the entry first runs)
    modules: list  # the Python modules its trace read (traced_state.traced_modules)


class PrecompiledFunction:
    """``torch.compile(fn, backend=backend)`` whose compiled form lives in ``cache``'s entry as well:
    Dynamo's transformed bytecode and guards and the backend's Inductor graph, as ``<name>.dynamo``. A call
    runs the first stored entry whose guards accept it; the first process compiles (and stores) an entry per
    guard set, later ones load them and trace nothing. ``model`` is ``fn``'s one closure module (stored by
    reference, given back on load). Anything the ahead-of-time API refuses (a graph break, a backend result it
    cannot serialize, a guard it cannot save) runs ``fallback`` (plain ``torch.compile``) from then on, and
    the entry records that so later processes do not try again; ``unstorable``, a reason known up front, skips
    the attempt (it would compile every graph twice)."""

    def __init__(self, fn, backend, cache: CompileCache, name: str, model, fallback=None, limit=PRECOMPILE_LIMIT,
                 unstorable: str | None = None):
        self.fn, self.backend, self.cache, self.name, self.model, self.limit = fn, backend, cache, name, model, limit
        self.fallback = fallback if fallback is not None else torch.compile(fn, backend=backend)
        self._torchdynamo_orig_callable = fn  # as on torch.compile's wrapper (hf's labels read its code)
        self.entries: list[_Entry] = []
        self.identities = None  # traced_state.Identities of the entries in use: a later patch turns them off here
        self.hub_wrapped = hub_kernel_wrapped(model)
        self.off = ("the compile cache is off" if not cache.stats.enabled
                    else unstorable or precompile_unavailable() or _unstorable(fn, model))
        if cache.stats.enabled and self.off:
            cache.stats.precompile_off = self.off
        self._loaded = self.off is not None

    @property
    def file(self) -> Path:
        return self.cache.path / PRECOMPILED.format(self.name)

    def __call__(self, *args):
        # the model as its user left it (outside the routing set aside below): has it changed since the traces?
        changed = self.identities is not None and self.identities.changed()
        if changed:  # plain torch.compile's full guards serve this process from here on (the file stays)
            self.off = self.cache.stats.precompile_off = f"{self.name}: {changed}"
            self.entries, self.identities = [], None
            log.warning("kernelstack compile cache: %s; plain torch.compile serves %s in this process", self.off,
                        self.name)
        usable = sum(e.function is not None for e in self.entries)
        if self.off is not None and self._loaded and not usable:  # nothing stored serves this process
            return self.fallback(*args)
        plain = tuple(map(_unmarked, args))
        with _hub_kernel_wrappers_off(self.hub_wrapped):
            entry = self._entry_for(plain, args)
            out = None if entry is None else self._run(entry, plain)
        if usable != sum(e.function is not None for e in self.entries):  # loaded or compiled one just now
            self._watch()
        # plain torch.compile meets the model as its user left it: under the wrappers set aside above, each call
        # would hand its guards new forward objects, and every call would compile again
        return self.fallback(*args) if entry is None else out

    def _entry_for(self, plain, args):
        """The stored entry whose guards accept the call (loaded, or compiled and stored now), or None."""
        if not self._loaded:
            self._load()
        for entry in self.entries:
            if entry.function is not None and entry.function.guard_check(*plain):
                return entry
        if self.off is None and len(self.entries) < self.limit:
            entry = self._compile(args)  # with the marks: they make those dimensions dynamic in the new entry
            if entry is not None and entry.function.guard_check(*plain):
                return entry
            if entry is not None:
                self._turn_off("a fresh entry's guards reject the call it was compiled for")
        return None

    def _run(self, entry, args):
        from .backend import add_loaded_graph

        while entry.reports:
            add_loaded_graph(entry.reports.pop(0))
        return entry.function.fn(*args)

    # -- loading --------------------------------------------------------------------------------------------
    def _load(self) -> None:
        self._loaded = True
        start = time.perf_counter()
        try:
            stored = pickle.loads(_unpack(self.file.read_bytes()))
            if stored.get("format") != _PRECOMPILE_FORMAT:
                raise ValueError(f"format {stored.get('format')!r}")
            entries = [self._restore(item) if self._same_code(item) else _Entry(None, item, [], [])
                       for item in stored["entries"]]
            if stored.get("off"):  # what an earlier process could not store: not tried again
                self.off = self.cache.stats.precompile_off = stored["off"]
        except FileNotFoundError:
            return
        except Exception as exc:  # noqa: BLE001 - an unusable entry costs a compile, never the model
            self.cache.stats.error = f"ignored {self.file}: {type(exc).__name__}: {str(exc)[:300]}"
            log.warning("kernelstack compile cache: %s", self.cache.stats.error)
            return
        self.entries = entries
        if any(e.function is None for e in entries):
            log.warning("kernelstack compile cache: %s holds %s traces of code that differs here (a patched function or"
                        " class): not used", self.file, sum(e.function is None for e in entries))
        self.cache.stats.graphs_precompiled += sum(len(e.reports) for e in entries)
        self.cache.stats.precompile_seconds += time.perf_counter() - start
        log.info("kernelstack compile cache: loaded %d compiled %s function(s) from %s in %.2f s", len(entries),
                 self.name, self.file, time.perf_counter() - start)

    @staticmethod
    def _same_code(item: dict) -> bool:
        """Whether the namespaces the entry's trace read hold the same code here (no patched function or class)."""
        from .traced_state import namespaces

        return namespaces(item["modules"]) == item["namespaces"]

    def _watch(self) -> None:
        """Watch, by identity, what the traces in use read beyond their guards (see ``traced_state``)."""
        from .traced_state import Identities

        modules = sorted({m for e in self.entries if e.function is not None for m in e.modules})
        self.identities = Identities(modules, self.model) if modules else None

    def _restore(self, item: dict) -> _Entry:
        from torch._dynamo.aot_compile import AOTCompiledFunction

        from .ops.linear import pack_adjacent

        function = AOTCompiledFunction.deserialize(item["function"], self.fn.__globals__, {"model": self.model})
        # The backend laid these weights out back to back when it compiled: the same layout here, before any
        # guard check (the guards saw the packed parameters) and for the fused GEMMs' one read.
        params = dict(self.model.named_parameters(remove_duplicate=False))
        for names in item["packs"]:
            if not pack_adjacent([params[n] for n in names]):
                raise ValueError(f"cannot lay out {names} back to back")
        reports = pickle.loads(item["reports"])
        for report in reports:
            report.executor += " (loaded whole from the compile cache, not traced)"
        return _Entry(function, item, reports, item["modules"])

    # -- compiling ------------------------------------------------------------------------------------------
    def _compile(self, args):
        from torch._dynamo.aot_compile import AOTCompiledFunction

        from .backend import forget_graphs
        from .backend import observing_compiles
        from .traced_state import namespaces
        from .traced_state import traced_modules

        observed = []
        try:
            with (_foreign_methods_hidden(self.model), observing_compiles(lambda *seen: observed.append(seen)),
                  torch._dynamo.config.patch(enable_aot_compile=True)):  # off by default in torch 2.11
                compiled = torch.compile(self.fn, backend=_storable(self.backend), fullgraph=True,
                                         options={"guard_filter_fn": _serializable_guards})
                function = compiled.aot_compile((args, {}))
        except Exception as exc:  # noqa: BLE001 - e.g. a graph break: plain torch.compile serves it
            forget_graphs([report for report, _ in observed])  # the fallback compiles (and reports) them again
            self._turn_off(f"aot_compile failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}",
                           remember=not _of_this_process(exc))
            return None
        modules = traced_modules(function, self.model)
        entry = _Entry(function, {}, [], modules)  # its graphs' reports are recorded already (the backend ran here)
        self.cache.stats.graphs_compiled += len(observed)  # aot_compile bypasses Inductor's FX cache and its counts
        names = {id(p): n for n, p in self.model.named_parameters(remove_duplicate=False)}
        try:
            packs = [[names[id(t)] for t in group] for _, groups in observed for group in groups]
            entry.stored = {"function": AOTCompiledFunction.serialize(function, {"model": self.model}).serialized_data,
                            "packs": packs, "reports": pickle.dumps([report for report, _ in observed]),
                            "modules": modules, "namespaces": namespaces(modules)}
        except Exception as exc:  # noqa: BLE001 - this process still runs it; later ones trace
            self.entries.append(entry)
            self._turn_off(f"not serializable: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}")
            return entry
        self.entries.append(entry)
        self._store()
        return entry

    def _turn_off(self, reason: str, remember: bool = True) -> None:
        self.off = self.cache.stats.precompile_off = f"{self.name}: {reason}"
        log.warning("kernelstack compile cache: %s; plain torch.compile serves %s's other calls", self.off,
                    self.name)
        if remember:
            self._store()  # with the reason, so that later processes do not try again

    def _store(self) -> None:
        entries = [e.stored for e in self.entries if e.stored]
        stored = {"format": _PRECOMPILE_FORMAT, "off": self.off, "entries": entries}
        payload = pickle.dumps(stored)
        start = time.perf_counter()
        try:
            write_atomic(self.file, _pack(payload))
        except OSError as exc:
            self.cache.stats.error = f"not saved to {self.file}: {exc}"
            log.warning("kernelstack compile cache: %s", self.cache.stats.error)
            return
        self.cache.stats.saved_bytes += len(payload)
        self.cache.stats.save_seconds += time.perf_counter() - start


# -- progress -----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def progress(total: int, desc: str, unit: str = "graph", enabled: bool | None = None):
    """A tqdm bar on stderr whose elapsed time keeps ticking while one long step (a graph's compile) runs.
    ``enabled=None`` reads ``KERNELSTACK_PROGRESS`` ("0" off, "1" on); unset, the bar shows on a TTY only."""
    if enabled is None:
        enabled = {"0": False, "1": True}.get(os.environ.get("KERNELSTACK_PROGRESS", ""))
    bar = tqdm(total=total, desc=desc, unit=unit, disable=None if enabled is None else not enabled)
    stop = threading.Event()
    ticker = None
    if not bar.disable:
        ticker = threading.Thread(target=_tick, args=(bar, stop), daemon=True)
        ticker.start()
    try:
        yield bar
    finally:
        stop.set()
        if ticker is not None:
            ticker.join()
        bar.close()


def _tick(bar, stop: threading.Event) -> None:
    while not stop.wait(0.5):
        bar.refresh()


__all__ = ["CacheStats", "CompileCache", "PrecompiledFunction", "cache_key", "cache_root", "key_inputs",
           "model_signature", "precompile_unavailable", "progress", "write_atomic"]
