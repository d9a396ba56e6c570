"""kernelstack: a torch.compile backend that rewrites Hugging Face decoder graphs onto FlashInfer
attention over a paged KV pool it owns and generated Triton kernels.

    torch.compile(model, backend="kernelstack")        # any forward call
    ksbackend.optimize(model); model.generate(...)      # the generate path, with the paged KV pool
    print(ksbackend.explain())                          # what was rewritten, what was left and why
"""

import logging

from . import ops  # noqa: F401  (registers torch.ops.kernelstack.*)
from .backend import kernelstack_backend
from .config import BackendOptions
from .config import OptionError
from .config import RuntimeOptions
from .kernels import register_cuda_kernels
from .report import GLOBAL as _GLOBAL_RECORDER
from .report import ExplainReport

register_cuda_kernels()
logging.getLogger("ksbackend").addHandler(logging.NullHandler())

try:  # TORCH_LOGS="ksbackend" (INFO) / "+ksbackend" (DEBUG), like torch's own components
    from torch._logging._internal import register_log

    register_log("ksbackend", ["ksbackend"])
except Exception:  # pragma: no cover - private torch API; logging still works through `logging`
    pass


def explain(model=None) -> ExplainReport:
    """What kernelstack did: for ``model`` (one passed to ``optimize``), or for every graph in this process."""
    recorder = getattr(model, "_kernelstack_recorder", None) if model is not None else _GLOBAL_RECORDER
    if recorder is None:
        raise ValueError("this model was not passed to ksbackend.optimize; call ksbackend.explain() for all graphs")
    return recorder.snapshot()


def reset() -> None:
    """Forget the process-wide explain report."""
    _GLOBAL_RECORDER.clear()


__all__ = ["kernelstack_backend", "explain", "reset", "BackendOptions", "RuntimeOptions", "OptionError", "ExplainReport"]

from .hf import optimize  # noqa: E402  (needs the backend defined above)
from .hf import restore  # noqa: E402  (needs the backend defined above)

__all__ += ["optimize", "restore"]
