"""kernelstack's graph passes: pure transforms over Dynamo's torch-level FX graphs.

``DEFAULT_PASSES`` is the one ordered list the backend runs. Each pass rewrites the chains it knows
into ``torch.ops.kernelstack`` calls and reports what it matched and what it left, with the reason.
To experiment, write a ``GraphPass`` (or a plain function ``fn(gm, result)``) and either pass it with
``options={"extra_passes": [...]}`` or add it to the process-wide list with ``register_pass``.
"""

from .activation import ActivationMulPass
from .attention import AttentionPass
from .base import FunctionPass
from .base import GraphPass
from .base import PassResult
from .linear_prologue import LinearProloguePass
from .pipeline import run_passes
from .projections import ProjectionFusionPass
from .rms_norm import RMSNormPass
from .rope import RopePass
from .rope_attention import RopeIntoAttentionPass
from .rope_table import RopeTablePass
from .sampling import SamplingPass

# Order: the table first (its outputs feed the rotations), then rotations, attention, norms, MLP, the
# projections (their outputs are sliced views the earlier patterns need not know about), the norms and activations
# folded into the linears they feed (both must exist first), and last the
# rotations moved into the paged attention that reads them (the rope pass made them first); sampling chains
# (a user's own decode loop) touch none of the above.
DEFAULT_PASSES: list[GraphPass] = [
    RopeTablePass(),
    RopePass(),
    AttentionPass(),
    RMSNormPass(),
    ActivationMulPass(),
    ProjectionFusionPass(),
    LinearProloguePass(),
    RopeIntoAttentionPass(),
    SamplingPass(),
]


def as_pass(candidate, name: str | None = None) -> GraphPass:
    if isinstance(candidate, GraphPass):
        return candidate
    if callable(candidate):
        return FunctionPass(name or getattr(candidate, "__name__", "user_pass"), candidate)
    raise TypeError(f"a pass is a GraphPass or a function fn(gm, result); got {candidate!r}")


def register_pass(candidate, *, before: str | None = None, after: str | None = None, name: str | None = None) -> GraphPass:
    """Add a pass to the process-wide list (at the end, or before/after a named pass)."""
    new = as_pass(candidate, name)
    if any(p.name == new.name for p in DEFAULT_PASSES):
        raise ValueError(f"a pass named {new.name!r} is already registered")
    anchor = before or after
    if anchor is None:
        DEFAULT_PASSES.append(new)
        return new
    names = [p.name for p in DEFAULT_PASSES]
    if anchor not in names:
        raise ValueError(f"no pass named {anchor!r}; registered: {names}")
    DEFAULT_PASSES.insert(names.index(anchor) + (1 if after else 0), new)
    return new


def unregister_pass(name: str) -> None:
    names = [p.name for p in DEFAULT_PASSES]
    if name not in names:
        raise ValueError(f"no pass named {name!r}; registered: {names}")
    del DEFAULT_PASSES[names.index(name)]


__all__ = ["DEFAULT_PASSES", "GraphPass", "FunctionPass", "PassResult", "register_pass", "unregister_pass",
           "run_passes", "as_pass", "AttentionPass", "RMSNormPass", "RopePass", "RopeTablePass", "ActivationMulPass",
           "ProjectionFusionPass", "LinearProloguePass", "RopeIntoAttentionPass", "SamplingPass"]
