"""``kernelstack::sample``: penalties, an allowed-token bitmask, temperature, top-k, top-p, min-p and the draw in one
op.

The steps run in HF's order: the repetition penalty (as ``RepetitionPenaltyLogitsProcessor``), OpenAI's frequency and
presence penalties, the bitmask (a grammar's allowed tokens, xgrammar's packed layout), then the warpers (temperature
-> top-k -> top-p -> min-p), each on the distribution the previous one left, then the categorical draw. Greedy rows
take the argmax after the penalties and the bitmask.

Every per-row parameter is a device tensor, and randomness comes from a counter-based generator keyed by ``seed`` and
``offset``, device tensors the op reads and never advances: the caller adds 1 to ``offset`` after each step (inside a
CUDA graph too). So a fixed seed reproduces a run, and changing a parameter never recompiles or re-captures anything.
"""

from dataclasses import dataclass
from dataclasses import fields

import torch

from ..runtime.model_runner import SAMPLER_DTYPES


def unpack_bitmask(allowed_bitmask, vocab):
    """[B, ceil(V/32)] int32 words -> [B, V] bool: bit j of word w allows token 32*w + j."""
    shifts = torch.arange(32, dtype=torch.int32, device=allowed_bitmask.device)
    bits = (allowed_bitmask[:, :, None] >> shifts) & 1  # arithmetic shift: bit 31 comes out as -1 & 1 = 1 too
    return bits.flatten(1)[:, :vocab].bool()


def penalized_logits(logits, repetition_penalty, frequency_penalty, presence_penalty, token_counts, allowed_bitmask):
    """fp32 logits after the penalties and the bitmask (disallowed -> -inf), with the operations HF's
    ``RepetitionPenaltyLogitsProcessor`` uses so the result matches it bit for bit."""
    scores = logits.float()
    if token_counts is not None:
        seen = token_counts > 0
        penalty = repetition_penalty.float()[:, None]
        scores = torch.where(seen, torch.where(scores < 0, scores * penalty, scores / penalty), scores)
        scores = scores - (frequency_penalty.float()[:, None] * token_counts + presence_penalty.float()[:, None] * seen)
    if allowed_bitmask is not None:
        scores = scores.masked_fill(~unpack_bitmask(allowed_bitmask, scores.shape[-1]), float("-inf"))
    return scores


def sampling_mask(logits, temperature, top_k, top_p, min_p):
    """Temperature-scaled logits and the [B, V] mask of tokens each row may emit.

    HF's ``TemperatureLogitsWarper``, ``TopKLogitsWarper``, ``TopPLogitsWarper`` and ``MinPLogitsWarper`` with per-row
    parameters (top_k 0, top_p 1.0 and min_p 0 turn a warper off, as HF then adds none), written with the operations
    they use so the kept set is theirs: ties at the top-k boundary stay, top-p and min-p keep at least one token.
    """
    scaled = logits.float() / temperature.float()[:, None]
    vocab = scaled.shape[-1]
    k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab).long()
    kth = scaled.sort(dim=-1, descending=True).values.gather(-1, k[:, None] - 1)
    scores = scaled.masked_fill(scaled < kth, float("-inf"))

    sorted_logits, order = scores.sort(dim=-1, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop = (cumulative <= (1 - top_p.float())[:, None]) & (top_p < 1)[:, None]
    drop[:, -1] = False
    scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))

    probs = scores.softmax(dim=-1)
    drop = probs < min_p.float()[:, None] * probs.amax(dim=-1, keepdim=True)
    drop.scatter_(-1, probs.argmax(dim=-1, keepdim=True), False)
    return scaled, scores.masked_fill(drop, float("-inf")) > float("-inf")


def _step_generator(seed, offset, device):
    """A torch generator for one step of the reference: the CPU has no counter-based generator, so (seed, offset)
    picks the starting state; the kernel draws other numbers from the same contract."""
    state = (int(seed.item()) * 0x9E3779B97F4A7C15 + int(offset.item())) % (2**63)
    return torch.Generator(device=device).manual_seed(state)


