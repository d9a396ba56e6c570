"""A compile cache across processes: a second process that compiles the same model with the same options
loads the first one's Inductor work instead of redoing it.

Inductor already keeps on-disk caches (FX graph, AOTAutograd, autotune, compiled C++/Triton kernels) under
``TORCHINDUCTOR_CACHE_DIR``, keyed on the graph kernelstack hands it, so after the passes: a pass edit that
changes the rewrite misses there by itself. What Inductor does not give is an entry that survives a wiped or
fresh Inductor directory, is scoped to one model + options + pass sources + versions, and says what it did.
``CompileCache`` adds that: PyTorch's portable cache artifacts (``torch.compiler.save_cache_artifacts``) in
one file under ``~/.cache/kernelstack/<key>/``, loaded before the first compile and saved after it. Dynamo's
tracing and the passes run in every process either way (nothing stable in torch 2.11 skips them).

    cache = CompileCache.for_model(model, dataclasses.asdict(opts))
    with cache, progress(2, "kernelstack: compiling") as bar:
        ...  # the first generate: Dynamo compiles prefill and decode here
    print(cache.describe())
"""

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import os
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
_MAGIC = b"kernelstack-compile-cache-1\n"
_ARTIFACT_KINDS = ("inductor", "autotune", "aot_autograd", "pgo", "precompile")
_STALE_TEMP_SECONDS = 3600  # a temp file this old was left by a killed writer


# -- the key ------------------------------------------------------------------------------------------------
def model_signature(model) -> dict:
    """What of a model shapes its compiled graphs: its config, dtype and device (with the GPU's model)."""
    device = next(model.parameters()).device
    signature = {"config": model.config.to_dict(), "dtype": str(model.dtype), "device": device.type}
    if device.type == "cuda":
        signature["gpu"] = [torch.cuda.get_device_name(device), list(torch.cuda.get_device_capability(device))]
    return signature


def key_inputs(model_config: dict, options: dict) -> dict:
    """Everything the key hashes: a change in any of it gives a new entry."""
    import passes

    return {
        "model": model_config,
        "options": options,
        "passes": [[p.name, p.source_hash()] for p in passes.DEFAULT_PASSES],
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
    error: str | None = None  # why an entry was ignored or not saved

    def describe(self) -> str:
        entry = ("off" if not self.enabled
                 else f"hit ({self.loaded_bytes / 2**20:.1f} MiB loaded in {self.load_seconds:.2f} s)" if self.hit
                 else f"miss ({self.error})" if self.error else "miss")
        saved = f", {self.saved_bytes / 2**20:.1f} MiB saved in {self.save_seconds:.2f} s" if self.saved_bytes else ""
        bypassed = f", {self.graphs_uncacheable} not cacheable" if self.graphs_uncacheable else ""
        return (f"compile cache {self.directory}: {entry}{saved}; {self.graphs_from_cache} graphs from Inductor's "
                f"cache, {self.graphs_compiled} compiled{bypassed}; compiling {self.compile_seconds:.1f} s of "
                f"{self.wall_seconds:.1f} s")


def _artifact_keys(info) -> frozenset:
    """The (kind, key) pairs of a ``CacheInfo`` (its ``<kind>_artifacts`` lists exist in torch 2.11 and 2.13)."""
    return frozenset((kind, key) for kind in _ARTIFACT_KINDS for key in getattr(info, f"{kind}_artifacts", ()))


def _inductor_counts() -> tuple[int, int, int]:
    counts = torch._dynamo.utils.counters["inductor"]
    return counts["fxgraph_cache_hit"], counts["fxgraph_cache_miss"], counts["fxgraph_cache_bypass"]


def _dynamo_compile_seconds() -> float:
    return sum(torch._dynamo.utils.compilation_time_metrics.get("_compile.compile_inner", ()))


class CompileCache:
    """``with cache:`` around the calls that compile: the first block loads the stored artifacts, and each
    block that compiled a graph saves them (atomically). An unreadable entry is logged and ignored; a cache
    that cannot be written is logged; neither stops the model."""

    def __init__(self, key: str, directory=None, enabled: bool = True, description: dict | None = None):
        """``description``: what went into the key, written beside the artifacts as key.json."""
        self.path = cache_root(directory) / key
        self.description = description
        self.stats = CacheStats(key=key, directory=str(self.path), enabled=enabled)
        self._loaded = not enabled
        self._stored = frozenset()  # the artifacts the entry on disk holds, as far as this process knows

    @classmethod
    def for_model(cls, model, options: dict, directory=None, enabled: bool = True) -> "CompileCache":
        inputs = key_inputs(model_signature(model), options)
        return cls(_hash_key(inputs), directory, enabled, description=inputs)

    def describe(self) -> str:
        return self.stats.describe()

    def load(self) -> bool:
        """Load the entry's artifacts into PyTorch's caches; False (and a log line) if there is none usable."""
        self._loaded = True
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
        if self.stats.enabled and exc_type is None and hits + misses:
            self.save()
        return False


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


__all__ = ["CacheStats", "CompileCache", "cache_key", "cache_root", "key_inputs", "model_signature", "progress",
           "write_atomic"]
