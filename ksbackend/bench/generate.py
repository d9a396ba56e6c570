"""``model.generate`` end to end, systems side by side in one process: HF eager, HF static cache +
torch.compile, kernelstack, and kernelstack with one layer switched off at a time.

Per system: generate ms/token (prefill included), decode-only ms/token (two generate lengths differenced,
so prefill and per-call setup cancel), tokens/s, bandwidth utilisation of the decode step (weights + KV
read per step over the time, against the copy bandwidth of this run), first-call time and peak memory.
For kernelstack also the decode graph replayed alone and a profiler's kernel count and summed kernel time:
what the GPU does per step, beside what generate takes (the difference is what the host adds).
"""

import contextlib
import gc
import os
import time

import torch

from .common import table
from .common import wall

SHORT, LONG = 16, 144  # decode-only time per token = (t(LONG) - t(SHORT)) / (LONG - SHORT)
# The side-by-side: HF's two ways, kernelstack, and kernelstack with one layer off at a time. The rest are
# developers' A/Bs of one choice each (``--systems all`` or by name).
DEFAULT_SYSTEMS = ("hf-eager", "hf-static", "kernelstack", "no-graphs", "no-fused-kernels", "no-flashinfer")
SYSTEMS = DEFAULT_SYSTEMS + ("kernelstack-sampling", "triton-decode", "xqa-decode", "cublas-gemm", "no-pdl",
                             "gemv-prologue", "torch-step")
MODELS = ("llama-3.2-1b", "llama-3.1-8b", "qwen2.5-7b", "mistral-7b", "llama-135m")  # ``--model all``
SAMPLING = dict(do_sample=True, temperature=0.7, top_k=50, top_p=0.9)
VARIANTS = {"kernelstack": {}, "kernelstack-sampling": {}, "no-graphs": {"cuda_graphs": False},
            "no-fused-kernels": {"backend_options": {"disable_passes": ["rope_cos_sin", "rope", "rms_norm",
                                                                        "act_and_mul"]}},
            "no-flashinfer": {"attention": "reference"}, "triton-decode": {"decode_kernel": "triton"},
            "xqa-decode": {"decode_kernel": "xqa"}, "cublas-gemm": {}, "no-pdl": {}, "gemv-prologue": {},
            "torch-step": {}}
# systems that are kernelstack with an environment switch, set while they compile, capture and run
ENVIRONMENT = {"cublas-gemm": {"KERNELSTACK_SMALL_M_GEMV": "0"}, "no-pdl": {"KERNELSTACK_PDL": "0"},
               "gemv-prologue": {"KERNELSTACK_GEMV_PROLOGUE": "1"}, "torch-step": {"KERNELSTACK_STEP_KERNELS": "0"}}
# their decode graphs are profiled
REPLAYED = ("kernelstack", "triton-decode", "xqa-decode", "cublas-gemm", "no-pdl", "gemv-prologue", "torch-step")


def load(name):
    """A model by the benchmark's name (real shapes, random weights) or a local checkpoint directory."""
    from transformers import AutoModelForCausalLM

    from ksbackend.models import build_model
    from ksbackend.models import real_config

    if os.path.isdir(name):
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.bfloat16).to("cuda").eval()
    else:
        model = build_model(real_config(name), dtype=torch.bfloat16, device="cuda")
    model.generation_config.eos_token_id = None  # every system generates exactly the asked number of tokens
    return model


def scenario_prompts(model, batch, ragged):
    from ksbackend.models import left_pad

    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(64, 1025, (batch,), generator=gen).tolist() if ragged else [128] * batch
    rows = [torch.randint(3, model.config.vocab_size, (n,), generator=gen) for n in lengths]
    return (*left_pad(rows, device="cuda"), lengths)


def timed_generate(model, ids, mask, new_tokens, **extra):
    """One call, timed, after collecting Python's garbage: a first call leaves millions of compile-time objects,
    and a full collection inside a timed 16-token call would skew the difference of two lengths the decode estimate
    rests on (the suspected cause of one H100 run's 16-token call 45 ms slow: batch-32 decode 1.41 ms against a
    1.70 ms replay; the warm run's 1.69 ms agreed)."""
    kwargs = dict(dict(attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0), **extra)
    gc.collect()
    return wall(lambda: model.generate(ids, **kwargs))


