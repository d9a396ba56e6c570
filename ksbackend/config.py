"""Typed options for the backend (``torch.compile(..., options={...})``) and for ``ksbackend.optimize``.

Options arrive as loose dicts; they become frozen dataclasses here, and anything unknown or out of
range is an error that lists what is valid, so a typo never silently turns a feature off.
"""

import dataclasses
import typing

from dataclasses import dataclass
from dataclasses import field

INDUCTOR_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
DECODE_KERNELS = ("auto", "tensor_cores", "cuda_cores", "xqa", "triton")  # see runtime/flashinfer_attention.py


class OptionError(ValueError):
    pass


def _check_choice(name, value, choices):
    if value not in choices:
        raise OptionError(f"option {name}={value!r} is not valid; choose one of {list(choices)}")


def _from_mapping(cls, mapping):
    mapping = dict(mapping or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(mapping) - set(fields))
    if unknown:
        valid = ", ".join(f"{n} ({_type_name(f.type)}, default {_default(f)!r})" for n, f in fields.items())
        raise OptionError(f"unknown kernelstack option(s) {unknown}; valid options: {valid}")
    hints = typing.get_type_hints(cls)
    for name, value in mapping.items():
        expected = hints[name]
        if expected is bool and not isinstance(value, bool):
            raise OptionError(f"option {name} must be a bool, got {value!r}")
        if expected is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise OptionError(f"option {name} must be an int, got {value!r}")
        if expected is float and not isinstance(value, (int, float)):
            raise OptionError(f"option {name} must be a number, got {value!r}")
        if expected is tuple and isinstance(value, str):
            mapping[name] = (value,)  # one name, not its characters
        elif expected is tuple and isinstance(value, (list, tuple)):
            mapping[name] = tuple(value)
        elif expected is tuple:
            raise OptionError(f"option {name} must be a list, got {value!r}")
    return cls(**mapping)


def _type_name(tp):
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _default(f):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


@dataclass(frozen=True)
class BackendOptions:
    """What the backend does with a captured graph."""

    executor: str = "inductor"  # "inductor": compile what remains with Inductor; "fx": run the rewritten graph as is
    disable_passes: tuple = ()  # names of built-in passes to switch off
    extra_passes: tuple = ()  # GraphPass objects or functions fn(gm, result), run after the built-in ones
    fuse_residual_add: bool = True  # fold the residual add into the RMSNorm that reads it
    mode: typing.Optional[str] = None  # Inductor mode (HF's CompileConfig passes one)

    @classmethod
    def from_options(cls, options=None, mode=None) -> "BackendOptions":
        opts = _from_mapping(cls, options)
        if mode is not None:
            opts = dataclasses.replace(opts, mode=mode)
        opts.validate()
        return opts

    def validate(self):
        _check_choice("executor", self.executor, ("inductor", "fx"))
        _check_choice("mode", self.mode, INDUCTOR_MODES)
        from passes import DEFAULT_PASSES

        known = [p.name for p in DEFAULT_PASSES]
        for name in self.disable_passes:
            _check_choice("disable_passes entry", name, known)


@dataclass(frozen=True)
class RuntimeOptions:
    """What ``ksbackend.optimize`` sets up for ``generate``: the KV pool, buckets, kernels."""

    # Tokens per KV page. 64: XQA's fp8 decode reads 64-token pages 3% faster than 16-token ones (the
    # difference between 1.58x and 1.62x over bf16 at batch 64 / context 4096); bf16 decode is equally
    # fast at 16..128 (docs/benchmarks.md), and a sequence wastes under one page.
    page_size: int = 64
    # KV pool size in tokens; 0: from kv_memory_fraction on a GPU, and on the CPU a pool that grows as needed
    max_kv_tokens: int = 0
    kv_memory_fraction: float = 0.5  # share of free GPU memory the pool may take when max_kv_tokens is 0
    kv_cache_dtype: str = "auto"  # "auto" (the model's dtype) or "fp8_e4m3" (half the KV bytes; emulated on CPU)
    max_batch_size: int = 256  # most sequences decoded together; a larger batch runs in waves
    max_prefill_tokens: int = 8192  # most prompt tokens in one prefill step (a longer single prompt runs alone)
    decode_buckets: tuple = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # batch sizes decode is padded up to
    cuda_graphs: bool = True  # replay decode from CUDA graphs captured per bucket (CUDA only)
    decode_kernel: str = "auto"  # one of DECODE_KERNELS
    attention: str = "auto"  # "auto": FlashInfer on CUDA where it serves; "reference": the plain-torch paged path
    compile_cache: bool = True  # reuse compiled graphs across processes (~/.cache/kernelstack, $KERNELSTACK_CACHE_DIR)
    # the compile cache also holds Dynamo's traces, so a later process traces nothing (torch's ahead-of-time
    # API, compile_cache.PrecompiledFunction; whatever it refuses runs plain torch.compile); False: Inductor's
    # artifacts only, and Dynamo traces in every process. Nothing is stored with compile_cache=False
    trace_cache: bool = True
    backend_options: dict = field(default_factory=dict)  # passed to the backend (see BackendOptions)

    @classmethod
    def from_options(cls, options=None) -> "RuntimeOptions":
        opts = _from_mapping(cls, options)
        opts.validate()
        return opts

    # What only the runtime around the compiled graphs reads (the pool's size, batching, CUDA-graph replay, which
    # attention implementation the opaque attention op dispatches to each step): a change reuses the graphs.
    RUNTIME_ONLY = ("max_kv_tokens", "kv_memory_fraction", "max_batch_size", "max_prefill_tokens", "decode_buckets",
                    "cuda_graphs", "decode_kernel", "attention")

    def graph_options(self) -> dict:
        """The options the compile cache's key holds: those that can change what is compiled."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.RUNTIME_ONLY}

    def validate(self):
        if self.page_size < 1 or self.page_size & (self.page_size - 1):
            raise OptionError(f"option page_size={self.page_size} must be a power of two >= 1")
        if self.max_kv_tokens < 0:
            raise OptionError("option max_kv_tokens must be >= 0 (0 sizes the pool from kv_memory_fraction)")
        if not 0.0 < self.kv_memory_fraction <= 0.95:
            raise OptionError(f"option kv_memory_fraction={self.kv_memory_fraction} must be in (0, 0.95]")
        _check_choice("kv_cache_dtype", self.kv_cache_dtype, ("auto", "fp8_e4m3"))
        _check_choice("decode_kernel", self.decode_kernel, DECODE_KERNELS)
        _check_choice("attention", self.attention, ("auto", "reference"))
        if self.max_batch_size < 1 or self.max_prefill_tokens < 1:
            raise OptionError("options max_batch_size and max_prefill_tokens must be >= 1")
        if not self.decode_buckets or list(self.decode_buckets) != sorted(set(self.decode_buckets)) or self.decode_buckets[0] < 1:
            raise OptionError(f"option decode_buckets={self.decode_buckets} must be increasing positive ints")
        BackendOptions.from_options(self.backend_options)
