"""Hugging Face integration: ``ksbackend.optimize(model)`` puts ``model.generate()`` on kernelstack's path.

``torch.compile(model).generate()`` compiles nothing (generate calls the original module), so
``optimize`` replaces the model's ``generate`` with kernelstack's. This module keeps only Hugging
Face's generate semantics; the model runner and the decode loop live in ``runtime/``:
- settings come from transformers' own resolution of the GenerationConfig (its defaults, e.g. top-k 50
  when sampling, max_length 20 when no length is given), and what the fast path runs is read off the
  logits processors and stopping criteria transformers itself would build;
- each row becomes one sequence of real tokens (left padding dropped); rows stop at eos or their length
  limit, and finished rows are padded with HF's pad token, exactly as HF returns them;
- with ``return_dict_in_generate`` and ``output_scores`` / ``output_logits``, the rows run as one batch until all are
  done, finished rows on the pad token as in HF's loop; each step's raw logits are kept on the device, and the
  scores are HF's own logits processors applied to them at the end, over the ids HF's loop held at that step;
- anything the fast path does not implement goes to HF's own ``generate``, with a warning and the reason
  in the explain report.
The runner is built on first use, so ``copy.deepcopy`` of an optimized model gives a model with its own
runner over its own weights; concurrent ``generate`` calls on one model run one after the other.
"""

import contextlib
import copy
import functools
import gc
import logging
import threading
import time
import types
import warnings
import weakref

from dataclasses import dataclass

import torch
import transformers

from transformers import GenerationMixin
from transformers import LogitsProcessorList
from transformers import StoppingCriteriaList
from transformers.generation import GenerateDecoderOnlyOutput
from transformers.generation import logits_process
from transformers.generation import stopping_criteria

from .backend import kernelstack_backend
from .backend import recording_into
from .compile_cache import CompileCache
from .compile_cache import PrecompiledFunction
from .compile_cache import progress
from .config import BackendOptions
from .config import RuntimeOptions
from .distributed import agree_on_min
from .distributed import local_attention_heads
from .models import head_dim
from .report import Recorder
from .runtime.kv_pool import FP8_MAX
from .runtime.kv_pool import KVPool
from .runtime.kv_pool import readable_bytes
from .runtime.model_runner import ModelRunner
from .runtime.model_runner import RowParams
from .runtime.scheduler import Request
from .runtime.scheduler import Scheduler

log = logging.getLogger("ksbackend")
hf_log = transformers.utils.logging.get_logger("transformers.generation.utils")

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma")
ATTN_IMPLEMENTATION = "kernelstack"
CPU_INITIAL_KV_TOKENS = 4096  # the CPU pool starts here and grows as sequences need it
RESERVE_TOKENS = 256  # pages are reserved this many tokens ahead, so the decode loop rarely touches the table
FP8_CALIBRATION = (2, 256)  # sequences x tokens of the fixed probe that sets the fp8 KV scales
FP8_HEADROOM = 4.0  # scale = probe's |max| * headroom / FP8_MAX: e4m3 is floating point, range costs little precision

# Outputs the fast path does not produce (it gives ``sequences``, ``scores`` and ``logits``).
_OUTPUT_SETTINGS = ("output_attentions", "output_hidden_states")
# generate() arguments only Hugging Face's own loop serves.
_HF_ONLY_ARGUMENTS = ("prefix_allowed_tokens_fn", "synced_gpus", "assistant_model", "negative_prompt_ids",
                      "negative_prompt_attention_mask", "custom_generate", "assistant_tokenizer")
_FAST_CRITERIA = (stopping_criteria.MaxLengthCriteria, stopping_criteria.EosTokenCriteria)


def kernelstack_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """HF attention-interface function. The runtime runs the model on one flattened row (batch 1), so
    query is [1, Hq, N, D]; which token belongs to which sequence lives in the forward context."""
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("kernelstack paged attention has no logit soft-capping")
    window = kwargs.get("sliding_window")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = torch.ops.kernelstack.paged_attention(
        query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
        module.layer_idx, float(scale), int(window) - 1 if window else -1)
    return out[None], None


transformers.AttentionInterface.register(ATTN_IMPLEMENTATION, kernelstack_attention)


