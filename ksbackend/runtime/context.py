"""The forward context: what the attention op needs for this step (pool, metadata, plans), set by the
runtime around each forward call and read by the op. Nothing per-step is baked into the graph."""

import contextlib
from dataclasses import dataclass
from typing import Any

from .kv_pool import KVPool
from .metadata import BatchMetadata


@dataclass
class ForwardContext:
    pool: KVPool
    meta: BatchMetadata
    attention: Any = None  # the device attention backend (FlashInfer plans) for this step, or None


_current: list[ForwardContext] = []


@contextlib.contextmanager
def forward_context(ctx: ForwardContext):
    _current.append(ctx)
    try:
        yield ctx
    finally:
        _current.pop()


def get_forward_context() -> ForwardContext:
    if not _current:
        raise RuntimeError("kernelstack::paged_attention ran outside a kernelstack step: it reads the KV pool from "
                           "the forward context that ksbackend.optimize(model)'s generate sets up")
    return _current[-1]
