import os
import tempfile

# Without a GPU, Triton kernels run in the interpreter (set before any kernel is defined).
if not os.environ.get("CUDA_VISIBLE_DEVICES") and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Compiled graphs are cached across processes: tests keep theirs apart from the user's ~/.cache.
os.environ.setdefault("KERNELSTACK_CACHE_DIR", tempfile.mkdtemp(prefix="kernelstack-test-cache-"))

import pytest  # noqa: E402
import torch
import torch._dynamo

import ksbackend

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def fresh_compile_state():
    """Each test starts with no cached Dynamo graphs and an empty explain report."""
    torch._dynamo.reset()
    ksbackend.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(autouse=True)
def gpu_shared_by_test_processes(monkeypatch):
    """Under pytest-xdist the test processes share one GPU: each KV pool takes a tenth of the free memory, not half
    (with four processes on an H100 the later ones found none left and 16 tests ran out of memory)."""
    if os.environ.get("PYTEST_XDIST_WORKER") and torch.cuda.is_available():
        from ksbackend.config import RuntimeOptions

        from_options = RuntimeOptions.from_options.__func__
        monkeypatch.setattr(RuntimeOptions, "from_options", classmethod(
            lambda cls, options=None: from_options(cls, {"kv_memory_fraction": 0.1, **(options or {})})))
    yield


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


def ragged_batch(lengths, vocab=256, pad=0):
    """Left-padded random prompts of the given lengths, as a tokenizer would return them."""
    from ksbackend.models import left_pad

    return left_pad([torch.randint(3, vocab, (n,)) for n in lengths], pad_token_id=pad)


def compile_fx(model, **options):
    """torch.compile through kernelstack, executing the rewritten graph as plain FX (fast on CPU)."""
    return torch.compile(model, backend="kernelstack", options={"executor": "fx", **options})


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

