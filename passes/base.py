"""What every graph pass shares: the GraphPass contract, its per-graph result, and small helpers
for reading Dynamo's torch-level FX graphs.

Dynamo records the same operation in several spellings (``operator.mul``, ``torch.mul``,
``x.mul(...)``; ``torch.rsqrt`` or ``x.rsqrt()``), so passes never compare targets directly: they ask
``op_name(node)``, which folds the spellings into one name.
"""

import hashlib
import inspect
import operator

from dataclasses import dataclass
from dataclasses import field
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn.functional as F

_FUNCTION_NAMES = {
    operator.add: "add", torch.add: "add",
    operator.mul: "mul", torch.mul: "mul",
    operator.sub: "sub", torch.sub: "sub",
    operator.neg: "neg", torch.neg: "neg",
    operator.getitem: "getitem",
    operator.matmul: "matmul", torch.matmul: "matmul",
    torch.rsqrt: "rsqrt", torch.pow: "pow", torch.mean: "mean",
    torch.cat: "cat", torch.concat: "cat",
    torch.cos: "cos", torch.sin: "sin", torch.tanh: "tanh",
    torch.transpose: "transpose",
    F.silu: "silu", F.gelu: "gelu",
    F.softmax: "softmax", torch.softmax: "softmax",
    F.dropout: "dropout",
    F.scaled_dot_product_attention: "sdpa",
    torch._C._nn.scaled_dot_product_attention: "sdpa",
}
# Methods whose name already says what they are (x.float() is a cast to float32).
_METHOD_ALIASES = {"float": "to", "type_as": "to", "type": "to"}


def op_name(node) -> str | None:
    """The operation a node performs, in one spelling; None for placeholders, outputs, attributes."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_function":
        return _FUNCTION_NAMES.get(node.target, getattr(node.target, "__name__", str(node.target)))
    if node.op == "call_method":
        return _METHOD_ALIASES.get(node.target, node.target)
    return None


def kernelstack_op(node) -> str | None:
    """'kernelstack::name' if the node calls a kernelstack op (Dynamo records the packet, passes the overload)."""
    if isinstance(node, fx.Node) and node.op == "call_function":
        target = node.target
        if isinstance(target, torch._ops.OpOverload):
            target = target.overloadpacket
        if isinstance(target, torch._ops.OpOverloadPacket) and target._qualified_op_name.startswith("kernelstack::"):
            return target._qualified_op_name
    return None


def is_op(node, *names: str) -> bool:
    return op_name(node) in names


def example_value(node):
    """The fake tensor Dynamo recorded for a node (None if it recorded none)."""
    if isinstance(node, fx.Node):
        value = node.meta.get("example_value", node.meta.get("val"))
        if isinstance(value, torch.Tensor):
            return value
    return None


def dtype_of(node):
    value = example_value(node)
    return value.dtype if value is not None else None


def shape_of(node):
    value = example_value(node)
    return tuple(value.shape) if value is not None else None


def arg(node: fx.Node, index: int, name: str, default=None):
    """A call's argument by position or keyword, as the user wrote it."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def tensor_operands(node: fx.Node) -> list:
    return [a for a in node.args if isinstance(a, fx.Node)]


def other_operand(binary: fx.Node, known):
    """For a binary op with ``known`` as one operand, the other one (None if ``known`` is not there)."""
    a, b = binary.args[0], binary.args[1]
    if a is known:
        return b
    if b is known:
        return a
    return None


def users_outside(nodes) -> list:
    """Nodes of a chain (all but its last) that something outside the chain also reads."""
    chain = set(nodes)
    return [n for n in nodes[:-1] if any(u not in chain for u in n.users)]


def erase_unused(nodes) -> None:
    """Erase the given chain nodes once nothing reads them, last first."""
    for node in sorted(set(nodes), key=_position(nodes), reverse=True):
        if not node.users and node.graph is not None:
            node.graph.erase_node(node)


def _position(nodes):
    order = {n: i for i, n in enumerate(next(iter(nodes)).graph.nodes)}
    return lambda n: order.get(n, -1)


def describe(node: fx.Node) -> str:
    stack = node.meta.get("stack_trace") or ""
    module = ""
    nn_stack = node.meta.get("nn_module_stack")
    if nn_stack:
        module = list(nn_stack.values())[-1][0]
    module = module.replace("L['self'].", "").replace("L['self']", "model")
    # the last source line of the trace (Python 3.11+ adds a line of ^ / ~ markers under it)
    code = [line.strip() for line in stack.splitlines() if line.strip() and set(line.strip()) - set("^~")]
    where = module or (code[-1] if code else "")
    return f"{node.name}" + (f" ({where})" if where else "")


@dataclass
class PassResult:
    """What one pass did to one graph: sites it rewrote, and sites it saw but left, with why."""

    name: str
    matched: list[str] = field(default_factory=list)
    left: list[tuple[str, str]] = field(default_factory=list)
    error: str | None = None
    elapsed_ms: float = 0.0

    def match(self, site: str) -> None:
        self.matched.append(site)

    def leave(self, site: str, reason: str) -> None:
        self.left.append((site, reason))


class GraphPass:
    """A graph transform over a Dynamo (torch-level) FX graph.

    Subclasses set ``name`` and implement ``run(gm, result)``: find the chains they know, replace each
    with a ``torch.ops.kernelstack`` call, and record every site as matched or left with a reason.
    A pass never leaves a half-rewritten graph behind: the pipeline restores the graph if it raises.
    """

    name: str = "unnamed"

    def run(self, gm: fx.GraphModule, result: PassResult) -> None:
        raise NotImplementedError

    def source_hash(self) -> str:
        """Stable hash of the file that defines the pass, with its name: it changes whenever the rewrite can
        change (feeds caches). Not ``inspect.getsource`` of the class: that parses the file into an AST, and
        CPython 3.11 builds ASTs with a counter shared by all threads, so two models building their runtimes in
        two threads, beside Dynamo's own parsing, raised "AST constructor recursion depth mismatch"."""
        cls = type(self)
        try:
            source = Path(inspect.getsourcefile(cls)).read_text()
        except (OSError, TypeError):
            source = ""
        return hashlib.sha256(f"{cls.__module__}.{cls.__qualname__}\n{source}".encode()).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


class FunctionPass(GraphPass):
    """Wraps a plain function ``fn(gm, result)`` as a pass: the short way to write an experiment."""

    def __init__(self, name: str, fn):
        self.name = name
        self.fn = fn

    def run(self, gm, result):
        self.fn(gm, result)

    def source_hash(self) -> str:
        try:
            source = inspect.getsource(self.fn)
        except (OSError, TypeError):
            source = self.fn.__qualname__
        return hashlib.sha256(source.encode()).hexdigest()[:16]
