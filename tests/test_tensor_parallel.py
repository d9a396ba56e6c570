"""Tensor parallel as transformers shards it, on CPU: two gloo processes, a tiny Llama loaded with
``from_pretrained(path, distributed_config=DistributedConfig(tp_size=2))`` (transformers' own TP plan).

kernelstack runs no parallel engine of its own: each rank runs transformers' sharded model, the passes keep
its collectives, and the result must equal the unsharded model's in fp32, on every rank. One pair of processes
runs every scenario (spawning costs most of the time) and writes what it saw; the tests below judge it.

The model has 8 query / 4 KV heads, so a rank holds 4 / 2: a KV pool sized from the global 4 KV heads cannot
take a rank's 2 by broadcasting (with 2 global KV heads, 1 local head broadcasts into both slots and hides it).
"""

import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import time
import traceback

from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import transformers

import ksbackend

from ksbackend.models import build_model
from ksbackend.models import left_pad
from ksbackend.models import tiny_config
from passes import GraphPass

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
CONFIG = {"num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 8}  # hidden 64: 4 q / 2 kv heads per rank
PROMPTS = (5, 9, 3)
NEW_TOKENS = 12
CHAINS = ("rope_cos_sin", "rope", "attention", "rms_norm", "act_and_mul")  # the rewrites a sharded graph must keep
RUN_TIMEOUT_S = 240  # both ranks together; a run takes about 30 s on 2 cores
COLLECTIVE_TIMEOUT_S = 120  # gloo gives up on a collective a rank never joins, so a stuck rank ends by itself


def _unavailable() -> str | None:
    """Why transformers' tensor parallelism cannot run here, or None."""
    if not dist.is_available() or not dist.is_gloo_available():
        return "torch is built without torch.distributed / gloo"
    if not hasattr(transformers, "DistributedConfig"):
        return f"transformers {transformers.__version__} has no DistributedConfig"
    if not getattr(transformers.LlamaConfig, "base_model_tp_plan", None):
        return f"transformers {transformers.__version__} has no tensor-parallel plan for Llama"
    if importlib.util.find_spec("accelerate") is None:
        # from_pretrained turns a TP load into device_map={"": cpu}, which transformers refuses without accelerate
        return "transformers' tensor-parallel loading needs accelerate (pip install accelerate)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(workdir: Path, port: int) -> list[int | None]:
    """Start every rank (torchrun's environment variables), wait for all within the deadline, kill stragglers;
    returns the exit codes (None: killed at the deadline). Each rank's output goes to rank<N>.log."""
    with contextlib.ExitStack() as stack:
        procs = []
        for rank in range(WORLD):
            # CPU ranks even on a GPU host: transformers puts the TP mesh on the accelerator it detects
            env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                       LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
                       TRITON_INTERPRET="1",
                       PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
            log = stack.enter_context(open(workdir / f"rank{rank}.log", "w"))
            procs.append(subprocess.Popen([sys.executable, __file__, str(workdir)], env=env, cwd=ROOT, stdout=log,
                                          stderr=subprocess.STDOUT))
        deadline = time.monotonic() + RUN_TIMEOUT_S
        codes = []
        for proc in procs:
            try:
                codes.append(proc.wait(timeout=max(1.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                codes.append(None)
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        return codes


def _launch(workdir: Path) -> list[dict]:
    """Run the ranks on a fresh port (once more on another if it was taken meanwhile); each rank's results."""
    for attempt in range(2):
        codes = _run_ranks(workdir, _free_port())
        logs = [(workdir / f"rank{r}.log").read_text() for r in range(WORLD)]
        if attempt == 0 and any("address already in use" in text.lower() for text in logs):
            continue
        break
    results = []
    for rank, code in enumerate(codes):
        path = workdir / f"rank{rank}.pt"
        if code != 0 or not path.exists():
            tail = "\n".join(logs[rank].splitlines()[-40:])
            status = f"was killed after {RUN_TIMEOUT_S} s" if code is None else f"exited with {code}"
            pytest.fail(f"rank {rank} {status}; its log ends:\n{tail}")
        results.append(torch.load(path, weights_only=False))
    for result in results:
        if "error" in result:
            pytest.fail(f"rank {result['rank']} failed:\n{result['error']}")
    return results


@pytest.fixture(scope="module")
def tp_run(tmp_path_factory):
    """The unsharded reference (computed here), then both ranks' results on the same inputs."""
    reason = _unavailable()
    if reason:
        pytest.skip(reason)
    workdir = tmp_path_factory.mktemp("tensor_parallel")
    model = build_model(tiny_config("llama", **CONFIG))
    model.save_pretrained(workdir / "model")
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (2, 9), generator=generator)
    prompts, mask = left_pad([torch.randint(3, model.config.vocab_size, (n,), generator=generator) for n in PROMPTS])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    generated = model.generate(prompts, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    torch._dynamo.reset()
    ksbackend.reset()
    with torch.no_grad():
        torch.compile(model, backend="kernelstack", options={"executor": "fx"})(input_ids=ids)
    matched = {name: ksbackend.explain().matched(name) for name in CHAINS}
    torch.save({"ids": ids, "prompts": prompts, "mask": mask}, workdir / "inputs.pt")
    results = _launch(workdir)
    return {"logits": logits, "generated": generated, "matched": matched, "layers": model.config.num_hidden_layers,
            "results": results}


def test_sharded_model_holds_its_share_of_the_heads(tp_run):
    for r in tp_run["results"]:
        assert r["k_proj"] == ("DTensor", 2 * CONFIG["head_dim"]), r["k_proj"]  # transformers really sharded it
        assert r["local_heads"] == (4, 2)
        for q, k in r["attention_shapes"]:  # what the attention rewrite saw: this rank's heads only
            assert q[1] == 4 and k[1] == 2, (q, k)


def test_compiled_sharded_forward_matches_unsharded_logits(tp_run):
    for r in tp_run["results"]:
        where = f"rank {r['rank']} (transformers {r['transformers']})"
        torch.testing.assert_close(r["logits"], tp_run["logits"], rtol=1e-5, atol=1e-5, msg=lambda m, w=where: f"{w}: {m}")


def test_passes_rewrite_the_sharded_graph_and_keep_its_collectives(tp_run):
    layers = tp_run["layers"]
    for r in tp_run["results"]:
        assert r["matched"] == tp_run["matched"], r["explain"]  # every chain the unsharded graph had
        (collectives,) = r["collectives"]  # one graph, no graph break at a collective
        # o_proj and down_proj end in dist.all_reduce: Dynamo's functional all_reduce, kept in the final graph
        assert collectives.get("_c10d_functional.all_reduce") == 2 * layers, collectives
        # lm_head ("colwise_gather_output") gathers its vocabulary shards through DTensor
        assert any(name.startswith("DTensor.redistribute all_gather") for name in collectives), collectives
        if r["tp_plan"].get("model.embed_tokens") == "embedding_rowwise":  # vocab-parallel: 5.24 yes, 5.17 no
            assert any(name.startswith("DTensor.redistribute all_reduce") for name in collectives), collectives


def test_explain_report_shows_the_collectives_kept(tp_run):
    layers = tp_run["layers"]
    for r in tp_run["results"]:
        assert r["report_collectives"] and r["report_collectives"][0], r["explain"]
        assert r["report_collectives"][0].get("_c10d_functional.all_reduce") == 2 * layers
        assert "_c10d_functional.all_reduce" in r["explain"], r["explain"]


def test_optimized_generate_matches_unsharded_hf_on_every_rank(tp_run):
    for r in tp_run["results"]:
        assert "generate_error" not in r, f"rank {r['rank']}: {r['generate_error']}"
    first, *others = tp_run["results"]
    assert all(torch.equal(r["generated"], first["generated"]) for r in others)  # every rank returns the same
    for r in tp_run["results"]:
        assert r["pool_kv_heads"] == 2  # each rank's pool holds its own heads only
        assert torch.equal(r["generated"], tp_run["generated"]), (r["rank"], r["generated"], tp_run["generated"])
        for ops in r["generate_ops"]:  # prefill and decode: every layer's attention over the pool (possibly fused)
            assert sum(n for op, n in ops.items() if "paged_attention" in op) == tp_run["layers"], r["generate_explain"]


# -- one rank (this file run as a script by _launch) ----------------------------------------------------------
class _GraphProbe(GraphPass):
    """An extra pass that looks at the final graph (it runs after the built-in passes) and changes nothing."""

    name = "tp_probe"

    def __init__(self):
        self.collectives, self.attention_shapes = [], []

    def run(self, gm, result):
        from ksbackend.distributed import collective_ops
        from passes.base import kernelstack_op
        from passes.base import shape_of

        self.collectives.append(collective_ops(gm))
        self.attention_shapes += [(shape_of(n.args[0]), shape_of(n.args[1])) for n in gm.graph.nodes
                                  if kernelstack_op(n) == "kernelstack::attention"]


def _rank_main(workdir: Path, result: dict) -> None:
    from ksbackend.distributed import local_attention_heads

    inputs = torch.load(workdir / "inputs.pt")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        workdir / "model", distributed_config=transformers.DistributedConfig(tp_size=WORLD), dtype=torch.float32,
        attn_implementation="sdpa").eval()
    weight = model.model.layers[0].self_attn.k_proj.weight
    result["k_proj"] = (type(weight).__name__, (weight.to_local() if hasattr(weight, "to_local") else weight).shape[0])
    result["local_heads"] = local_attention_heads(model)
    result["tp_plan"] = dict(model.tp_plan)

    probe = _GraphProbe()
    compiled = torch.compile(model, backend="kernelstack", options={"executor": "fx", "extra_passes": [probe]})
    with torch.no_grad():
        result["logits"] = compiled(input_ids=inputs["ids"]).logits
    report = ksbackend.explain()
    result.update(collectives=probe.collectives, attention_shapes=probe.attention_shapes, explain=report.to_text(),
                  matched={name: report.matched(name) for name in CHAINS},
                  report_collectives=[getattr(g, "collectives", None) for g in report.graphs])

    torch._dynamo.reset()
    ksbackend.optimize(model, backend_options={"executor": "fx"})
    try:
        result["generated"] = model.generate(inputs["prompts"], attention_mask=inputs["mask"],
                                             max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    except Exception as exc:  # noqa: BLE001  (every rank fails alike, before its next collective: no hang)
        result["generate_error"] = f"{type(exc).__name__}: {exc}"
    engine = model._kernelstack_engine
    if engine._runtime is not None:
        result["pool_kv_heads"] = engine.runner.pool.num_kv_heads
    report = ksbackend.explain(model)
    result.update(generate_explain=report.to_text(), generate_ops=[g.ops for g in report.graphs])


def _worker(workdir: Path) -> None:
    rank = int(os.environ["RANK"])
    result = {"rank": rank, "transformers": transformers.__version__}
    dist.init_process_group("gloo", timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        _rank_main(workdir, result)
    except Exception:  # noqa: BLE001  (reported by the parent, with the traceback)
        result["error"] = traceback.format_exc()
    finally:
        torch.save(result, workdir / f"rank{rank}.pt")
        dist.destroy_process_group()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