def measure(model, ids, mask, lengths=(SHORT, LONG), **extra):
    """First-call seconds, generate ms/token at the long length, decode-only ms/token, and the long output. The
    long length runs first: HF's static cache is sized by the call's max length and kept for any shorter call,
    so both lengths then run one compiled graph (short first would compile twice)."""
    few, many = lengths
    _, first = timed_generate(model, ids, mask, many, **extra)  # compiles, captures, warms up
    timed_generate(model, ids, mask, few, **extra)
    _, short = timed_generate(model, ids, mask, few, **extra)
    out, long = timed_generate(model, ids, mask, many, **extra)
    decode = (long - short) / (many - few)
    return dict(first_s=first, generate_ms=1e3 * long / many, decode_ms=1e3 * decode,
                prefill_ms=1e3 * (short - few * decode)), out


def decode_bytes(model, lengths, step):
    """Bytes one decode step must read: every weight once, plus the KV of every sequence so far."""
    from ksbackend.models import head_dim
    from ksbackend.runtime.kv_pool import KVPool

    cfg = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    per_token = KVPool.token_bytes(cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim(cfg), model.dtype)
    return weights + per_token * sum(n + step for n in lengths)


def replay_alone(model, lengths, steps=64):
    """The captured decode graph replayed back to back over a live batch of ``lengths``-token sequences:
    ms per replay, kernels per replay and their summed time (profiler)."""
    from ksbackend.runtime.model_runner import NewRow
    from ksbackend.runtime.model_runner import RowParams
    from ksbackend.runtime.model_runner import Selection

    engine = model._kernelstack_engine
    runner = engine.runner
    graphs = runner.graphs.get(Selection())
    if graphs is None:
        return None
    gen = torch.Generator().manual_seed(1)
    rows = [NewRow(("bench", i), torch.randint(3, model.config.vocab_size, (n,), generator=gen).tolist(), RowParams())
            for i, n in enumerate(lengths)]
    n = len(rows)
    with engine._lock, torch.inference_mode():
        for row in rows:
            runner.pool.reserve(row.seq_id, len(row.tokens) + 3 * steps + 8)
        try:
            runner.add_rows(rows, *runner.prefill(rows, Selection()))
            runner.decode(n, Selection())  # captures if needed
            bucket = graphs.bucket_for(n)
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                graphs.run(bucket)
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end) / steps
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(8):
                    graphs.run(bucket)
                torch.cuda.synchronize()
            kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                       and e.device_time > 0 and "Memcpy" not in e.name and "Memset" not in e.name]
            return dict(replay_ms=ms, kernels=len(kernels) / 8, kernel_ms=sum(e.device_time for e in kernels) / 8e3,
                        names=_by_name(kernels, replays=8))
        finally:
            runner.keep_rows([])
            for row in rows:
                runner.pool.release(row.seq_id)


def _by_name(kernels, replays):
    """Per kernel name: [launches, ms] per replay, most time first (the JSON keeps all of them)."""
    totals = {}
    for e in kernels:
        count, ms = totals.get(e.name[:80], (0.0, 0.0))
        totals[e.name[:80]] = [count + 1 / replays, ms + e.device_time / 1e3 / replays]
    return dict(sorted(totals.items(), key=lambda kv: -kv[1][1]))