class _AttentionImplementation:
    """``with``: run ``model`` with another attention implementation (restored on exit)."""

    def __init__(self, model, name):
        self.model, self.name = model, name

    def __enter__(self):
        self.previous = self.model.config._attn_implementation
        self.model.config._attn_implementation = self.name

    def __exit__(self, *exc):
        self.model.config._attn_implementation = self.previous


def optimize(model, **options):
    """Make ``model.generate()`` run through kernelstack (paged KV pool, ragged batches, compiled forward).

    Options (see ``RuntimeOptions``): page_size, max_kv_tokens, kv_memory_fraction, kv_cache_dtype,
    max_batch_size, max_prefill_tokens, decode_buckets, cuda_graphs, decode_kernel, attention, compile_cache,
    trace_cache, backend_options.
    Returns the same model object.
    """
    opts = RuntimeOptions.from_options(options)
    recorder = Recorder()
    model._kernelstack_recorder = recorder
    family = model.config.model_type
    if family not in SUPPORTED_FAMILIES:
        message = (f"kernelstack: model family {family!r} is not supported by the generate integration "
                   f"(supported: {', '.join(SUPPORTED_FAMILIES)}); model.generate stays on Hugging Face's path")
        warnings.warn(message, stacklevel=2)
        recorder.event(message, logging.WARNING)
        return model
    engine = KernelstackGenerate(model, opts, recorder)
    model._kernelstack_engine = engine
    model.generate = engine.generate
    return model


def restore(model):
    """Undo ``optimize``: ``model.generate`` is Hugging Face's again, and the runtime (KV pool, graphs) is freed."""
    engine = model.__dict__.pop("_kernelstack_engine", None)
    if engine is not None:
        del model.generate
        engine._runtime = None
        _free_dropped_runtimes()  # the runner's graphs hold it in cycles
    return model


