"""Hugging Face integration: ``ksbackend.optimize(model)`` puts ``model.generate()`` on kernelstack's path.

``torch.compile(model).generate()`` compiles nothing (generate calls the original module), so
``optimize`` replaces the model's ``generate`` with kernelstack's loop:
- the batch is flattened into one ragged token stream (left padding is dropped: pad tokens get no KV
  pages and no attention work); the model runs with ``attn_implementation="kernelstack"``, whose
  attention function calls ``kernelstack::paged_attention`` over the pool kernelstack owns;
- the forward is compiled once through the kernelstack backend with the token dimension dynamic, so
  neither new prompt lengths nor batch sizes nor decode steps recompile;
- greedy and sampling (temperature, top-k, top-p, min-p), eos and max_new_tokens stopping; a finished
  sequence leaves the batch and gives its pages back.
Anything the loop does not implement (beam search, logits processors, streamers, ...) goes to HF's own
``generate`` with a warning, and the explain report says why.
"""

import contextlib
import copy
import functools
import itertools
import logging
import warnings

import torch
import transformers
from transformers import GenerationConfig

from .backend import kernelstack_backend, recording_into
from .config import RuntimeOptions
from .report import Recorder
from .runtime.context import ForwardContext, forward_context
from .runtime.kv_pool import KVPool, KVPoolExhausted

log = logging.getLogger("ksbackend")

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma")
ATTN_IMPLEMENTATION = "kernelstack"
CPU_DEFAULT_KV_TOKENS = 16384

# GenerationConfig fields the loop implements, and ones that do not change what generate computes.
_SUPPORTED_FIELDS = {"max_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p", "min_p",
                     "eos_token_id", "pad_token_id", "use_cache"}
_IGNORED_FIELDS = {"bos_token_id", "decoder_start_token_id", "transformers_version", "_from_model_config",
                   "cache_implementation", "compile_config", "return_legacy_cache"}
# Settings that are off at these values (None, False and empty are off for every field).
_NEUTRAL = {"num_beams": 1, "num_beam_groups": 1, "num_return_sequences": 1, "repetition_penalty": 1.0,
            "length_penalty": 1.0, "typical_p": 1.0, "guidance_scale": 1.0, "temperature": 1.0, "top_p": 1.0}


def _is_off(name, value) -> bool:
    return value is None or value is False or value in ((), [], {}, 0) or value == _NEUTRAL.get(name, object())


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


@contextlib.contextmanager
def _attention_implementation(model, name):
    previous = model.config._attn_implementation
    model.config._attn_implementation = name
    try:
        yield
    finally:
        model.config._attn_implementation = previous


