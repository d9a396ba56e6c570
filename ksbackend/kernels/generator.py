"""Turns a matched chain (pointwise ops and at most one row reduction) into a Triton kernel.

A chain is a tuple of SSA statements over named inputs, e.g. RMSNorm with its residual add:

    ("load", "x"), ("load", "r"), ("add", "s", "x", "r"), ("store", "sum", "s"),
    ("f32", "sf", "s"), ("mean_sq", "var", "sf"), ("add_arg", "ve", "var", "eps"), ("rsqrt", "inv", "ve"), ...

Row chains (with a reduction) run one program per row with the whole row in registers; pointwise
chains run a grid of (row, block of columns). Both take [rows, n_cols] views with any row stride.
The generated source is written to a cache directory and imported (Triton needs real source files),
and compiled kernels are cached by the chain's structure, so every model whose chain has the same
shape shares one kernel. Launch shapes (block, warps) are chosen per call from the row length, never
fixed in the source.
"""

import hashlib
import importlib.util
import os
import tempfile
import threading

import torch

from . import pdl

_TL_DTYPES = {torch.float32: "tl.float32", torch.bfloat16: "tl.bfloat16", torch.float16: "tl.float16"}
_EXPRS = {
    "add": "{0} + {1}", "sub": "{0} - {1}", "mul": "{0} * {1}",
    "f32": "{0}.to(tl.float32)", "rsqrt": "1.0 / tl.sqrt({0})",
    "silu": "{0} / (1.0 + tl.exp(-{0}))",
    # tanh(z) = 2 * sigmoid(2z) - 1: Triton has no tanh in every version
    "gelu_tanh": "0.5 * {0} * (1.0 + (2.0 / (1.0 + tl.exp(-2.0 * (0.7978845608028654 * ({0} + 0.044715 * {0} * {0} * {0})))) - 1.0))",
    "add_const": "{0} + {1}", "add_arg": "{0} + {1}",
}
_cache: dict = {}
_cache_lock = threading.Lock()
_CACHE_DIR = os.environ.get("KERNELSTACK_KERNEL_CACHE", os.path.join(tempfile.gettempdir(), "kernelstack_kernels"))


def _render(chain, row: bool):
    loads = [s[1] for s in chain if s[0] == "load"]
    vectors = [s[1] for s in chain if s[0] == "load_vec"]
    stores = [s[1] for s in chain if s[0] == "store"]
    args = sorted({s[3] for s in chain if s[0] == "add_arg"})
    params = [f"{n}_ptr" for n in loads + vectors + stores] + [f"{n}_stride" for n in loads + stores] + ["n_cols"] + args
    # row chains: one program per row; pointwise: a grid of (row, block of columns)
    first_col = "0" if row else "tl.program_id(1).to(tl.int64) * BLOCK"
    # under PDL everything is read after the wait: a norm's weight may be computed in the step (a cast), and
    # reading a few KB early would gain nothing measurable
    body = ["if PDL:", "    tl.extra.cuda.gdc_launch_dependents()", "    tl.extra.cuda.gdc_wait()",
            "row = tl.program_id(0).to(tl.int64)", f"cols = {first_col} + tl.arange(0, BLOCK)", "mask = cols < n_cols"]
    for stmt in chain:
        op = stmt[0]
        at = f"{stmt[1]}_ptr + row * {stmt[1]}_stride + cols"  # a load's or a store's addresses
        if op == "load_vec":
            body.append(f"{stmt[1]} = tl.load({stmt[1]}_ptr + cols, mask=mask, other=0.0)")
        elif op == "load":
            body.append(f"{stmt[1]} = tl.load({at}, mask=mask, other=0.0)")
        elif op == "store":
            body.append(f"tl.store({at}, {stmt[2]}.to({stmt[1]}_ptr.dtype.element_ty), mask=mask)")
        elif op == "cast":
            body.append(f"{stmt[1]} = {stmt[2]}.to({_TL_DTYPES[stmt[3]]}).to(tl.float32)")
        elif op == "mean_sq":
            body.append(f"{stmt[1]} = tl.sum({stmt[2]} * {stmt[2]}, axis=0) / n_cols")
        else:
            body.append(f"{stmt[1]} = " + _EXPRS[op].format(*stmt[2:]))
    source = ("import triton\nimport triton.language as tl\n\n\n@triton.jit\n"
              f"def kernel({', '.join(params)}, BLOCK: tl.constexpr, PDL: tl.constexpr):\n"
              + "".join(f"    {line}\n" for line in body))
    return source, loads, vectors, stores, args


def compile_chain(chain: tuple):
    """The Triton kernel for ``chain`` (generated, written, imported once per structure; one thread at a time, so
    two models first running a chain in two threads share one module)."""
    with _cache_lock:
        return _cache[chain] if chain in _cache else _generate(chain)


def _generate(chain: tuple):
    row = any(s[0] == "mean_sq" for s in chain)
    source, loads, vectors, outputs, args = _render(chain, row)
    digest = hashlib.sha256(source.encode()).hexdigest()[:20]
    os.makedirs(_CACHE_DIR, exist_ok=True)
    path = os.path.join(_CACHE_DIR, f"ks_{digest}.py")
    if not os.path.exists(path):
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(source)
        os.replace(tmp, path)
    spec = importlib.util.spec_from_file_location(f"ks_{digest}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _cache[chain] = GeneratedKernel(module.kernel, row, loads, vectors, outputs, args, source)
    return _cache[chain]


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class GeneratedKernel:
    def __init__(self, fn, row, loads, vectors, outputs, args, source):
        self.fn, self.row, self.source = fn, row, source
        self.loads, self.vectors, self.outputs, self.args = loads, vectors, outputs, args

    def launch_shape(self, n_cols, rows):
        """Row kernels: the whole row in one block, more warps for longer rows (one warp per ~256
        elements keeps ~8 live values per thread). Pointwise: blocks of 1K columns (4K for 1M elements and
        more), never wider than the row."""
        if self.row:
            block = next_power_of_2(n_cols)
            return (rows,), block, max(1, min(16, block // 256))
        block = min(1024 if rows * n_cols < 1 << 20 else 4096, next_power_of_2(n_cols))
        return (rows, (n_cols + block - 1) // block), block, 4 if block <= 1024 else 8

    def __call__(self, tensors: dict, n_cols: int, **scalars):
        """tensors: name -> [rows, n_cols] views with unit column stride (vectors [n_cols]). Row strides are
        free: the halves of a fused gate_up output run in place, with no copy."""
        for name in self.loads + self.outputs:
            t = tensors[name]
            if t.dim() != 2 or t.shape[1] != n_cols or (n_cols > 1 and t.stride(1) != 1):
                raise ValueError(f"generated kernel: {name} must be [rows, {n_cols}] with unit column stride, "
                                 f"not {tuple(t.shape)} with strides {t.stride()}")
        grid, block, warps = self.launch_shape(n_cols, tensors[self.outputs[0]].shape[0])
        pointers = [tensors[n] for n in self.loads + self.vectors + self.outputs]
        strides = [tensors[n].stride(0) for n in self.loads + self.outputs]
        self.fn[grid](*pointers, *strides, n_cols, *[scalars[a] for a in self.args], BLOCK=block, num_warps=warps,
                      **pdl.launch_options(pointers[0].device))
