"""The kernelstack op contracts.

Every rewrite a pass makes replaces a chain of torch ops with one of these ``torch.ops.kernelstack``
ops. Each op has a schema, a fake implementation (so the rewritten graph stays traceable by Dynamo,
AOTAutograd and Inductor) and a CPU reference written in plain torch that computes exactly what the
replaced chain computed. CUDA implementations (Triton kernels, FlashInfer) are registered on top of
the same contracts, so a rewrite that is right on CPU is checked against the same reference on GPU.
"""

from . import activation  # noqa: F401
from . import attention  # noqa: F401
from . import fused_linear  # noqa: F401
from . import linear  # noqa: F401
from . import norm  # noqa: F401
from . import paged_attention  # noqa: F401
from . import rope  # noqa: F401
from . import sampling  # noqa: F401

# What runs each op on a device other than the CPU reference; kernels add themselves here when they
# register a CUDA implementation, so the explain report tells the truth about what ran where.
_DEVICE_IMPLEMENTATIONS: dict[tuple[str, str], str] = {}


def register_implementation(op_name: str, device: str, description: str) -> None:
    _DEVICE_IMPLEMENTATIONS[(op_name.split("::")[-1], device)] = description


def implementation(op_name: str, device: str) -> str:
    name = op_name.split("::")[-1]
    return _DEVICE_IMPLEMENTATIONS.get((name, device), "reference (plain torch)")