class KernelstackGenerate:
    """``model.generate`` on kernelstack's path: HF's settings resolved, then the decode loop over the runner."""

    def __init__(self, model, opts: RuntimeOptions, recorder: Recorder):
        self.model, self.opts, self.recorder = model, opts, recorder
        self._runtime = None  # (runner, scheduler), built on first use
        self._lock = threading.Lock()

    def __deepcopy__(self, memo):
        """A copied model gets its own (not yet built) runtime over its own weights, never this one's."""
        return type(self)(copy.deepcopy(self.model, memo), self.opts, copy.deepcopy(self.recorder, memo))

    @property
    def runner(self) -> ModelRunner:
        return self.runtime[0]

    @property
    def runtime(self):
        if self._runtime is None:
            self.compile_cache = CompileCache.for_model(self.model, self.opts.graph_options(),
                                                        enabled=self.opts.compile_cache)
            self._runtime = _build_runtime(self.model, self.opts, self.recorder, self.compile_cache)
        return self._runtime

    def _compiling(self):
        """Around every call that may compile: the compile cache (loads before the first compile, saves after
        any), a progress bar while the first call compiles prefill and decode, and the cache's line in the
        explain report whenever a graph was compiled."""
        stack = contextlib.ExitStack()
        before = len(self.recorder.graphs)

        def report():
            if len(self.recorder.graphs) > before:
                self.recorder.event(self.compile_cache.describe())

        stack.callback(report)  # registered first, so it runs last: after the cache saved
        stack.enter_context(self.compile_cache)
        if not before:
            stack.enter_context(_old_objects_set_aside())
            bar = stack.enter_context(progress(2, "kernelstack: compiling"))
            stack.enter_context(recording_into(types.SimpleNamespace(add_graph=lambda graph: bar.update())))
        return stack

    def generate(self, inputs=None, generation_config=None, **kwargs):
        """Drop-in for ``model.generate``: returns the same [B, prompt + new] token ids as HF (in HF's
        ``GenerateDecoderOnlyOutput``, with its scores and logits, under ``return_dict_in_generate``)."""
        resolved = self._resolve(inputs, generation_config, dict(kwargs))
        if not isinstance(resolved, list):
            with self._lock, torch.inference_mode(), recording_into(self.recorder):
                resolved = self._generate(resolved)
            if not isinstance(resolved, list):
                return resolved
        message = f"kernelstack generate does not implement {', '.join(resolved)}: using Hugging Face's generate"
        warnings.warn(message, stacklevel=2)
        self.recorder.event(message, logging.WARNING)
        with self._lock:  # not during another thread's step on this model: it switches the attention to kernelstack's
            return GenerationMixin.generate(self.model, inputs, generation_config, **kwargs)

    def score(self, prompts, targets):
        """Teacher-forced next-token log-probs along ``targets`` (see ``ModelRunner.score``)."""
        with self._lock, recording_into(self.recorder):
            runner = self.runner
            with self._compiling():
                return runner.score(prompts, targets)

    # -- Hugging Face's semantics ------------------------------------------------------------------------
    def _resolve(self, inputs, generation_config, kwargs):
        """HF's own preparation of the generation config, special tokens, mask, lengths, logits processors and
        stopping criteria; returns either a ``_Call`` the fast path runs or the reasons it cannot run this one."""
        model = self.model
        input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
        attention_mask = kwargs.pop("attention_mask", None)
        user_processors = kwargs.pop("logits_processor", None) or []
        user_criteria = kwargs.pop("stopping_criteria", None) or StoppingCriteriaList()
        streamer, tokenizer = kwargs.pop("streamer", None), kwargs.pop("tokenizer", None)
        reasons = [f"argument {name!r}" for name in _HF_ONLY_ARGUMENTS if kwargs.pop(name, None) is not None]
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
            return reasons + ["inputs other than a 2-D tensor of token ids"]
        # as in GenerationMixin.generate: was a length given anywhere, before defaults fill it in?
        defaults = model.generation_config
        has_default_max_length = (kwargs.get("max_length") is None and defaults.max_length is None
                                  and (generation_config is None or generation_config.max_length is None))
        has_default_min_length = (kwargs.get("min_length") is None and defaults.min_length is None
                                  and (generation_config is None or generation_config.min_length is None))
        gen, model_kwargs = model._prepare_generation_config(generation_config, **kwargs)
        reasons += [f"argument {name!r}" for name in model_kwargs]
        mode = gen.get_generation_mode()
        copies = gen.num_return_sequences or 1
        if mode.value not in ("greedy_search", "sample") or (copies > 1 and mode.value != "sample"):
            reasons.append(f"generation mode {mode.value!r}" + (f" with num_return_sequences={copies}" if copies > 1
                                                               else ""))
        reasons += [f"generation setting {name}={getattr(gen, name)!r}" for name in _OUTPUT_SETTINGS
                    if getattr(gen, name, None)]
        batch, width = input_ids.shape
        if streamer is not None and batch * copies > 1:
            reasons.append("a streamer with more than one sequence")
        model._prepare_special_tokens(gen, attention_mask is not None, device=input_ids.device, batch_size=batch)
        if attention_mask is None:
            attention_mask = model._prepare_attention_mask_for_generation(input_ids, gen, {})
        elif gen._pad_token_tensor is not None and batch > 1 and bool((attention_mask[:, -1] == 0).any()):
            hf_log.warning("A decoder-only architecture is being used, but right-padding was detected! For correct "
                           "generation results, please set `padding_side='left'` when initializing the tokenizer.")
            self.recorder.event("right-padded input: pad tokens dropped, each row continues after its last real token")
        model._prepare_generated_length(gen, has_default_max_length, has_default_min_length, "input_ids", width,
                                        input_ids)
        processors = model._get_logits_processor(gen, input_ids_seq_length=width, encoder_input_ids=input_ids,
                                                 logits_processor=LogitsProcessorList(), device=input_ids.device,
                                                 model_kwargs={**model_kwargs, "attention_mask": attention_mask})
        settings, unsupported = _row_settings(processors, greedy=mode.value == "greedy_search", width=width)
        grammar, others = _grammar(user_processors, model.config.vocab_size)
        reasons += unsupported + [f"logits processor {type(p).__name__}" for p in others]
        criteria = [c for c in model._get_stopping_criteria(gen, user_criteria, tokenizer=tokenizer)
                    if not isinstance(c, _FAST_CRITERIA)]
        if _keeps_steps(gen) and grammar:
            reasons.append("output_scores/output_logits with a grammar (its processor's state cannot be replayed)")
        if _keeps_steps(gen) and criteria and batch * copies > 1:
            reasons.append("output_scores/output_logits with stopping criteria beyond eos and length on several rows")
        if reasons:
            return reasons
        if bool((attention_mask.sum(-1) == 0).any()):
            raise ValueError("a prompt has no tokens (its attention_mask is all zeros)")
        return _Call(input_ids, attention_mask, gen, copies, settings, processors, criteria, grammar, streamer)

    def _generate(self, call: "_Call"):
        """Run a resolved call; returns HF's output, or the reasons this call must go to HF after all."""
        input_ids, gen = call.input_ids, call.gen
        batch, width = input_ids.shape
        eos = set(gen._eos_token_tensor.tolist()) if gen._eos_token_tensor is not None else set()
        pad = int(gen._pad_token_tensor) if gen._pad_token_tensor is not None else 0
        max_new = max(1, gen.max_length - width)  # HF runs at least one step, whatever max_length says
        padded = input_ids.cpu().repeat_interleave(call.copies, 0)  # num_return_sequences: HF's row order
        masks = call.attention_mask.cpu().repeat_interleave(call.copies, 0)
        requests = []
        for i, (row, mask) in enumerate(zip(padded.tolist(), masks.bool())):
            leader = requests[i - i % call.copies] if i % call.copies else None
            requests.append(Request([t for t, keep in zip(row, mask) if keep], max_new, call.settings.params,
                                    accept=None, seen=call.settings.seen(i // call.copies, row),
                                    min_new_tokens=call.settings.min_new_tokens,
                                    fork_of=leader, constraint=call.grammar(i) if call.grammar else None))
            requests[-1].accept = _acceptor(requests[-1], row, eos, call.criteria, call.streamer)
        runner, scheduler = self.runtime
        recorded = [] if _keeps_steps(gen) else None
        apart = recorded is not None and scheduler.why_not_together(requests)
        if apart:
            return [f"output_scores/output_logits with {apart}"]
        if call.streamer is not None:
            call.streamer.put(input_ids.cpu())
        start = time.perf_counter()
        captured = runner.graphs_captured()
        with self._compiling():
            stats = scheduler.run(requests, eos=eos, record=recorded, pad_token=pad)
        if runner.graphs_captured() > captured:
            self.recorder.event(runner.describe_graphs())
        if call.streamer is not None:
            call.streamer.end()
        elapsed = time.perf_counter() - start
        steps = max(stats.decode_steps, 1)
        real = int(call.attention_mask.sum())
        self.recorder.event(
            f"generate: {batch} sequences, {real} prompt tokens ({batch * width - real} pad tokens skipped)"
            + (f", {call.copies} samples each (each prompt prefilled once, its pages shared)"
               if call.copies > 1 else "")
            + f"; {stats.prefill_steps} prefill steps, {stats.decode_steps} decode steps ({runner.describe_decode()}); "
            f"{stats.preemptions} preemptions; host {1e3 * stats.host_seconds / steps:.2f} ms per step, "
            f"{stats.token_waits} token reads ({1e3 * stats.wait_seconds:.0f} ms waiting); {elapsed:.2f} s"
            + ("; logits kept per step, finished rows ran on the pad token until all were done"
               if recorded is not None else ""))
        longest = max(len(r.generated) for r in requests)
        out = torch.full((len(requests), longest), pad, dtype=torch.long)
        for b, request in enumerate(requests):
            out[b, : len(request.generated)] = torch.tensor(request.generated, dtype=torch.long)
        sequences = torch.cat([padded, out], dim=1).to(input_ids.device)
        if gen.return_dict_in_generate:
            return GenerateDecoderOnlyOutput(sequences=sequences, **_step_outputs(gen, call.processors, sequences,
                                                                                  recorded, width))
        return sequences


@dataclass
class _Settings:
    params: RowParams
    min_new_tokens: int = 0
    penalty_skip: object = None  # prompt tokens the repetition penalty ignores: None, an int, or one per row

    def seen(self, row, padded):
        """The tokens of ``padded`` (a padded prompt row) the repetition penalty counts, as HF's processor does
        (transformers 5.17 counts the left padding too; later versions skip it)."""
        skip = self.penalty_skip
        if isinstance(skip, torch.Tensor):
            skip = int(skip[row])
        return padded[skip or 0:]


@dataclass
class _Call:
    """One generate call as the fast path runs it, all of it resolved by transformers' own code."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    gen: object
    copies: int
    settings: _Settings
    processors: LogitsProcessorList  # HF's own: they make output_scores' scores of the kept logits
    criteria: list  # stopping criteria beyond length and eos, checked on the host per row
    grammar: object  # None, or row index -> the row's constraint (an xgrammar matcher)
    streamer: object


def _keeps_steps(gen) -> bool:
    """Does HF return per-step outputs the fast path makes (it records them only under return_dict_in_generate)?"""
    return bool(gen.return_dict_in_generate and (gen.output_scores or gen.output_logits))


def _step_outputs(gen, processors, sequences, recorded, width) -> dict:
    """HF's ``logits`` (each step's raw fp32 logits, as the loop kept them) and ``scores``: what HF's logits
    processors make of them, given the ids HF's loop holds at that step (padded prompt, tokens so far, pad after
    eos). Steps the loop ran past the last token are dropped."""
    if recorded is None:
        return {}
    logits = tuple(recorded[: sequences.shape[1] - width])
    ids = sequences.to(logits[0].device)
    out = {"logits": logits} if gen.output_logits else {}
    if gen.output_scores:
        out["scores"] = tuple(processors(ids[:, : width + t], step) for t, step in enumerate(logits))
    return out


def _row_settings(processors, greedy, width):
    """HF's logits processors, as the fast path's per-row settings; the names of those it cannot run."""
    params, min_new, skip, unsupported = RowParams(greedy=greedy), 0, None, []
    for p in processors:
        if isinstance(p, logits_process.TemperatureLogitsWarper):
            params.temperature = float(p.temperature)
        elif isinstance(p, logits_process.TopKLogitsWarper) and p.min_tokens_to_keep == 1:
            params.top_k = int(p.top_k)
        elif isinstance(p, logits_process.TopPLogitsWarper) and p.min_tokens_to_keep == 1:
            params.top_p = float(p.top_p)
        elif isinstance(p, logits_process.MinPLogitsWarper) and p.min_tokens_to_keep == 1:
            params.min_p = float(p.min_p)
        elif isinstance(p, logits_process.RepetitionPenaltyLogitsProcessor):
            params.repetition_penalty = float(p.penalty)
            skip = getattr(p, "prompt_ignore_length", None)
        elif isinstance(p, logits_process.MinNewTokensLengthLogitsProcessor) and p.prompt_length_to_skip == width:
            min_new = max(min_new, int(p.min_new_tokens))
        elif isinstance(p, logits_process.MinLengthLogitsProcessor):
            min_new = max(min_new, int(p.min_length) - width)  # HF compares the padded length
        else:
            unsupported.append(f"logits processor {type(p).__name__}")
    return _Settings(params, min_new, skip), unsupported


def _acceptor(request, padded, eos, criteria, streamer):
    """Per generated token (in order): stream it, then stop at eos or at any stopping criterion HF would apply,
    which sees the row as HF's loop holds it (padded prompt + tokens so far)."""

    def accept(token):
        if request.constraint is not None:
            request.constraint.accept(token)
        if streamer is not None:
            streamer.put(torch.tensor([token]))
        if token in eos:
            return True
        if criteria:
            ids = torch.tensor([padded + request.generated])
            return any(bool(c(ids, None)[0]) for c in criteria)
        return False

    return accept


