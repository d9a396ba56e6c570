"""kernelstack benchmarks: every number is a ratio against baselines measured in the same process, plus
bandwidth utilisation against the device-to-device copy bandwidth measured in the same run.
Results, with the commands that made them: docs/benchmarks.md.

    python -m ksbackend.bench generate                          # Llama-3.2-1B, batch 1 and 32, the six systems
    python -m ksbackend.bench generate --model all              # the whole benchmark: every model below
                                                                # (on several GPUs, one model per GPU at once)
    python -m ksbackend.bench generate --systems kernelstack,xqa-decode   # a developer's A/B (--systems all)
    python -m ksbackend.bench generate --model llama-3.1-8b --model /path/to/checkpoint --batch 1 --batch 64
    python -m ksbackend.bench overhead --png docs/overhead.png   # decode step split, batch 1..256
    python -m ksbackend.bench attention                         # decode kernels at anchor and model shapes, fp8
    python -m ksbackend.bench kernels                           # add+RMSNorm, RoPE, SiLU*mul, the sampler
    python -m ksbackend.bench startup --model llama-3.1-8b      # first token, cold and in a second process
    python -m ksbackend.bench startup --model llama-3.1-8b --cache traces   # one compile-cache mode only
    python -m ksbackend.bench agreement                         # greedy agreement, teacher-forced KL vs fp32
    python -m ksbackend.bench all

Models: llama-3.2-1b, llama-3.1-8b, qwen2.5-7b, mistral-7b, llama-135m, ... (ksbackend.models.REAL_MODELS;
real shapes, random weights) or a local checkpoint directory.
"""

import argparse
import sys

import torch

SECTIONS = ("generate", "overhead", "attention", "kernels", "agreement", "baseline", "startup")


def main(argv=None):
    from . import agreement
    from . import attention
    from . import generate
    from . import kernels
    from . import overhead
    from . import startup
    from .common import copy_bandwidth

    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m ksbackend.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("all",) + SECTIONS)
    parser.add_argument("--model", action="append",
                        help="a model name or checkpoint path (repeatable); generate: all = "
                             + ", ".join(generate.MODELS))
    parser.add_argument("--batch", type=int, action="append", help="generate: batch sizes (repeatable; default 1, 32)")
    parser.add_argument("--systems", default=",".join(generate.DEFAULT_SYSTEMS),
                        help=f"generate: comma-separated, from {','.join(generate.SYSTEMS)}, or all "
                             f"(default: {','.join(generate.DEFAULT_SYSTEMS)})")
    parser.add_argument("--gpus", type=int, default=torch.cuda.device_count(),
                        help="generate: models run in parallel, one process per GPU, on this many GPUs "
                             "(default: every visible GPU; 1 runs them one after another in this process)")
    parser.add_argument("--out", help="also write the markdown tables here")
    parser.add_argument("--json", help="generate: also write every measurement as JSON here")
    parser.add_argument("--cache", action="append", choices=startup.MODES,
                        help="startup: what the compile cache holds (repeatable; default both)")
    parser.add_argument("--png", default="docs/overhead.png", help="overhead: where the picture goes")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("the benchmarks measure GPU kernels: run them on a CUDA machine")
    bw = copy_bandwidth()
    out = [f"Device: {torch.cuda.get_device_name()}, torch {torch.__version__}; copy bandwidth measured in this run: "
           f"{bw / 1e12:.2f} TB/s (bytes read + written). Command: `python -m ksbackend.bench {' '.join(argv)}`"]
    print(out[0], flush=True)
    chosen = SECTIONS if args.what == "all" else (args.what,)
    if "baseline" in chosen:
        generate.baseline_check(out)
    if "startup" in chosen:
        startup.run(out, args.model or ["llama-3.2-1b"], args.cache or startup.MODES)
    if "generate" in chosen:
        systems = generate.SYSTEMS if args.systems == "all" else [s for s in args.systems.split(",") if s]
        unknown = set(systems) - set(generate.SYSTEMS)
        if unknown:
            parser.error(f"unknown systems {sorted(unknown)}; choose from {', '.join(generate.SYSTEMS)} or all")
        if not 1 <= args.gpus <= torch.cuda.device_count():
            parser.error(f"--gpus {args.gpus}: this machine shows {torch.cuda.device_count()} GPUs")
        models = [m for name in args.model or ["llama-3.2-1b"] for m in (generate.MODELS if name == "all" else [name])]
        generate.run(bw, out, models, args.batch or [1, 32], systems, args.json, args.gpus)
    if "overhead" in chosen:
        overhead.run(bw, out, png=args.png)
    if "attention" in chosen:
        attention.run(bw, out)
    if "kernels" in chosen:
        kernels.run(bw, out)
    if "agreement" in chosen:
        agreement.run(bw, out)
    text = "\n".join(out)
    print("\n" + text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
