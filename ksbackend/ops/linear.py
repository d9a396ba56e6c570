"""``kernelstack::linear_cat``: several linears over one input as one GEMM (q/k/v, gate/up).

``linear_cat(x, weights, biases)`` returns ``cat([x @ w.T + b for w, b], -1)``; the graph slices the
parts back out as views. It is one GEMM when the weights lie back to back in one buffer (rows of
``weights[0]``, then of ``weights[1]``, ...): ``pack_adjacent`` lays them out so, once, when the graph is
compiled, with the parameters re-pointed at views of the new buffer (same values, no extra memory, HF's
own modules keep working). Otherwise it concatenates them on every call: correct, and slower.

At decode batch sizes a GEMM reads its weights once whatever its width, so one launch over 12 MB runs
closer to the bandwidth ceiling than three launches over 8, 2 and 2 MB (and saves two launches a layer).
"""

import weakref

import torch
import torch.nn.functional as F

# storage address -> a parameter over it, for every group ``pack_adjacent`` laid out (weak: a freed model's
# storage drops out, so an address reused by another tensor is never mistaken for a parameter's)
_PACKED_PARAMETERS = weakref.WeakValueDictionary()


def _stackable(tensors) -> bool:
    """One dtype, one device and equal rows: the tensors can be row blocks of one buffer."""
    first = tensors[0]
    return all(t.dtype == first.dtype and t.device == first.device and t.shape[1:] == first.shape[1:]
               for t in tensors)


def adjacent_base(tensors):
    """The one tensor ``tensors`` are consecutive row blocks of (a view of their shared buffer), or None."""
    first = tensors[0]
    if not (_stackable(tensors) and all(t.is_contiguous() for t in tensors)):
        return None
    storage = first.untyped_storage()
    offset = first.storage_offset()
    for t in tensors:
        if t.untyped_storage().data_ptr() != storage.data_ptr() or t.storage_offset() != offset:
            return None
        offset += t.numel()
    rows = sum(t.shape[0] for t in tensors)
    return first.new_empty(0).set_(storage, first.storage_offset(), (rows, *first.shape[1:]), first.stride())


def pack_adjacent(tensors) -> bool:
    """Put ``tensors`` (parameters) back to back in one new buffer and re-point each at its view of it.
    Returns False (and changes nothing) when they cannot share one buffer, and for one tensor that is not
    contiguous already: alone it needs no buffer, and re-pointing it would change strides Dynamo guards on.
    Only parameters are registered as never written during a step."""
    if adjacent_base(tensors) is None:
        if len(tensors) == 1 or not _stackable(tensors):
            return False
        with torch.no_grad():
            packed = torch.cat([t.detach() for t in tensors])
            start = 0
            for t in tensors:
                t.data = packed[start:start + t.shape[0]]
                start += t.shape[0]
    if all(isinstance(t, torch.nn.Parameter) for t in tensors):  # a graph input of the user's may be written
        _PACKED_PARAMETERS[tensors[0].untyped_storage().data_ptr()] = tensors[0]
    return True


def is_packed_parameter(tensor) -> bool:
    """``tensor`` lies in a parameter group that ``pack_adjacent`` laid out (a fresh concatenation never does): no
    kernel of a step writes it, so a GEMV launched with PDL may read it before waiting for the kernel before."""
    address = tensor.untyped_storage().data_ptr()
    owner = _PACKED_PARAMETERS.get(address)
    return owner is not None and owner.untyped_storage().data_ptr() == address


def packed_weight(tensors):
    """The one [sum N_i, K] weight (or bias) of ``tensors``: a view when they are back to back, else a copy."""
    if len(tensors) == 1:
        return tensors[0]
    base = adjacent_base(tensors)
    return base if base is not None else torch.cat(tensors)


def linear_cat_shape(x, weights) -> tuple:
    """[..., sum N_i]: the output shape of ``linear_cat`` (and of the ops that end in one)."""
    return (*x.shape[:-1], sum(w.shape[0] for w in weights))


def linear_cat_reference(x, weights, biases):
    return F.linear(x, packed_weight(weights), packed_weight(biases) if biases else None)


@torch.library.custom_op("kernelstack::linear_cat", mutates_args=())
def linear_cat(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor]) -> torch.Tensor:
    """x [..., K]; weights [N_i, K]; biases: empty, or one [N_i] per weight. Returns [..., sum N_i]."""
    return linear_cat_reference(x, weights, biases)


@linear_cat.register_fake
def _(x, weights, biases):
    return x.new_empty(linear_cat_shape(x, weights))


def linear_cat_grads(x, weights, grad, has_bias):
    """Per part (traced by AOTAutograd, where a storage check has no meaning): dx = sum_i g_i @ W_i; returns
    (dx, [dW_i], [db_i] or [])."""
    parts = grad.split([w.shape[0] for w in weights], dim=-1)
    grad_x = sum(p @ w for p, w in zip(parts, weights))
    grad_weights = [p.flatten(0, -2).T @ x.flatten(0, -2) for p in parts]
    grad_biases = [p.flatten(0, -2).sum(0) for p in parts] if has_bias else []
    return grad_x, grad_weights, grad_biases


def _setup_context(ctx, inputs, output):
    x, weights, biases = inputs
    ctx.save_for_backward(x, *weights)
    ctx.has_bias = bool(biases)


def _backward(ctx, grad):
    x, *weights = ctx.saved_tensors
    return linear_cat_grads(x, weights, grad, ctx.has_bias)


linear_cat.register_autograd(_backward, setup_context=_setup_context)
