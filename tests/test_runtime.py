"""The model runner's decode buffers, without a model: graph capture parks the live rows and restores them,
host mirrors included (planned decode kernels plan from those), and compaction keeps rows in order."""

import pytest
import torch

from ksbackend.runtime.kv_pool import KVPool
from ksbackend.runtime.model_runner import ModelRunner
from ksbackend.runtime.model_runner import NewRow
from ksbackend.runtime.model_runner import RowParams


def runner_with_rows(lengths):
    pool = KVPool(1, 2, 8, 64, 4, torch.float32, "cpu")
    runner = ModelRunner(None, None, pool, None, capacity=8, buckets=(1, 2, 4, 8), cuda_graphs=False, width=16,
                         vocab_size=32)
    rows = []
    for i, n in enumerate(lengths):
        pool.reserve(i, n + 4)
        pool.sequences[i].length = n
        rows.append(NewRow(i, list(range(n)), RowParams(temperature=0.5 + i)))
    runner.add_rows(rows, torch.arange(len(rows)) + 10)
    return runner, pool


def test_parking_for_a_capture_restores_the_rows_and_keeps_the_host_mirrors():
    runner, pool = runner_with_rows([5, 9, 2])
    buf = runner.buffers
    before = [t.clone() for t in buf.row_tensors()]
    table_host, lens_host = buf.table_host.clone(), buf.lens_host.clone()
    runner._park(4)
    assert (buf.table[:4] == runner.scratch_page).all() and (buf.lens[:4] == 0).all()  # warm-ups touch only scratch
    assert torch.equal(buf.table_host, table_host) and torch.equal(buf.lens_host, lens_host)
    runner._unpark(4)
    assert all(torch.equal(t, b) for t, b in zip(buf.row_tensors(), before))


def test_keeping_rows_compacts_them_in_order_and_pads_the_rest():
    runner, pool = runner_with_rows([5, 9, 2])
    buf = runner.buffers
    runner.keep_rows([2, 0])
    assert runner.live == 2
    assert buf.ids[:2].tolist() == [12, 10] and buf.lens[:2].tolist() == [2, 5] and buf.lens_host[:2].tolist() == [2, 5]
    assert buf.params["temperature"][:2].tolist() == [2.5, 0.5]
    assert torch.equal(buf.table_host[0, :2], torch.tensor(pool.sequences[2].pages[:2], dtype=torch.int32))
    assert (buf.table[2] == runner.scratch_page).all() and buf.lens[2] == 0 and buf.active[2] == 0


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("vocab", [128256, 49152, 32000, 1000, 151936])
def test_first_argmax_equals_argmax_with_ties_and_odd_vocabularies(vocab, device):
    """Integer-valued logits tie often: the two-stage form must pick the first maximum, as argmax does."""
    from ksbackend.runtime.model_runner import first_argmax

    logits = torch.randint(-50, 50, (5, vocab), device=device).to(torch.bfloat16)
    logits[1, vocab - 1] = 99  # the maximum in the last chunk
    logits[2, [7, vocab // 2]] = 99  # tied maxima in two chunks: the first wins
    assert torch.equal(first_argmax(logits), logits.argmax(-1))
    assert first_argmax(logits)[2] == 7


def test_a_missing_flashinfer_is_an_unsupported_attention_not_a_crash(monkeypatch):
    """A CUDA install without FlashInfer still generates: the import failure becomes ``UnsupportedAttention``, which
    ``optimize`` answers with the reference attention and a report line naming the package to install."""
    import sys

    from ksbackend.runtime.flashinfer_attention import FlashInferAttention
    from ksbackend.runtime.flashinfer_attention import UnsupportedAttention

    monkeypatch.setitem(sys.modules, "flashinfer", None)  # what an absent package does to ``import flashinfer``
    pool = KVPool(2, 2, 64, 8, 16, torch.bfloat16, "cpu")
    with pytest.raises(UnsupportedAttention, match="pip install flashinfer-python"):
        FlashInferAttention(pool, 4, torch.bfloat16, 0.125, -1)
