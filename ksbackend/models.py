"""Model configs the demo, tests and benchmarks build models from (random weights: nothing is downloaded).

``tiny_config`` gives 2-layer GQA models of each supported family, small enough for CPU tests;
``real_config`` gives the real shapes of the checkpoints users run, for GPU benchmarks.
"""

import torch
import transformers

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma")

_CONFIG_CLASSES = {
    "llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config",
    "gemma": "GemmaConfig", "gemma2": "Gemma2Config",
}

_REAL = {
    "llama-135m": ("llama", dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                 num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5,
                                 rope_theta=10000.0, tie_word_embeddings=True, max_position_embeddings=8192)),
    "llama-3.2-1b": ("llama", dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                   num_attention_heads=32, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5,
                                   rope_theta=500000.0, tie_word_embeddings=True, max_position_embeddings=131072)),
    "llama-3.1-8b": ("llama", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
                                   rope_theta=500000.0, max_position_embeddings=131072)),
    "qwen2.5-7b": ("qwen2", dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                 num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6, rope_theta=1e6,
                                 max_position_embeddings=32768)),
    "qwen3-8b": ("qwen3", dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                               num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6,
                               rope_theta=1e6, max_position_embeddings=40960)),
    "mistral-7b": ("mistral", dict(vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
                                   rope_theta=1e6, sliding_window=None, max_position_embeddings=32768)),
    "gemma-2b": ("gemma", dict(vocab_size=256000, hidden_size=2048, intermediate_size=16384, num_hidden_layers=18,
                               num_attention_heads=8, num_key_value_heads=1, head_dim=256, rms_norm_eps=1e-6,
                               max_position_embeddings=8192)),
}
REAL_MODELS = tuple(_REAL)


def head_dim(config) -> int:
    """The attention head size: the config's ``head_dim`` where it sets one, else hidden size over heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def make_config(family: str, **overrides):
    cls = getattr(transformers, _CONFIG_CLASSES[family])
    return cls(**overrides)


def tiny_config(family: str, **overrides):
    """2 layers, hidden 64, 4 query / 2 KV heads (GQA), head size 16, 256-token vocab."""
    shape = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, max_position_embeddings=512)
    if family == "mistral":
        shape["sliding_window"] = None
    if family == "gemma2":
        shape.update(sliding_window=32, attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
    shape.update(overrides)
    return make_config(family, **shape)


def real_config(name: str, **overrides):
    family, shape = _REAL[name]
    return make_config(family, **{**shape, **overrides})


def build_model(config, dtype=torch.float32, device="cpu", attn_implementation="sdpa", seed=0):
    """A causal LM with random weights, in eval mode. Norm weights get random values too, so a rewrite
    that ignores them (or Gemma's ``1 + w``) cannot pass by accident."""
    torch.manual_seed(seed)
    config._attn_implementation = attn_implementation
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(0.0 if config.model_type.startswith("gemma") else 1.0, 0.1)
    return model.eval()


def left_pad(rows, pad_token_id=0, device="cpu"):
    """Token lists -> (input_ids, attention_mask), left-padded the way HF batches prompts for generate."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.as_tensor(r)
        mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


COPY_PERIOD = 7


def copy_task_sequences(batch, length, vocab_size, generator, period=COPY_PERIOD):
    """Rows that repeat a random segment of ``period`` tokens. Predicting them takes attending to the
    token exactly one period back, through RoPE positions and the KV cache, which a wrong position,
    page or head mapping breaks."""
    segments = torch.randint(3, vocab_size, (batch, period), generator=generator)
    return segments[:, torch.arange(length) % period]


def fit_copy_task(model, steps=1000, batch=64, length=288, lr=2e-3, target_accuracy=0.99, seed=0):
    """Train a random-weight model briefly on ``copy_task_sequences`` and return its accuracy.

    Random weights give near-flat next-token distributions whose top two logits often differ by less
    than bf16 rounding, so greedy agreement between two correct bf16 implementations is a coin toss
    there. A trained model's picks have margins; this gives a config-built model such margins (on a
    task that exercises attention over the cache) without downloading a checkpoint."""
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    accuracy = 0.0
    for step in range(steps):
        ids = copy_task_sequences(batch, length, model.config.vocab_size, generator).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=ids).logits[:, :-1].float()
        targets = ids[:, 1:]
        predictable = slice(COPY_PERIOD - 1, None)  # from the second period on
        loss = torch.nn.functional.cross_entropy(logits[:, predictable].flatten(0, 1), targets[:, predictable].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 49:
            accuracy = (logits.argmax(-1) == targets)[:, predictable].float().mean().item()
            if accuracy >= target_accuracy:
                break
    model.eval()
    return accuracy