def _grammar(processors, vocab_size):
    """xgrammar's Hugging Face logits processor becomes a per-row constraint the sampler applies as a
    bitmask; returns (row index -> constraint factory or None, the processors left unsupported)."""
    grammars, others = [], []
    for p in processors:
        if type(p).__module__.startswith("xgrammar") and hasattr(p, "compiled_grammars") and not grammars:
            grammars = p.compiled_grammars
        else:
            others.append(p)
    if not grammars:
        return None, others
    if grammars[0].tokenizer_info.vocab_size > vocab_size:
        return None, others + [f"grammar over {grammars[0].tokenizer_info.vocab_size} tokens"]

    def constraint(row):
        return _GrammarConstraint(grammars[row] if len(grammars) > 1 else grammars[0], vocab_size)

    return constraint, others


class _GrammarConstraint:
    """One row's grammar state: the bitmask of tokens allowed next, advanced by each accepted token."""

    def __init__(self, compiled, vocab_size):
        import xgrammar

        self.xgrammar, self.matcher = xgrammar, xgrammar.GrammarMatcher(compiled)
        self.mask = xgrammar.allocate_token_bitmask(1, vocab_size)

    def bitmask(self) -> torch.Tensor:
        self.mask.fill_(-1)
        self.matcher.fill_next_token_bitmask(self.mask)
        return self.mask[0].clone()

    def accept(self, token) -> None:
        if not self.matcher.is_terminated():
            self.matcher.accept_token(token)