def run_model(bw, out, results, name, batches, systems, spent):
    """Every system over every batch. Systems are the outer loop: each compiles (and captures) once for all the
    batches instead of once per batch, which is most of a cold run's time. ``spent`` adds up the seconds per system
    (and the model loads), so a run's total says where it went."""
    import ksbackend

    started = time.perf_counter()
    model = load(name)
    spent["load models"] = spent.get("load models", 0.0) + time.perf_counter() - started
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    scenarios = []
    for batch in batches:
        ragged = batch == 32
        ids, mask, lengths = scenario_prompts(model, batch, ragged)
        label = f"{batch} / {'ragged 64..1024' if ragged else '128'}"
        scenarios.append(dict(ids=ids, mask=mask, lengths=lengths, label=label, reference=None,
                              row=dict(model=name, batch=batch, scenario=label, weights_bytes=weights,
                                       step_bytes=decode_bytes(model, lengths, LONG // 2), copy_bandwidth=bw,
                                       device=torch.cuda.get_device_name(), systems={})))
    for system in systems:
        extra = dict(cache_implementation="static") if system == "hf-static" else {}
        if system == "kernelstack-sampling":
            extra = SAMPLING
        started = time.perf_counter()
        with _configured(model, system):
            for index, sc in enumerate(scenarios):
                label, measured = sc["label"], sc["row"]["systems"]
                print(f"{name} {label} {system}: measuring (a first call compiles and captures)", flush=True)
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                try:
                    with fresh_compile(system):
                        m, output = measure(model, sc["ids"], sc["mask"], **extra)
                except Exception as exc:  # one system failing must not hide the others
                    print(f"{name} {label} {system}: failed: {type(exc).__name__}: {exc}", flush=True)
                    measured[system] = None
                    continue
                # after the first batch size a system is warm (compiled, its KV pool and earlier graphs still held)
                m["warm"] = index > 0
                m["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
                m["bw_util"] = sc["row"]["step_bytes"] / (m["decode_ms"] * 1e-3) / bw
                if system == "hf-eager":
                    sc["reference"] = output
                elif sc["reference"] is not None and system != "kernelstack-sampling":
                    m["same_tokens"] = float((output == sc["reference"]).all(dim=1).float().mean())
                if system in REPLAYED:
                    m["replay"] = replay_alone(model, sc["lengths"])
                    if m["replay"]:
                        print(f"{system} kernels per replay:", m["replay"]["names"], flush=True)
                if system == "kernelstack":
                    m["report"] = str(ksbackend.explain(model))
                    print(m["report"], flush=True)
                measured[system] = m
                print(f"{name} {label} {system}: {_summary(m)}", flush=True)
        spent[system] = spent.get(system, 0.0) + time.perf_counter() - started
    results.extend(sc["row"] for sc in scenarios)
    del model
    gc.collect()
    torch.cuda.empty_cache()


@contextlib.contextmanager
def fresh_compile(system):
    """HF static compiles each scenario as a fresh process running only that scenario would: a static graph.
    HF's compile config leaves ``dynamic`` to Dynamo, so in one process the second scenario (a new batch size and
    static-cache length) would compile a dynamic-shape graph, and Dynamo's on-disk profile (automatic-dynamic PGO)
    would carry that into later runs: the baseline a scenario measured would depend on what ran before it."""
    if system != "hf-static":
        yield
        return
    torch.compiler.reset()  # (also frees the earlier scenario's CUDA graphs)
    try:
        with torch._dynamo.config.patch(automatic_dynamic_local_pgo=False):
            yield
    finally:
        torch.compiler.reset()


@contextlib.contextmanager
def _configured(model, system):
    """``model`` as ``system`` runs it (optimized with the variant's options and environment: ``cublas-gemm`` keeps
    every GEMM on cuBLAS, to show the small-M Triton GEMV's share of the step; ``no-pdl`` launches the Triton
    kernels without programmatic dependent launch; ``gemv-prologue`` runs each norm and SiLU*mul in the GEMV after
    it; ``torch-step`` runs the step's head and tail as torch ops), restored afterwards, also when it fails."""
    import ksbackend

    environment = ENVIRONMENT.get(system, {})
    saved = {name: os.environ.get(name) for name in environment}
    optimized = False
    try:
        os.environ.update(environment)
        if system in VARIANTS:
            ksbackend.optimize(model, **VARIANTS[system])
            optimized = True
        yield
    finally:
        if optimized:
            ksbackend.restore(model)  # (frees the runtime's KV pool and graphs at once)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _summary(m):
    """One line per system, printed as it is measured, so a run cut short still shows what it measured."""
    flat = dict(m, **{f"replay_{k}": v for k, v in (m.get("replay") or {}).items() if k != "names"})
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in flat.items()
                     if k not in ("report", "replay"))


def tables(out, results):
    def main_rows():
        for r in results:
            s, bw = r["systems"], r["copy_bandwidth"]
            base = s.get("kernelstack")
            for system, m in s.items():
                if m is None:
                    yield [r["model"], r["scenario"], system, "failed", "", "", "", "", "", "", ""]
                    continue
                vs = lambda key: (f"{s[key]['decode_ms'] / m['decode_ms']:.2f}x"  # noqa: E731
                                  if s.get(key) and system != key else "")
                yield [r["model"], r["scenario"], system, f"{m['generate_ms']:.2f}", f"{m['decode_ms']:.2f}",
                       f"{1e3 * int(r['scenario'].split()[0]) / m['decode_ms']:.0f}", f"{m['bw_util']:.0%}",
                       vs("hf-eager"), vs("hf-static"),
                       f"{m['first_s']:.1f}" + (" (warm)" if m.get("warm") else ""), f"{m['peak_gib']:.1f}"]
            if base and base.get("replay"):
                rp = base["replay"]
                yield [r["model"], r["scenario"], "kernelstack graph replayed alone", "", f"{rp['replay_ms']:.2f}", "",
                       f"{r['step_bytes'] / (rp['replay_ms'] * 1e-3) / bw:.0%}", "", "",
                       f"{rp['kernels']:.0f} kernels, {rp['kernel_ms']:.2f} ms summed",
                       f"generate / replay {base['decode_ms'] / rp['replay_ms']:.2f}x"]

    table(out, "model.generate, bf16, greedy (kernelstack-sampling: temperature 0.7, top-k 50, top-p 0.9); "
               "decode ms/token = (t(144 new) - t(16 new)) / 128",
          ["model", "batch / prompts", "system", "generate ms/token (prefill incl.)", "decode ms/token", "tokens/s",
           "decode BW util", "speedup vs HF eager", "speedup vs HF static+compile",
           "first call s (warm: compiled at an earlier batch size)", "peak GiB"],
          main_rows())
    kernel_rows = [[r["model"], r["scenario"], name, f"{ms:.3f}"] for r in results
                   if (r["systems"].get("kernelstack") or {}).get("replay")
                   for name, (_, ms) in list(r["systems"]["kernelstack"]["replay"]["names"].items())[:6]]
    table(out, "Where a kernelstack decode replay spends its time (top kernels, ms per step)",
          ["model", "batch / prompts", "kernel", "ms"], kernel_rows)


def baseline_check(out, name="llama-3.2-1b"):
    """Why the in-process HF eager baseline can differ from a plain script: HF eager generate (batch 1, 128-token
    prompt, 64 new tokens) timed as a plain script does and as this benchmark does, in this process, in a fresh
    process that never imports kernelstack, and a host profile of where one eager step's time goes."""
    import json
    import subprocess
    import sys

    from ksbackend.models import real_config

    model = load(name)
    ids, mask, _ = scenario_prompts(model, 1, False)
    variants = {"plain (max_new_tokens only)": dict(max_new_tokens=64),
                "bench kwargs (mask, pad, greedy)": dict(attention_mask=mask, max_new_tokens=64, do_sample=False,
                                                          pad_token_id=0)}
    rows = []
    for label, kwargs in variants.items():
        model.generate(ids, **dict(kwargs, max_new_tokens=4))
        _, t = wall(lambda: model.generate(ids, **kwargs))
        rows.append(["this process", label, f"{1e3 * t / 64:.2f}"])
    # A fresh process that never imports kernelstack: the same 64-token call twice (the first meets new KV lengths,
    # the second repeats them), then new lengths with PyTorch's cuDNN attention switched off.
    script = ("import json, sys, time, torch, transformers as tf; d = json.loads(sys.argv[1]); "
              "c = tf.AutoConfig.for_model(d.pop('model_type'), **d)\n"
              "with torch.device('cuda'): m = tf.AutoModelForCausalLM.from_config(c, dtype=torch.bfloat16).eval()\n"
              "def t(ids):\n torch.cuda.synchronize(); s = time.perf_counter(); m.generate(ids, max_new_tokens=64); "
              "torch.cuda.synchronize(); return 1e3 * (time.perf_counter() - s) / 64\n"
              "ids = torch.randint(3, c.vocab_size, (1, 128), device='cuda'); m.generate(ids, max_new_tokens=4)\n"
              "first, again = t(ids), t(ids); torch.backends.cuda.enable_cudnn_sdp(False)\n"
              "print(json.dumps([first, again, t(torch.randint(3, c.vocab_size, (1, 300), device='cuda'))]))")
    fresh = subprocess.run([sys.executable, "-c", script, json.dumps(real_config(name).to_dict())],
                           capture_output=True, text=True, timeout=300)
    labels = ("plain, first call (new KV lengths)", "plain, same call again",
              "plain, new KV lengths, cuDNN attention off")
    times = json.loads(fresh.stdout.strip().splitlines()[-1]) if fresh.returncode == 0 else None
    for label, value in zip(labels, times or [f"failed: {fresh.stderr[-300:]}"] * 3):
        rows.append(["fresh process, transformers only", label, f"{value:.2f}" if times else value])
    table(out, f"HF eager baseline check ({name}, batch 1, 64 new tokens, ms/token)", ["where", "call", "ms/token"],
          rows)
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        model.generate(ids, **dict(variants["bench kwargs (mask, pad, greedy)"], max_new_tokens=8))
        torch.cuda.synchronize()
    profile = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=50)
    out.append(f"\nHost profile of one HF eager generate (8 new tokens), by self CPU time:\n```\n{profile}\n```")
    print(out[-1], flush=True)