def optimize(model, **options):
    """Make ``model.generate()`` run through kernelstack (paged KV pool, ragged batches, compiled forward).

    Options (see ``RuntimeOptions``): page_size, max_kv_tokens, kv_memory_fraction, kv_cache_dtype,
    max_batch_size, decode_buckets, cuda_graphs, decode_kernel, backend_options. Returns the same model object.
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
    engine = GenerateEngine(model, opts, recorder)
    model._kernelstack_engine = engine
    model.generate = engine.generate
    return model


class GenerateEngine:
    def __init__(self, model, opts: RuntimeOptions, recorder: Recorder):
        self.model, self.opts, self.recorder = model, opts, recorder
        self.original_generate = model.generate
        cfg = model.config
        self.device = next(model.parameters()).device
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_dtype = model.dtype
        if opts.kv_cache_dtype == "fp8_e4m3":
            if self.device.type != "cuda":
                raise ValueError("kv_cache_dtype='fp8_e4m3' needs a CUDA device (FlashInfer's fp8 KV kernels); "
                                 "use kv_cache_dtype='auto' on CPU")
            kv_dtype = torch.float8_e4m3fn
        bytes_per_token = KVPool.token_bytes(cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim, kv_dtype)
        tokens = opts.max_kv_tokens or self._default_kv_tokens(bytes_per_token)
        self.pool = KVPool(cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim,
                           -(-tokens // opts.page_size), opts.page_size, kv_dtype, self.device)
        self.attention = self._device_attention(model, cfg)
        self.graphs = None
        if self.attention is not None and opts.cuda_graphs:
            from .runtime.cuda_graphs import DecodeGraphRunner

            self.graphs = DecodeGraphRunner(self, [b for b in opts.decode_buckets if b <= opts.max_batch_size])
        self._seq_ids = itertools.count()
        backend = functools.partial(kernelstack_backend, options=dict(opts.backend_options))
        self.compiled_forward = torch.compile(self._forward, backend=backend)
        recorder.event(f"KV pool: {self.pool.num_pages} pages x {opts.page_size} tokens ({self.pool.capacity_tokens} tokens, "
                       f"{bytes_per_token * self.pool.capacity_tokens / 2**20:.0f} MiB, {kv_dtype}) on {self.device}")

    def _device_attention(self, model, cfg):
        """FlashInfer on CUDA; the reference (correct, slow) where FlashInfer cannot serve, said in the report."""
        if self.device.type != "cuda":
            return None
        from .runtime.flashinfer_attention import FlashInferAttention, UnsupportedAttention

        layers = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "scaling")]
        windows = {getattr(m, "sliding_window", None) for m in layers}
        try:
            if len(windows) > 1:
                raise UnsupportedAttention(f"layers mix attention windows {sorted(map(str, windows))}")
            window = windows.pop() if windows else None
            attention = FlashInferAttention(self.pool, cfg.num_attention_heads, model.dtype, float(layers[0].scaling),
                                            window - 1 if window else -1, decode_kernel=self.opts.decode_kernel,
                                            max_seq_len=min(self.pool.capacity_tokens, cfg.max_position_embeddings))
            self.recorder.event(f"paged attention: FlashInfer, decode kernel {attention.decode_kernel} "
                                f"(decode_kernel={self.opts.decode_kernel!r}, KV {self.pool.dtype})")
            return attention
        except UnsupportedAttention as exc:
            self.recorder.event(f"paged attention runs the plain-torch reference on {self.device}: {exc}", logging.WARNING)
            return None

    def model_attention(self):
        return _attention_implementation(self.model, ATTN_IMPLEMENTATION)

    def _default_kv_tokens(self, bytes_per_token):
        if self.device.type != "cuda":
            return CPU_DEFAULT_KV_TOKENS
        free, _ = torch.cuda.mem_get_info(self.device)
        return max(self.opts.page_size, int(free * self.opts.kv_memory_fraction) // bytes_per_token)

    def _forward(self, input_ids, position_ids, logits_to_keep):
        return self.model(input_ids=input_ids, position_ids=position_ids, logits_to_keep=logits_to_keep,
                          use_cache=False).logits

    def _step(self, tokens, meta, logits_to_keep):
        if meta.is_decode and self.graphs is not None and self.graphs.bucket_for(meta.num_seqs) is not None:
            try:
                return self.graphs.run(tokens, meta)
            except Exception as exc:  # capture failed: decode stays correct, just without graphs
                self.graphs = None
                self.recorder.event(f"decode CUDA graphs disabled after an error: {type(exc).__name__}: {exc}", logging.WARNING)
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device)[None]
        positions = meta.positions.to(self.device)[None]
        keep = logits_to_keep.to(self.device)
        for t in (ids, positions):
            torch._dynamo.maybe_mark_dynamic(t, 1)
        torch._dynamo.maybe_mark_dynamic(keep, 0)
        if self.attention is not None:
            self.attention.plan(meta)  # on the host metadata, before the step's kernels
        with forward_context(ForwardContext(self.pool, meta.to(self.device), self.attention)), self.model_attention():
            return self.compiled_forward(ids, positions, keep)[0].float()

    # -- generate -----------------------------------------------------------------------------------
    def _unsupported(self, gen: GenerationConfig, extra_kwargs) -> list[str]:
        reasons = [f"argument {name!r}" for name in extra_kwargs]
        for name, value in gen.to_dict().items():
            if name not in _SUPPORTED_FIELDS and name not in _IGNORED_FIELDS and not _is_off(name, value):
                reasons.append(f"generation setting {name}={getattr(gen, name)!r}")
        return reasons

    def generate(self, inputs=None, generation_config=None, **kwargs):
        """Drop-in for ``model.generate`` (greedy and sampling); returns [B, prompt + new] token ids like HF."""
        input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
        attention_mask = kwargs.pop("attention_mask", None)
        gen = copy.deepcopy(generation_config or self.model.generation_config)
        extra = gen.update(**kwargs)
        reasons = self._unsupported(gen, extra) if input_ids is not None else ["no input_ids"]
        if reasons:
            message = f"kernelstack generate does not implement {', '.join(reasons)}: using Hugging Face's generate"
            warnings.warn(message, stacklevel=2)
            self.recorder.event(message, logging.WARNING)
            return self.original_generate(input_ids, attention_mask=attention_mask, generation_config=generation_config, **kwargs)
        with torch.inference_mode(), recording_into(self.recorder):
            return self._generate(input_ids, attention_mask, gen)

    def _generate(self, input_ids, attention_mask, gen):
        batch, prompt_len = input_ids.shape
        eos = gen.eos_token_id
        eos = set([eos] if isinstance(eos, int) else list(eos or []))
        pad = gen.pad_token_id if gen.pad_token_id is not None else (min(eos) if eos else 0)
        if attention_mask is None:
            can_infer = gen.pad_token_id is not None and gen.pad_token_id not in eos and bool((input_ids == gen.pad_token_id).any())
            attention_mask = (input_ids != gen.pad_token_id) if can_infer else torch.ones_like(input_ids)
        max_new = gen.max_new_tokens if gen.max_new_tokens is not None else gen.max_length - prompt_len
        if max_new < 1:
            return input_ids
        if batch > self.opts.max_batch_size:
            raise ValueError(f"batch of {batch} prompts is above max_batch_size={self.opts.max_batch_size}; "
                             f"pass ksbackend.optimize(model, max_batch_size={batch}) or split the batch")
        rows = [row[mask.bool()].tolist() for row, mask in zip(input_ids.cpu(), attention_mask.cpu())]
        if any(not r for r in rows):
            raise ValueError("a prompt has no tokens (its attention_mask is all zeros)")
        sampler = _Sampler(gen, batch, self.device) if gen.do_sample else None
        seq_ids = [next(self._seq_ids) for _ in rows]
        out = torch.full((batch, max_new), pad, dtype=torch.long)
        finished = [False] * batch
        try:
            meta = self.pool.extend(seq_ids, [len(r) for r in rows])
            self.recorder.event(f"prefill: {batch} sequences, {meta.num_tokens} tokens "
                                f"({batch * prompt_len - meta.num_tokens} pad tokens skipped)")
            logits = self._step(list(itertools.chain.from_iterable(rows)), meta, meta.qo_indptr[1:].long() - 1)
            active = list(range(batch))
            for step in range(max_new):
                tokens = self._pick(logits, sampler, active)
                for b, token in zip(active, tokens):
                    out[b, step] = token
                    if token in eos:
                        finished[b] = True
                        self.pool.release(seq_ids[b])
                active = [b for b in active if not finished[b]]
                if not active or step == max_new - 1:
                    out = out[:, : step + 1]
                    break
                meta = self.pool.extend([seq_ids[b] for b in active], [1] * len(active))
                previous = out[active, step].tolist()
                logits = self._step(previous, meta, torch.arange(len(active)))
        except KVPoolExhausted:
            self.recorder.event("KV pool exhausted: generate stopped, pages released", logging.WARNING)
            raise
        finally:
            for seq_id in seq_ids:
                self.pool.release(seq_id)
        return torch.cat([input_ids.cpu(), out], dim=1).to(input_ids.device)

    @staticmethod
    def _pick(logits, sampler, active):
        if sampler is None:
            return logits.argmax(-1).tolist()
        return sampler(logits, active).tolist()


class _Sampler:
    """Per-row sampling parameters as device tensors (never Python constants in a graph)."""

    def __init__(self, gen: GenerationConfig, batch, device):
        def full(value, dtype):
            return torch.full((batch,), value, dtype=dtype, device=device)

        self.temperature = full(gen.temperature if gen.temperature is not None else 1.0, torch.float32)
        self.top_k = full(gen.top_k or 0, torch.int64)
        self.top_p = full(gen.top_p if gen.top_p is not None else 1.0, torch.float32)
        self.min_p = full(gen.min_p or 0.0, torch.float32)
        self.device = device

    def __call__(self, logits, active):
        rows = torch.tensor(active, device=self.device)
        uniform = torch.rand(len(active), device=self.device)
        return torch.ops.kernelstack.sample(logits, self.temperature[rows], self.top_k[rows], self.top_p[rows],
                                            self.min_p[rows], uniform)