# -- building the runtime -------------------------------------------------------------------------------
# Every runner built in this process, alive or dropped but not yet collected (see _free_dropped_runtimes).
_RUNNERS = weakref.WeakSet()


def _free_dropped_runtimes():
    """A dropped optimized model is a reference cycle (model -> engine -> runner -> compiled forwards -> model), so
    only a full collection frees its KV pool and graphs, and one may not come for a long while. A pool sized from
    free memory before that would get half of what the dead one left, and the next would run out: collect first.
    (The freed blocks stay in PyTorch's cache, which ``_free_device_memory`` counts; emptying it here could free
    memory under another thread's graph capture.)"""
    if _RUNNERS:
        gc.collect()


def _free_device_memory(device) -> int:
    """Bytes a new allocation can get: the driver's free memory plus the blocks PyTorch holds unused."""
    return (torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)
            - torch.cuda.memory_allocated(device))


def _build_runtime(model, opts: RuntimeOptions, recorder: Recorder, cache: CompileCache):
    cfg = model.config
    device = next(model.parameters()).device
    _free_dropped_runtimes()
    head_size = head_dim(cfg)
    kv_dtype = torch.float8_e4m3fn if opts.kv_cache_dtype == "fp8_e4m3" else model.dtype
    q_heads, kv_heads = local_attention_heads(model)  # this rank's share when transformers sharded the model
    per_token = KVPool.token_bytes(cfg.num_hidden_layers, kv_heads, head_size, kv_dtype)
    if opts.max_kv_tokens:
        tokens = opts.max_kv_tokens
    elif device.type == "cuda":
        tokens = max(opts.page_size, int(_free_device_memory(device) * opts.kv_memory_fraction) // per_token)
    else:
        tokens = CPU_INITIAL_KV_TOKENS
    tokens = agree_on_min(tokens, model)  # one pool size on every rank: the same schedule, the same collectives
    pool = KVPool(cfg.num_hidden_layers, kv_heads, head_size, -(-tokens // opts.page_size),
                  opts.page_size, kv_dtype, device, growable=device.type != "cuda" and not opts.max_kv_tokens)
    recorder.event(f"KV pool: {pool.num_pages} pages x {opts.page_size} tokens ({pool.capacity_tokens} tokens, "
                   f"{readable_bytes(per_token * pool.capacity_tokens)}, {kv_dtype}) on {device}"
                   + (", grows as needed" if pool.growable else ""))
    if kv_heads != cfg.num_key_value_heads:
        recorder.event(f"tensor parallel: this rank holds {q_heads} of {cfg.num_attention_heads} query heads and "
                       f"{kv_heads} of {cfg.num_key_value_heads} KV heads; its KV pool holds those only")
    if pool.fp8:
        _calibrate_fp8_scales(model, pool, recorder)
    attention = _device_attention(model, pool, opts, recorder)
    if device.type == "cuda":
        from .kernels import gemv_prologue_enabled
        from .kernels import pdl
        from .kernels import step_kernels_enabled

        off = pdl.off_reason(device)
        recorder.event("Triton kernels: programmatic dependent launch " + (f"off: {off}" if off else
                                                                          "on (KERNELSTACK_PDL=0 turns it off)"))
        recorder.event("norms and SiLU*mul feeding a GEMV: " + (
            "in the GEMV's prologue where the Triton GEMV won the shape (KERNELSTACK_GEMV_PROLOGUE=1)"
            if gemv_prologue_enabled() else "their own kernels (KERNELSTACK_GEMV_PROLOGUE=1 folds them into the "
                                            "GEMV, not yet measured on a GPU)"))
        recorder.event("a decode step's head and tail (rope table, positions and slots, greedy pick): " + (
            "4 Triton launches (KERNELSTACK_STEP_KERNELS=0 runs the torch ops instead)" if step_kernels_enabled()
            else "torch ops, about 23 kernels (KERNELSTACK_STEP_KERNELS=0)"))

    def forward_prefill(ids, positions, keep):
        return model(input_ids=ids, position_ids=positions, logits_to_keep=keep, use_cache=False).logits

    def forward_decode(ids, positions):
        return model(input_ids=ids, position_ids=positions, use_cache=False).logits

    backend = functools.partial(kernelstack_backend, options=dict(opts.backend_options))
    graphs = opts.cuda_graphs and device.type == "cuda" and attention is not None
    capacity = min(opts.max_batch_size, max(opts.decode_buckets)) if graphs else opts.max_batch_size
    width = pool.pages_for(max(cfg.max_position_embeddings, opts.page_size))

    unstorable = ("the FX executor's graphs cannot be stored (executor='fx')"
                  if BackendOptions.from_options(opts.backend_options).executor == "fx" else None)

    def compiled(fn, path):
        traced = torch.compile(fn, backend=backend)
        if opts.trace_cache and opts.compile_cache:  # a later process loads the trace too (else ``traced``)
            traced = PrecompiledFunction(fn, backend, cache, path, model, fallback=traced, unstorable=unstorable)
        return _labelled(traced, path, recorder)

    runner = ModelRunner(compiled(forward_prefill, "prefill"), compiled(forward_decode, "decode"),
                         pool, attention, capacity, opts.decode_buckets, graphs, width, cfg.vocab_size,
                         model_scope=lambda: _AttentionImplementation(model, ATTN_IMPLEMENTATION))
    if capacity < opts.max_batch_size:
        recorder.event(f"decode batch capped at the largest CUDA-graph bucket, {capacity}: larger batches run in waves")
    _RUNNERS.add(runner)
    return runner, Scheduler(runner, capacity, opts.max_prefill_tokens, RESERVE_TOKENS)


@contextlib.contextmanager
def _old_objects_set_aside():
    """The first call compiles or loads graphs, making objects by the million, and Python's full collections then
    walk every object the process holds (the model's, torch's, transformers'): 0.4-0.7 s of a second process's first
    token on a CPU. Frozen, the objects from before the call are skipped by those walks; they are put back after."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@contextlib.contextmanager
def _no_size_one_specialization():
    """Dynamo specialises dynamic dimensions of size 0 and 1 (a batch of one, a one-token prompt) into
    graphs of their own; size-oblivious symbols keep one graph per path instead, with Inductor's view strides
    computed the same way (``_size_oblivious_view_strides``)."""
    from torch.fx.experimental import _config

    if not hasattr(_config, "backed_size_oblivious"):
        yield
        return
    with _config.patch(backed_size_oblivious=True), _size_oblivious_view_strides():
        yield


_VIEW_STRIDES_LOCK = threading.Lock()
_view_strides = {"users": 0, "original": None}  # under the lock: callers inside, and the function set aside


@contextlib.contextmanager
def _size_oblivious_view_strides():
    """Inductor lowers a view of a strided tensor (q/k/v sliced from the fused projection, then split into heads;
    ``x[0]`` of HF's transposed K/V) through ``fake_impls._compute_stride``, which it runs size-obliviously only
    for unbacked symbols. For the backed token count it asks ``s != 1``, and the decode graph gets a ``2 <= s``
    guard: batch 1 and batch 2+ compiled twice (15-17 s each on an H100). Under ``backed_size_oblivious`` Inductor
    answers every other such question as for unbacked symbols, and so does this: the strides of the general case,
    which are also right at s = 1, where a size-1 dimension's stride is never used. Where torch has no such
    function, the second compile stays. One patch serves every thread inside; the last one out undoes it."""
    from torch._subclasses import fake_impls

    with _VIEW_STRIDES_LOCK:
        if _view_strides["users"] == 0 and _takes_size_oblivious(getattr(fake_impls, "_compute_stride", None)):
            _view_strides["original"] = fake_impls._compute_stride
            fake_impls._compute_stride = functools.partial(_strides_size_obliviously, fake_impls._compute_stride)
        _view_strides["users"] += 1
    try:
        yield
    finally:
        with _VIEW_STRIDES_LOCK:
            _view_strides["users"] -= 1
            if _view_strides["users"] == 0 and _view_strides["original"] is not None:
                fake_impls._compute_stride, _view_strides["original"] = _view_strides["original"], None


@functools.cache
def _takes_size_oblivious(compute_stride) -> bool:
    import inspect

    return compute_stride is not None and "size_oblivious" in inspect.signature(compute_stride).parameters


def _strides_size_obliviously(compute_stride, old_shape, old_stride, new_shape, size_oblivious=False):
    return compute_stride(old_shape, old_stride, new_shape, size_oblivious=True)


def _labelled(compiled, path, recorder):
    """Tag the graphs compiled under ``compiled`` with the path they serve, for the explain report."""

    code = compiled._torchdynamo_orig_callable.__code__

    @functools.wraps(compiled)
    def call(*args):
        before = len(recorder.graphs)
        with _no_size_one_specialization():
            out = compiled(*args)
        for report in list(recorder.graphs)[before:]:
            earlier = [g for g in recorder.graphs if g.purpose == path]
            failures = torch._dynamo.utils.guard_failures.get(code) or ["?"]
            report.purpose = path
            report.reason = f"recompiled: {failures[-1]}" if earlier else f"the first {path} call"
        return out

    return call


def _device_attention(model, pool, opts, recorder):
    """FlashInfer on CUDA; the reference (correct, slow) where FlashInfer cannot serve, said in the report."""
    if pool.device.type != "cuda":
        return None
    if opts.attention == "reference":
        recorder.event(f"paged attention runs the plain-torch reference on {pool.device} (attention='reference')")
        return None
    from .runtime.flashinfer_attention import FlashInferAttention
    from .runtime.flashinfer_attention import UnsupportedAttention

    layers = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "scaling")]
    windows = {getattr(m, "sliding_window", None) for m in layers}
    try:
        if len(windows) > 1:
            raise UnsupportedAttention(f"layers mix attention windows {sorted(map(str, windows))}")
        window = windows.pop() if windows else None
        attention = FlashInferAttention(pool, local_attention_heads(model)[0], model.dtype, float(layers[0].scaling),
                                        window - 1 if window else -1, decode_kernel=opts.decode_kernel)
    except UnsupportedAttention as exc:
        recorder.event(f"paged attention runs the plain-torch reference on {pool.device}: {exc}", logging.WARNING)
        return None
    recorder.event(f"paged attention: FlashInfer prefill, decode kernel {attention.decode_kernel} "
                   f"(decode_kernel={opts.decode_kernel!r}, KV {pool.dtype})")
    return attention


def _calibrate_fp8_scales(model, pool, recorder):
    """Fixed per-layer fp8 scales, set once from the model: the K/V absolute maxima over a fixed probe (the
    same token ids every time), with headroom. What a prompt stores never depends on earlier prompts."""
    seen = {}

    def probe(module, query, key, value, attention_mask, **kwargs):
        k_max, v_max = seen.get(module.layer_idx, (0.0, 0.0))
        seen[module.layer_idx] = (max(k_max, float(key.abs().max())), max(v_max, float(value.abs().max())))
        return transformers.integrations.sdpa_attention.sdpa_attention_forward(
            module, query, key, value, attention_mask, **kwargs)

    transformers.AttentionInterface.register("kernelstack_fp8_probe", probe)
    generator = torch.Generator().manual_seed(0)
    count, length = FP8_CALIBRATION
    ids = torch.randint(0, model.config.vocab_size, (count, length), generator=generator).to(pool.device)
    with torch.inference_mode(), _AttentionImplementation(model, "kernelstack_fp8_probe"):
        model(input_ids=ids, use_cache=False)
    scale = FP8_HEADROOM / FP8_MAX
    pool.set_fp8_scales([max(seen[i][0] * scale, 1e-6) for i in range(pool.num_layers)],
                        [max(seen[i][1] * scale, 1e-6) for i in range(pool.num_layers)])
    recorder.event(f"fp8 KV scales from a fixed {count}x{length}-token probe, {FP8_HEADROOM}x headroom: K "
                   f"{min(pool.k_scales):.3g}..{max(pool.k_scales):.3g}, "
                   f"V {min(pool.v_scales):.3g}..{max(pool.v_scales):.3g}")


__all__ = ["optimize", "restore", "KernelstackGenerate", "kernelstack_attention"]