def run(bw, out, models, batches, systems, json_path=None, gpus=1):
    """Every model, in this process, or with ``gpus`` > 1 one process per model on a GPU of its own."""
    start = time.perf_counter()
    if gpus > 1 and len(models) > 1:
        results, spent, per_model = run_on_gpus(out, models, batches, systems, gpus)
    else:
        results, spent, per_model = [], {}, ""
        for name in models:
            run_model(bw, out, results, name, batches, systems, spent)
    tables(out, results)
    out.append(f"\nGenerate section: {time.perf_counter() - start:.0f} s for {len(models)} models x {len(batches)} "
               f"batch sizes x {len(systems)} systems{per_model}. By system (compiles, captures and timed calls"
               + (", summed over the GPUs" if per_model else "") + "): "
               + ", ".join(f"{key} {seconds:.0f} s" for key, seconds in spent.items()) + ".")
    print(out[-1], flush=True)
    if json_path:
        import json

        with open(json_path, "w") as f:
            json.dump(dict(copy_bandwidth=bw, spent=spent, results=_jsonable(results)), f, indent=1)
    return results


def run_on_gpus(out, models, batches, systems, gpus):
    """Each model in a process of its own on a GPU of its own, up to ``gpus`` at once, the next model taking the
    first GPU freed. A model's systems still share one process and one GPU, so its ratios keep their meaning; the
    whole benchmark then takes about as long as its slowest model instead of the sum (most of a cold run is HF
    static's own compiles, one per batch size, which nothing in one process can overlap).
    Returns (rows in ``models`` order, seconds per system summed, the per-model wall times as a sentence)."""
    import json
    import subprocess
    import sys
    import tempfile

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = visible.split(",")[:gpus] if visible else [str(i) for i in range(gpus)]
    workdir = tempfile.mkdtemp(prefix="ksbench-")
    torch.cuda.empty_cache()  # this process's cached blocks (the bandwidth test's 2 GiB) would sit on a child's GPU
    print(f"{len(models)} models over GPUs {','.join(devices)}, one process each; logs in {workdir}", flush=True)
    pending, running, walls, spent, by_model = list(enumerate(models)), {}, {}, {}, {}
    try:
        while pending or running:
            for device in [d for d in devices if d not in running][:len(pending)]:
                index, name = pending.pop(0)
                stem = os.path.join(workdir, f"{index}-{os.path.basename(name.rstrip('/'))}")
                command = [sys.executable, "-m", "ksbackend.bench", "generate", "--gpus", "1", "--model", name,
                           "--systems", ",".join(systems), "--json", stem + ".json"]
                command += [arg for b in batches for arg in ("--batch", str(b))]
                with open(stem + ".log", "w") as log:
                    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                               env=dict(os.environ, CUDA_VISIBLE_DEVICES=device))
                running[device] = (process, index, name, stem, time.perf_counter())
                print(f"{name}: started on GPU {device}", flush=True)
            time.sleep(0.5)
            for device, (process, index, name, stem, started) in list(running.items()):
                if process.poll() is None:
                    continue
                del running[device]
                walls[index] = f"{name} {time.perf_counter() - started:.0f} s"
                try:
                    with open(stem + ".json") as f:
                        done = json.load(f)
                except (OSError, ValueError):
                    with open(stem + ".log") as f:
                        tail = f.read()[-2000:]
                    out.append(f"\n{name} failed on GPU {device} (exit {process.returncode}); the end of {stem}.log:"
                               f"\n```\n{tail}\n```")
                    print(out[-1], flush=True)
                    continue
                by_model[index] = done["results"]
                for key, seconds in done["spent"].items():
                    spent[key] = spent.get(key, 0.0) + seconds
                print(f"{name}: done on GPU {device}: {walls[index]}", flush=True)
    finally:  # interrupted (a timeout, ^C): no child keeps a GPU busy after this process
        for process, *_ in running.values():
            process.kill()
    results = [row for index in sorted(by_model) for row in by_model[index]]
    per_model = ", in parallel (" + ", ".join(walls[index] for index in sorted(walls)) + ")"
    return results, spent, per_model


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value

