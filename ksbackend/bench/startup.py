"""Time to the first token in a fresh process: cold (empty caches), then a second process with the same
model and options (the cache the first one filled), for each way the compile cache can serve: with Dynamo's traces
stored too (the default), and Inductor's artifacts alone (``trace_cache=False``: Dynamo traces in every process).
Each process loads the model, optimizes it and times its first ``generate`` of one new token at batch 1 (prefill
only), then a call of 16 (the decode path's compile and capture); the explain report's compile-cache and CUDA-graph
lines say where the time went."""

import json
import os
import subprocess
import sys
import tempfile

from .common import table

CHILD = """
import json, sys, time, torch, ksbackend
from ksbackend.bench.generate import load, scenario_prompts
start = time.perf_counter()
model = load(sys.argv[1])
loaded = time.perf_counter() - start
ksbackend.optimize(model, trace_cache=sys.argv[2] == "traces")
ids, mask, _ = scenario_prompts(model, 1, False)
def timed(new):
    torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    return time.perf_counter() - start
first = timed(1)
decode = timed(16)
lines = [l.strip() for l in str(ksbackend.explain(model)).splitlines() if "cache" in l.lower() or "CUDA graphs" in l]
print(json.dumps(dict(load_s=loaded, first_s=first, decode_s=decode, report=lines)))
"""


def first_token(name, cache_dir, mode):
    """One fresh process; every cache it may use (kernelstack's, Inductor's, Triton's) lives under ``cache_dir``."""
    env = dict(os.environ, KERNELSTACK_CACHE_DIR=cache_dir, TORCHINDUCTOR_CACHE_DIR=os.path.join(cache_dir, "inductor"),
               TRITON_CACHE_DIR=os.path.join(cache_dir, "triton"), KERNELSTACK_PROGRESS="0")
    done = subprocess.run([sys.executable, "-c", CHILD, name, mode], capture_output=True, text=True, env=env,
                          timeout=400)
    if done.returncode:
        return dict(error=done.stderr[-400:])
    return json.loads(done.stdout.strip().splitlines()[-1])


MODES = ("traces", "artifacts")  # what the compile cache holds: the traces too (the default), or Inductor's artifacts


def run(out, models=("llama-3.2-1b",), modes=MODES):
    rows = []
    for name in models:
        for mode in modes:
            with tempfile.TemporaryDirectory(prefix="ks-startup-") as cache_dir:
                for label in ("cold (empty cache)", "second process"):
                    r = first_token(name, cache_dir, mode)
                    if "error" in r:
                        cells = ["failed", "", "", r["error"].replace("\n", " ")]
                    else:
                        cells = [f"{r['first_s']:.1f}", f"{r['decode_s']:.1f}", f"{r['load_s']:.1f}",
                                 "; ".join(r["report"])]
                    rows.append([name, mode, label, *cells])
                    print(rows[-1], flush=True)
    table(out, "First token in a fresh process (batch 1, 128-token prompt): seconds from the first generate call",
          ["model", "compile cache holds", "process", "first token s (1 new)", "next call s (16 new)",
           "model load s (not counted)", "report"], rows)
