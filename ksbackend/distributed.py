"""Tensor parallelism as transformers applies it: what kernelstack needs to know about a sharded model.

transformers shards a model itself (``from_pretrained(path, distributed_config=DistributedConfig(tp_size=N))``,
or the older ``tp_plan="auto"``) over a 1-D DeviceMesh: for Llama-like families q/k/v/gate/up are column-parallel,
o/down row-parallel, lm_head gathers its output (and in 5.24 the embedding is vocab-parallel). Without grad each
sharded Linear runs on its local weight, so a rank's attention sees only its own heads, and each row-parallel
Linear ends in an in-place ``dist.all_reduce``. kernelstack keeps all of that as it is; it only has to size its
per-rank state from what the rank holds (not from the global config) and agree with the other ranks on every
decision that changes which collectives run.

Under Dynamo the collectives are, in the torch-level graph the passes see:
- ``dist.all_reduce(x)`` -> ``_c10d_functional.all_reduce(x, "sum", group)``, ``_c10d_functional.wait_tensor``,
  then ``x.copy_(...)`` (the in-place result is written back: readers of ``x`` must stay after the copy);
- DTensor boundaries -> ``DTensor.from_local`` / ``.redistribute(placements=...)`` / ``.to_local()``: a
  redistribute from ``Partial`` to ``Replicate`` is an all-reduce, from ``Shard`` to ``Replicate`` an all-gather.
"""

import collections

import torch
import torch.distributed as dist

from passes.base import example_value

from .models import head_dim

_COLLECTIVE_NAMESPACES = ("_c10d_functional", "c10d_functional", "_c10d_functional_autograd", "_dtensor")
_NOT_COLLECTIVES = ("wait_tensor",)
_C10D_FUNCTIONS = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast",
                   "all_to_all", "all_to_all_single", "reduce", "scatter", "gather")


def _is_dtensor(value) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(value, DTensor)


def tensor_parallel_mesh(model):
    """The DeviceMesh transformers sharded ``model`` over (that of its first DTensor parameter), or None."""
    for param in model.parameters():
        if _is_dtensor(param):
            return param.device_mesh
    return None


def tensor_parallel_group(model):
    """The process group of the model's tensor-parallel mesh, or None for an unsharded model."""
    mesh = tensor_parallel_mesh(model)
    if mesh is None:
        return None
    return mesh.get_group() if mesh.ndim == 1 else mesh.get_group("tp")


def _local_rows(linear) -> int | None:
    """Output rows this rank computes; None for a projection with no plain weight (a quantized layer holds packed
    ``qweight``s): transformers shards plain weights only, so such a model is not sharded there."""
    weight = getattr(linear, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None
    return (weight.to_local() if _is_dtensor(weight) else weight).shape[0]


def local_attention_heads(model) -> tuple[int, int]:
    """(query heads, KV heads) this rank's attention layers compute: the local output rows of q_proj/k_proj over
    the head size. Equals the config's counts on an unsharded model; a sharded rank holds only its share, and its
    KV pool and attention kernels must be sized from that, not from ``config.num_key_value_heads``."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    counts = set()
    for module in model.modules():
        if hasattr(module, "layer_idx") and hasattr(module, "q_proj") and hasattr(module, "k_proj"):
            size = getattr(module, "head_dim", None) or head_dim(cfg)
            q_rows, k_rows = _local_rows(module.q_proj), _local_rows(module.k_proj)
            if q_rows is not None and k_rows is not None:
                counts.add((q_rows // size, k_rows // size))
    if not counts:
        return cfg.num_attention_heads, cfg.num_key_value_heads
    if len(counts) > 1:
        raise ValueError(f"attention layers hold different head counts on this rank: {sorted(counts)}")
    return counts.pop()


def agree_on_min(value: int, model) -> int:
    """The smallest ``value`` over the model's tensor-parallel ranks (``value`` itself when unsharded).

    Ranks must take the same scheduling decisions (admission, waves, preemption), or one rank runs a step the
    others do not and the collectives deadlock. A KV pool sized from each GPU's free memory would differ per rank;
    sizing every rank's pool to the smallest keeps them in lockstep."""
    group = tensor_parallel_group(model)
    if group is None:
        return value
    mesh = tensor_parallel_mesh(model)
    device = torch.device("cuda", torch.cuda.current_device()) if mesh.device_type == "cuda" else mesh.device_type
    agreed = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=group)
    return int(agreed.item())


def _placement(p) -> str:
    """Short names: the vocab-parallel embedding's _MaskPartial prints its whole offset shape otherwise."""
    if p.is_partial():
        return f"Partial({getattr(p, 'reduce_op', 'sum')})"
    return f"Shard({p.dim})" if p.is_shard() else "Replicate" if p.is_replicate() else repr(p)


def _redistribute_comm(before, after) -> str | None:
    """The communication a DTensor redistribute between these placements needs (None: a local re-slicing)."""
    comms = set()
    for a, b in zip(before, after):
        if a == b:
            continue
        if a.is_partial():  # Partial, or the vocab-parallel embedding's _MaskPartial
            comms.add("all_reduce" if b.is_replicate() else "reduce_scatter")
        elif a.is_shard():
            comms.add("all_gather" if b.is_replicate() else "all_to_all")
    return "+".join(sorted(comms)) or None


def _is_redistribute(node) -> bool:
    """``dtensor.redistribute(...)``: a method call under torch 2.13's Dynamo; a call of a closure
    (``TensorVariable.method_redistribute.<locals>.redistribute_fn_with_prim_types``) under torch 2.11's."""
    if node.op == "call_method":
        return node.target == "redistribute"
    return node.op == "call_function" and "redistribute" in getattr(node.target, "__qualname__", "")


def collective_op(node) -> str | None:
    """The collective a torch-level graph node runs ('_c10d_functional.all_reduce', 'DTensor.redistribute
    all_reduce (Partial(sum) -> Replicate)', ...), or None: what the explain report lists as kept."""
    if not isinstance(node, torch.fx.Node):
        return None
    if _is_redistribute(node):
        # placements from the recorded DTensors: the target ones are a closure's constant under torch 2.11
        before = tuple(getattr(example_value(node.args[0]) if node.args else None, "placements", ()) or ())
        after = tuple(getattr(example_value(node), "placements", ()) or ())
        comm = _redistribute_comm(before, after)
        if comm is None:
            return None  # a local re-slicing (Replicate -> Shard) or no change: nothing crosses ranks
        source, target = (", ".join(map(_placement, side)) for side in (before, after))
        return f"DTensor.redistribute {comm} ({source} -> {target})"
    if node.op != "call_function":
        return None
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        target = target.overloadpacket
    if isinstance(target, torch._ops.OpOverloadPacket):
        namespace, _, name = target._qualified_op_name.partition("::")
        return f"{namespace}.{name}" if namespace in _COLLECTIVE_NAMESPACES and name not in _NOT_COLLECTIVES else None
    module, name = getattr(target, "__module__", "") or "", getattr(target, "__name__", "")
    if module.startswith("torch.distributed") and name in _C10D_FUNCTIONS:
        return f"torch.distributed.{name}"  # an in-place c10d call left as it is (not rewritten by Dynamo)
    return None


def collective_ops(gm) -> dict[str, int]:
    """How many of each collective a graph runs (see ``collective_op``)."""
    return dict(collections.Counter(name for name in map(collective_op, gm.graph.nodes) if name))


__all__ = ["agree_on_min", "collective_op", "collective_ops", "local_attention_heads", "tensor_parallel_group",
           "tensor_parallel_mesh"]
