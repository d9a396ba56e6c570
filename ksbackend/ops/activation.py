"""``kernelstack::act_and_mul``: the gated MLP activation, ``act(gate) * up``."""

import torch
import torch.nn.functional as F

ACTIVATIONS = ("silu", "gelu_tanh")


def act_and_mul_reference(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return F.silu(gate) * up
    if activation == "gelu_tanh":
        return F.gelu(gate, approximate="tanh") * up
    raise ValueError(f"unknown activation {activation!r}; kernelstack knows {ACTIVATIONS}")


@torch.library.custom_op("kernelstack::act_and_mul", mutates_args=())
def act_and_mul(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """Reference (any device without a registered kernel): the chain as HF writes it."""
    return act_and_mul_reference(gate, up, activation).contiguous()


@act_and_mul.register_fake
def _(gate, up, activation):
    return gate.new_empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype))