@torch.library.custom_op("kernelstack::sample", mutates_args=())
def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           min_p: torch.Tensor, repetition_penalty: torch.Tensor, frequency_penalty: torch.Tensor,
           presence_penalty: torch.Tensor, token_counts: torch.Tensor | None, allowed_bitmask: torch.Tensor | None,
           greedy: torch.Tensor, seed: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """logits [B, V]; per-row [B] parameters (top_k 0, top_p 1.0, min_p 0 and penalties 1.0 / 0 / 0 mean off);
    token_counts [B, V] int32 or None; allowed_bitmask [B, ceil(V/32)] int32 or None; greedy [B] bool (temperature
    0 is greedy too); seed, offset int64 [1]. Returns int64 token ids [B]."""
    scores = penalized_logits(logits, repetition_penalty, frequency_penalty, presence_penalty, token_counts,
                              allowed_bitmask)
    greedy = greedy | (temperature <= 0)
    scaled, mask = sampling_mask(scores, torch.where(greedy, 1.0, temperature.float()), top_k, top_p, min_p)
    probs = scaled.masked_fill(~mask, float("-inf")).softmax(-1)
    probs = probs.masked_fill(greedy[:, None], 1.0)  # a greedy row's draw is unused: its NaNs must not raise
    drawn = torch.multinomial(probs, 1, generator=_step_generator(seed, offset, logits.device))[:, 0]
    return torch.where(greedy, scores.argmax(-1), drawn)


@sample.register_fake
def _(logits, temperature, top_k, top_p, min_p, repetition_penalty, frequency_penalty, presence_penalty, token_counts,
      allowed_bitmask, greedy, seed, offset):
    return logits.new_empty(logits.shape[:1], dtype=torch.int64)


# the value that turns each parameter off, in SamplingParams' field order (dtypes: the runner's SAMPLER_DTYPES)
_OFF = (1.0, 0, 1.0, 0.0, 1.0, 0.0, 0.0, False)


@dataclass(frozen=True)
class SamplingParams:
    """One batch's per-row sampling parameters as device tensors, in the order the op takes them. Tensors rather than
    Python numbers, so one compiled graph or captured CUDA graph serves every mix of requests."""

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor
    repetition_penalty: torch.Tensor
    frequency_penalty: torch.Tensor
    presence_penalty: torch.Tensor
    greedy: torch.Tensor

    @classmethod
    def from_values(cls, batch, device=None, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                    repetition_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0, greedy=False):
        """Each value is one Python number for every row or a sequence of ``batch`` of them; None means off (as an
        unset field of HF's ``GenerationConfig``)."""
        given = (temperature, top_k, top_p, min_p, repetition_penalty, frequency_penalty, presence_penalty, greedy)
        columns = []
        for f, value, off in zip(fields(cls), given, _OFF, strict=True):
            values = list(value) if isinstance(value, (list, tuple)) else [value] * batch
            if len(values) != batch:
                raise ValueError(f"{f.name}: {len(values)} values for a batch of {batch}")
            values = [off if v is None else v for v in values]
            columns.append(torch.tensor(values, dtype=SAMPLER_DTYPES.get(f.name, torch.float32), device=device))
        return cls(*columns)

    def select(self, rows):
        """The parameters of ``rows`` (an index tensor on the same device), e.g. the sequences still running."""
        return SamplingParams(*(getattr(self, f.name).index_select(0, rows) for f in fields(self)))

    def sample(self, logits, seed, offset, token_counts=None, allowed_bitmask=None):
        """One token per row; seed and offset are int64 [1] device tensors (add 1 to offset after each step)."""
        return torch.ops.kernelstack.sample(logits, self.temperature, self.top_k, self.top_p, self.min_p,
                                            self.repetition_penalty, self.frequency_penalty, self.presence_penalty,
                                            token_counts, allowed_bitmask, self.greedy, seed, offset)
