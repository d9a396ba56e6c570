"""The forward context: what the attention op needs for this step (pool, metadata, plans), set by the
runtime around each forward call and read by the op. Nothing per-step is baked into the graph."""

import contextlib
import threading

from dataclasses import dataclass
from typing import Any

from .kv_pool import KVPool
from .metadata import BatchMetadata


@dataclass
class ForwardContext:
    pool: KVPool
    meta: BatchMetadata
    attention: Any = None  # the device attention backend (FlashInfer plans) for this step, or None


class _ThreadContexts(threading.local):
    """Each thread's stack of contexts: two optimized models generating in two threads each see their own step."""

    def __init__(self):
        self.stack: list[ForwardContext] = []


_contexts = _ThreadContexts()


@contextlib.contextmanager
def forward_context(ctx: ForwardContext):
    _contexts.stack.append(ctx)
    try:
        yield ctx
    finally:
        _contexts.stack.pop()


def get_forward_context() -> ForwardContext:
    if not _contexts.stack:
        raise RuntimeError("kernelstack::paged_attention ran outside a kernelstack step: it reads the KV pool from "
                           "the forward context that ksbackend.optimize(model)'s generate sets up")
    return _contexts.stack[-1]
