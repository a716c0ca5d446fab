"""Logits processors and warpers of transformers, as pure JAX functions over static shapes.

Each processor is a ``flax.struct`` dataclass: ids and sizes are static fields, float knobs are
pytree leaves (so a new temperature does not recompile). It is called as
``processor(scores, ctx) -> scores`` with ``scores: float32[rows, vocab]`` and a
`ProcessorContext` describing the history, and reproduces the transformers processor of the same
name on the ``input_ids`` transformers would hold at that step.

The history lives in the decoder's static buffer ``sequences: int32[rows, total_len]``; column
``c`` holds input_ids position ``c - ctx.offset`` (``offset`` columns of bucket padding come first),
and only columns ``< ctx.end`` are written. Processors that read history look at exactly the
columns transformers sees: never the bucket padding nor unwritten slots.

`build_processors` composes the list in the order of ``GenerationMixin._get_logits_processor``.
A user processor is any callable ``fn(scores, ctx) -> scores`` built from jax ops; pass it as
``logits_processor=[fn]`` to a decoder (it runs after the built-in processors and before the
sampling warpers, as in transformers). It must be hashable: it is part of the compiled program.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import struct

from jaxgen.decoding import select

NEG_INF = -jnp.inf
_CHUNKED_TOP_K_MAX = 256  # thresholds for k up to this come from `select.top_k`, beyond by bisection


@struct.dataclass
class ProcessorContext:
    """What a processor may look at.

    sequences: int32[rows, total_len], the static token buffer.
    cur_len: int32[], ``input_ids.shape[-1]`` in transformers at this step
      (prompt length as passed + tokens generated so far).
    pad_lengths: int32[rows], left padding of each row's prompt as passed (its first unmasked column).
    offset: int32[], bucket-padding columns before the prompt as passed.
    chosen: int32[rows, k], group beam search: the tokens the earlier groups of the row's prompt
      chose at this step (transformers' ``current_tokens``); None elsewhere.
    """

    sequences: jax.Array
    cur_len: jax.Array
    pad_lengths: jax.Array
    offset: jax.Array
    chosen: jax.Array | None = None

    @property
    def end(self) -> jax.Array:
        """First unwritten column of ``sequences``."""
        return self.offset + self.cur_len

    def history_mask(self) -> jax.Array:
        """bool[1, total_len]: columns that are part of transformers' input_ids (same for all rows)."""
        col = jnp.arange(self.sequences.shape[1])
        return ((col >= self.offset) & (col < self.end))[None, :]


def _vocab_mask(vocab: int, ids: Sequence[int]) -> jax.Array:
    return jnp.zeros((vocab,), bool).at[jnp.asarray(ids, jnp.int32)].set(True)


def _sortable(x: jax.Array) -> jax.Array:
    """uint32 keys ordered as the float32 values (negative floats' bits flipped)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _bisect(ok, rows: int) -> jax.Array:
    """uint32[rows]: the largest key ``u`` with ``ok(u[:, None])`` true, for a predicate that is
    true at 0 and monotone (true, then false). 32 halvings, each one vectorised pass, eight to a
    loop iteration: on a GPU each iteration of a loop waits for the host to read its condition
    (sampling with top-k 50 and top-p, both bisected then, GPT-2 124M at batch 8 on an H100: 1.52
    ms a step with one halving per iteration, 0.92 with eight; all 32 unrolled, 0.96 and 3 s more
    compile)."""

    def body(_, bounds):
        lo, hi = bounds
        gap = hi - lo
        mid = lo + (gap >> 1) + (gap & 1)
        good = ok(mid[:, None])
        return jnp.where(good, mid, lo), jnp.where(good, hi, mid - 1)

    start = (jnp.zeros((rows,), jnp.uint32), jnp.full((rows,), 0xFFFFFFFF, jnp.uint32))
    return jax.lax.fori_loop(0, 32, body, start, unroll=8)[0]


def _kth_largest(scores: jax.Array, k: int) -> jax.Array:
    """float32[rows, 1]: the k-th largest score of each row (ties counted), as ``top_k(...)[0][:, -1]``.

    The maximum for k=1; up to k=256 the exact chunked `select.top_k` (k=50 on [8, 50257]: 0.24
    ms on 2 Zen 5 cores; XLA:CPU's ``TopK`` there takes 0.5 ms, and 55 ms when only its last
    value is read); beyond that a bisection on the float bits, whose 32 passes over the row cost
    the same for every k (1.5 ms; the chunked top-k 1.2 ms at k=256, 1.6 at k=384).
    """
    if k == 1:
        return scores.max(-1, keepdims=True)
    if k <= _CHUNKED_TOP_K_MAX:
        return select.top_k(scores, k, chunk=32)[0][..., -1:]
    keys = _sortable(scores)
    kth = _bisect(lambda u: (keys >= u).sum(-1) >= k, scores.shape[0])
    return jnp.max(jnp.where(keys == kth[:, None], scores, -jnp.inf), -1, keepdims=True)


def _spare_best(remove: jax.Array, values: jax.Array, k: int) -> jax.Array:
    """``remove: bool[rows, V]`` with each row's ``k`` largest ``values`` set False (ties to the
    lower id): transformers' ``min_tokens_to_keep`` where it keeps a sorted prefix, not every
    token tied with it. Among exact ties transformers keeps whichever ``torch.sort`` (not stable
    on CPU) put first; the lower id is jaxgen's deterministic choice."""
    keep = select.top_k(values, min(k, values.shape[-1]))[1]
    return remove.at[jnp.arange(values.shape[0])[:, None], keep].set(False)


# --- processors (greedy, beam and sampling) --------------------------------------------------


@struct.dataclass
class HammingDiversity:
    """Group beam search's diversity penalty: each token loses ``penalty`` times the number of
    times the earlier groups chose it at this step (``ctx.chosen``)."""

    penalty: jax.Array

    def __call__(self, scores, ctx):
        if ctx.chosen is None or ctx.chosen.shape[-1] == 0:
            return scores
        counts = (ctx.chosen[:, :, None] == jnp.arange(scores.shape[-1])).sum(1)
        return scores - self.penalty * counts.astype(scores.dtype)


@struct.dataclass
class MinLength:
    """EOS impossible while ``cur_len < min_length`` (prompt included)."""

    min_length: int = struct.field(pytree_node=False)
    eos_token_ids: tuple[int, ...] = struct.field(pytree_node=False)

    def __call__(self, scores, ctx):
        ban = _vocab_mask(scores.shape[-1], self.eos_token_ids) & (ctx.cur_len < self.min_length)
        return jnp.where(ban, NEG_INF, scores)


@struct.dataclass
class MinNewTokens:
    """EOS impossible until ``min_new_tokens`` tokens were generated."""

    prompt_len: jax.Array
    min_new_tokens: int = struct.field(pytree_node=False)
    eos_token_ids: tuple[int, ...] = struct.field(pytree_node=False)

    def __call__(self, scores, ctx):
        ban = _vocab_mask(scores.shape[-1], self.eos_token_ids) & (
            ctx.cur_len - self.prompt_len < self.min_new_tokens
        )
        return jnp.where(ban, NEG_INF, scores)


@struct.dataclass
class RepetitionPenalty:
    """Divides positive / multiplies negative scores of tokens seen in the row (not its left padding)."""

    penalty: jax.Array

    def __call__(self, scores, ctx):
        rows, vocab = scores.shape
        col = jnp.arange(ctx.sequences.shape[1])
        seen = ctx.history_mask() & (col[None, :] - ctx.offset >= ctx.pad_lengths[:, None])
        tokens = jnp.where(seen, ctx.sequences, vocab)
        mask = jnp.zeros((rows, vocab + 1), bool).at[jnp.arange(rows)[:, None], tokens].set(True)[:, :vocab]
        penalized = jnp.where(scores < 0, scores * self.penalty, scores / self.penalty)
        return jnp.where(mask, penalized, scores)


@struct.dataclass
class EncoderRepetitionPenalty:
    """transformers' encoder repetition penalty, which for a decoder-only model is the prompt's:
    multiplies negative / divides positive scores of the tokens of the row's prompt as passed (its
    left padding included, as there) by ``inverse = 1 / encoder_repetition_penalty``: a penalty
    above 1 favours them."""

    inverse: jax.Array
    prompt_len: jax.Array  # int32[]: a leaf, so that continuous batching stacks prompts of any length

    def __call__(self, scores, ctx):
        rows, vocab = scores.shape
        col = jnp.arange(ctx.sequences.shape[1])
        prompt = (col >= ctx.offset) & (col < ctx.offset + self.prompt_len)
        tokens = jnp.where(prompt[None, :], ctx.sequences, vocab)
        mask = jnp.zeros((rows, vocab + 1), bool).at[jnp.arange(rows)[:, None], tokens].set(True)[:, :vocab]
        favoured = jnp.where(scores < 0, scores * self.inverse, scores / self.inverse)
        return jnp.where(mask, favoured, scores)


def _ban_ngrams(scores, ctx, n: int, history_end: jax.Array, min_len) -> jax.Array:
    """-inf on each token that would complete an n-gram of the row's columns ``[ctx.offset,
    history_end)`` whose first ``n - 1`` tokens end the row now; none while ``cur_len < min_len``."""
    rows, vocab = scores.shape
    seq = ctx.sequences
    total = seq.shape[1]
    if total < n:
        return scores
    windows = jnp.stack([seq[:, j:total - n + 1 + j] for j in range(n)], axis=-1)  # [rows, W, n]
    start = jnp.arange(total - n + 1)
    valid = (start >= ctx.offset) & (start + n <= history_end)
    prefix_start = jnp.maximum(ctx.end - (n - 1), 0)
    prefix = jax.lax.dynamic_slice_in_dim(seq, prefix_start, n - 1, axis=1)  # [rows, n-1]
    matches = (windows[..., :-1] == prefix[:, None, :]).all(-1) & valid[None, :]
    matches &= ctx.cur_len >= min_len
    banned_tokens = jnp.where(matches, windows[..., -1], vocab)
    banned = jnp.zeros((rows, vocab + 1), bool).at[jnp.arange(rows)[:, None], banned_tokens].set(True)
    return jnp.where(banned[:, :vocab], NEG_INF, scores)


@struct.dataclass
class NoRepeatNGram:
    """Bans tokens that would repeat an n-gram of the row's history (left padding included, as HF)."""

    ngram_size: int = struct.field(pytree_node=False)

    def __call__(self, scores, ctx):
        return _ban_ngrams(scores, ctx, self.ngram_size, ctx.end, self.ngram_size)


@struct.dataclass
class EncoderNoRepeatNGram:
    """transformers' encoder n-gram ban, which for a decoder-only model is the prompt's: bans
    tokens that would repeat an n-gram of the row's prompt as passed (left padding included, as
    there) once ``n - 1`` tokens exist to match."""

    ngram_size: int = struct.field(pytree_node=False)
    prompt_len: jax.Array  # int32[], a leaf as `EncoderRepetitionPenalty`'s

    def __call__(self, scores, ctx):
        n = self.ngram_size
        return _ban_ngrams(scores, ctx, n, ctx.offset + self.prompt_len, n - 1)


@struct.dataclass
class SequenceBias:
    """Adds a bias to the last token of each sequence whose prefix ends the row (``bad_words_ids``
    is this with bias -inf).

    As transformers: single tokens are one constant bias row; longer sequences are matched in
    groups of equal prefix length, one comparison and one scatter-add per group, so that hundreds
    of banned words cost a few vectorised ops, not one each (270 banned words, sampling batch 8
    with GPT-2 124M on 2 Zen 5 cores: 27.3 -> 23.8 ms a step, first call 10.2 -> 4.1 s).
    """

    sequences: tuple[tuple[int, ...], ...] = struct.field(pytree_node=False)
    biases: jax.Array  # float32[len(sequences)]

    def __call__(self, scores, ctx):
        single = [i for i, seq in enumerate(self.sequences) if len(seq) == 1]
        ids = jnp.asarray([self.sequences[i][0] for i in single], jnp.int32)
        bias = jnp.zeros(scores.shape[-1:], scores.dtype).at[ids].set(self.biases[jnp.asarray(single, jnp.int32)])
        bias = jnp.broadcast_to(bias, scores.shape)
        groups: dict[int, list[int]] = {}
        for i, seq in enumerate(self.sequences):
            if len(seq) > 1:
                groups.setdefault(len(seq) - 1, []).append(i)
        for length, members in groups.items():
            if length > ctx.sequences.shape[1]:  # longer than any history this call holds: never matches
                continue
            prefixes = jnp.asarray([self.sequences[i][:-1] for i in members], jnp.int32)  # [m, length]
            last = jnp.asarray([self.sequences[i][-1] for i in members], jnp.int32)
            tail = jax.lax.dynamic_slice_in_dim(ctx.sequences, jnp.maximum(ctx.end - length, 0), length, axis=1)
            hit = (tail[:, None, :] == prefixes).all(-1) & (ctx.cur_len >= length)  # [rows, m]
            bias = bias.at[:, last].add(jnp.where(hit, self.biases[jnp.asarray(members, jnp.int32)], 0.0))
        return scores + bias


@struct.dataclass
class ForcedBOS:
    """Forces ``bos_token_id`` when ``cur_len == 1``."""

    bos_token_id: int = struct.field(pytree_node=False)

    def __call__(self, scores, ctx):
        forced = jnp.full_like(scores, NEG_INF).at[:, self.bos_token_id].set(0.0)
        return jnp.where(ctx.cur_len == 1, forced, scores)


@struct.dataclass
class ForcedEOS:
    """Forces an EOS token at the last step (``cur_len == max_length - 1``)."""

    max_length: jax.Array
    eos_token_ids: tuple[int, ...] = struct.field(pytree_node=False)

    def __call__(self, scores, ctx):
        forced = jnp.full_like(scores, NEG_INF).at[:, jnp.asarray(self.eos_token_ids)].set(0.0)
        return jnp.where(ctx.cur_len == self.max_length - 1, forced, scores)


@struct.dataclass
class RemoveInvalidValues:
    """NaN -> 0, +-inf -> the dtype's max / min."""

    def __call__(self, scores, ctx):
        info = jnp.finfo(scores.dtype)
        scores = jnp.where(jnp.isnan(scores), 0.0, scores)
        return jnp.clip(scores, info.min, info.max)


@struct.dataclass
class ExponentialDecayLengthPenalty:
    """Raises EOS scores exponentially once ``cur_len > start + prompt_len``."""

    regulation_start: jax.Array
    eos_token_ids: tuple[int, ...] = struct.field(pytree_node=False)
    factor: jax.Array

    def __call__(self, scores, ctx):
        eos = jnp.asarray(self.eos_token_ids)
        idx = ctx.cur_len - self.regulation_start
        eos_scores = scores[:, eos]
        penalty = jnp.abs(eos_scores) * (jnp.power(self.factor, idx.astype(jnp.float32)) - 1)
        penalty = jnp.where(jnp.isfinite(eos_scores) & (idx > 0), penalty, 0.0)
        return scores.at[:, eos].add(penalty)


@struct.dataclass
class SuppressTokens:
    """Tokens that can never be generated."""

    token_ids: tuple[int, ...] = struct.field(pytree_node=False)

    def __call__(self, scores, ctx):
        return jnp.where(_vocab_mask(scores.shape[-1], self.token_ids), NEG_INF, scores)


@struct.dataclass
class SuppressTokensAtBegin:
    """Tokens that cannot be the first generated token (``cur_len == begin_index``)."""

    token_ids: tuple[int, ...] = struct.field(pytree_node=False)
    begin_index: jax.Array

    def __call__(self, scores, ctx):
        ban = _vocab_mask(scores.shape[-1], self.token_ids) & (ctx.cur_len == self.begin_index)
        return jnp.where(ban, NEG_INF, scores)


# --- warpers (sampling only) -------------------------------------------------------------------


@struct.dataclass
class Temperature:
    temperature: jax.Array

    def __call__(self, scores, ctx):
        return scores / self.temperature


@struct.dataclass
class TopK:
    """Keeps the ``top_k`` highest scores (ties at the k-th value kept, as transformers)."""

    top_k: int = struct.field(pytree_node=False)

    def __call__(self, scores, ctx):
        k = min(self.top_k, scores.shape[-1])
        return jnp.where(scores < _kth_largest(scores, k), NEG_INF, scores)


@struct.dataclass
class TopH:
    """Top-H (arXiv:2509.02510, transformers' ``TopHLogitsWarper``): of the ``top_n = 100`` best
    tokens, renormalised among themselves and taken best first, keeps the longest prefix whose
    cumulative entropy ``sum(-p log p)`` stays ``<= top_h`` times their whole entropy; the best
    token always stays.

    The 100 come from `select.top_k` in chunks of 32 (on ``[8, 50257]``: 0.9 ms against 1.6 ms
    for XLA:CPU's ``TopK``, the same values and ids). Exactly equal scores at the 100th place or
    at the cut: the lower id comes first here, where ``torch.topk`` orders ties as it happens
    to. With ``top_h = 1`` the cut falls where the cumulative sum meets the total, so rounding
    (sums taken in another order than torch's) decides whether the last few tokens stay.
    """

    top_h: jax.Array
    top_n: int = struct.field(pytree_node=False, default=100)

    def __call__(self, scores, ctx):
        rows, vocab = scores.shape
        values, ids = select.top_k(scores, min(self.top_n, vocab), chunk=32)
        probs = jax.nn.softmax(values, -1)
        logp = jax.nn.log_softmax(values, -1)
        tau = self.top_h * -jnp.sum(jnp.maximum(logp, jnp.finfo(jnp.float32).min) * probs, -1, keepdims=True)
        entropy = jnp.cumsum(-probs * jnp.log(probs), -1)  # NaN from a zero probability on: dropped, as torch
        selected = (entropy <= tau).at[:, 0].set(True)
        keep = jnp.zeros((rows, vocab), bool).at[jnp.arange(rows)[:, None], ids].set(selected)
        return jnp.where(keep, scores, NEG_INF)


@struct.dataclass
class TopP:
    """Nucleus: drops the low tail whose total probability is ``<= 1 - top_p``.

    transformers sorts the vocabulary and removes the sorted prefix whose cumulative probability
    is ``<= 1 - top_p``; that prefix is every token whose score is ``<= u`` for the largest ``u``
    with ``P(score <= u) <= 1 - top_p``, found here by bisection on the float bits (a sort of
    [8, 50257] costs 64 ms on XLA:CPU, the bisection 4 ms). The ``min_tokens_to_keep`` best
    tokens always stay.

    Exactly equal scores: a group of them that straddles the cut is kept whole, and so is every
    token tied with the ``min_tokens_to_keep``-th best. transformers splits such a group at a
    position that depends on how ``torch.sort`` (not stable on CPU) happened to order it, so no
    deterministic rule matches it there; everywhere else the result is the same.

    After `TopK` (``top_k`` set, as in transformers' default sampling) ``candidates`` is its k:
    every score below the ``candidates``-th best is -inf, so the cut is looked for among those
    best, their probabilities renormalised among them with the tokens tied with the last of them
    counted on it. The 32 halvings then read ``[rows, candidates]``, not the vocabulary (top-k 50
    and top-p 0.9 on ``[8, 50257]``: a GPT-2 124M sampling step 25.9 -> 23.8 ms on 2 Zen 5 cores).
    """

    top_p: jax.Array
    min_tokens_to_keep: int = struct.field(pytree_node=False)
    candidates: int | None = struct.field(pytree_node=False, default=None)

    def __call__(self, scores, ctx):
        keys = _sortable(scores)
        if self.candidates is None or self.candidates > min(_CHUNKED_TOP_K_MAX, scores.shape[-1]):
            probs, cut_keys = jax.nn.softmax(scores, -1), keys
            kth = _kth_largest(scores, self.min_tokens_to_keep)
        else:
            best = select.top_k(scores, self.candidates, chunk=32)[0]  # [rows, candidates]
            top, last = best[:, :1], best[:, -1:]
            ties_outside = jnp.sum(scores == last, -1, keepdims=True) - jnp.sum(best == last, -1, keepdims=True)
            weights = jnp.exp(best - top).at[:, -1:].multiply(1 + ties_outside.astype(jnp.float32))
            probs = weights / jnp.sum(weights, -1, keepdims=True)
            cut_keys = _sortable(best)
            kth = best[:, self.min_tokens_to_keep - 1:self.min_tokens_to_keep]
        tail = _bisect(lambda u: jnp.sum(jnp.where(cut_keys <= u, probs, 0.0), -1) <= 1 - self.top_p, scores.shape[0])
        remove = (keys <= tail[:, None]) & (scores < kth)
        return jnp.where(remove, NEG_INF, scores)


@struct.dataclass
class MinP:
    """Drops tokens whose probability is below ``min_p`` times the top probability."""

    min_p: jax.Array
    min_tokens_to_keep: int = struct.field(pytree_node=False)

    def __call__(self, scores, ctx):
        probs = jax.nn.softmax(scores, -1)
        remove = probs < self.min_p * probs.max(-1, keepdims=True)
        return jnp.where(_spare_best(remove, probs, self.min_tokens_to_keep), NEG_INF, scores)


@struct.dataclass
class Typical:
    """Locally typical sampling: keeps the tokens whose ``|-log p - entropy|`` is smallest, up to
    probability ``mass``.

    transformers sorts the vocabulary by that distance and cuts where the cumulative probability
    first reaches ``mass``, keeping every token whose distance is ``<=`` the distance there. That
    cut is the smallest distance ``d`` with ``P(distance <= d) >= mass``, i.e. the largest ``d``
    with ``P(distance < d) < mass``, found here by bisection on the float bits (an argsort of
    [8, 50257] costs 60-110 ms on XLA:CPU, the bisection a few). The ``min_tokens_to_keep``
    tokens of smallest distance stay (among exact ties, the lower ids: see `_spare_best`).
    """

    mass: jax.Array
    min_tokens_to_keep: int = struct.field(pytree_node=False)

    def __call__(self, scores, ctx):
        logp = jax.nn.log_softmax(scores, -1)
        probs = jnp.exp(logp)
        entropy = -jnp.nansum(logp * probs, -1, keepdims=True)
        distance = jnp.abs(-logp - entropy)
        keys = _sortable(distance)
        cut = _bisect(lambda u: jnp.sum(jnp.where(keys < u, probs, 0.0), -1) < self.mass, scores.shape[0])
        remove = _spare_best(keys > cut[:, None], -distance, self.min_tokens_to_keep)
        return jnp.where(remove, NEG_INF, scores)


@struct.dataclass
class EpsilonCutoff:
    """Drops tokens with probability below ``epsilon``."""

    epsilon: jax.Array
    min_tokens_to_keep: int = struct.field(pytree_node=False)

    def __call__(self, scores, ctx):
        k = min(self.min_tokens_to_keep, scores.shape[-1])
        remove = (jax.nn.softmax(scores, -1) < self.epsilon) & (scores < _kth_largest(scores, k))
        return jnp.where(remove, NEG_INF, scores)


@struct.dataclass
class EtaCutoff:
    """Drops tokens below ``min(eta, sqrt(eta) * exp(-entropy))``."""

    epsilon: jax.Array
    min_tokens_to_keep: int = struct.field(pytree_node=False)

    def __call__(self, scores, ctx):
        logp = jax.nn.log_softmax(scores, -1)
        probs = jnp.exp(logp)
        entropy = -jnp.sum(jnp.where(probs > 0, probs * logp, 0.0), -1, keepdims=True)
        eta = jnp.minimum(self.epsilon, jnp.sqrt(self.epsilon) * jnp.exp(-entropy))
        k = min(self.min_tokens_to_keep, scores.shape[-1])
        remove = (probs < eta) & (scores < _kth_largest(scores, k))
        return jnp.where(remove, NEG_INF, scores)


@struct.dataclass
class Renormalize:
    """``renormalize_logits=True``: a final log-softmax."""

    def __call__(self, scores, ctx):
        return jax.nn.log_softmax(scores, -1)


Processor = Callable[[jax.Array, ProcessorContext], jax.Array]


def apply(processors: Sequence[Processor], scores: jax.Array, ctx: ProcessorContext) -> jax.Array:
    for proc in processors:
        scores = proc(scores, ctx)
    return scores


def build_processors(
    *,
    prompt_len: int,
    max_length: int,
    eos_token_ids: tuple[int, ...],
    num_beams: int,
    do_sample: bool,
    repetition_penalty: float | None = None,
    no_repeat_ngram_size: int | None = None,
    encoder_repetition_penalty: float | None = None,
    encoder_no_repeat_ngram_size: int | None = None,
    bad_words_ids: Sequence[Sequence[int]] | None = None,
    sequence_bias: dict[tuple[int, ...], float] | None = None,
    min_length: int | None = None,
    min_new_tokens: int | None = None,
    forced_bos_token_id: int | None = None,
    forced_eos_token_id: int | Sequence[int] | None = None,
    remove_invalid_values: bool = False,
    exponential_decay_length_penalty: tuple[int, float] | None = None,
    suppress_tokens: Sequence[int] | None = None,
    begin_suppress_tokens: Sequence[int] | None = None,
    logits_processor: Sequence[Processor] = (),
    temperature: float | None = None,
    top_h: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    typical_p: float | None = None,
    epsilon_cutoff: float | None = None,
    eta_cutoff: float | None = None,
    renormalize_logits: bool = False,
    diversity_penalty: float | None = None,
    neutral: bool = False,
) -> tuple[Any, ...]:
    """The processor list transformers 5.x builds for these (already validated) arguments.

    ``neutral``: also build the repetition penalty, and when sampling the temperature, top-p and
    min-p processors, where their values leave the scores as they are (1, 1, 1, 0), so that
    requests that differ only in these values share one list (continuous batching; each is then
    an identity, or for top-p 1 drops only tokens of probability 0)."""
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    i32 = lambda x: jnp.asarray(x, jnp.int32)  # noqa: E731
    procs: list[Any] = []
    if sequence_bias:
        seqs = tuple(tuple(int(t) for t in s) for s in sequence_bias)
        procs.append(SequenceBias(seqs, f32([sequence_bias[s] for s in sequence_bias])))
    if diversity_penalty is not None and diversity_penalty > 0.0:
        procs.append(HammingDiversity(f32(diversity_penalty)))
    if encoder_repetition_penalty is not None and encoder_repetition_penalty != 1.0:
        procs.append(EncoderRepetitionPenalty(f32(1 / encoder_repetition_penalty), i32(prompt_len)))
    if (repetition_penalty is not None and repetition_penalty != 1.0) or neutral:
        procs.append(RepetitionPenalty(f32(1.0 if repetition_penalty is None else repetition_penalty)))
    if no_repeat_ngram_size:
        procs.append(NoRepeatNGram(no_repeat_ngram_size))
    if encoder_no_repeat_ngram_size:
        procs.append(EncoderNoRepeatNGram(encoder_no_repeat_ngram_size, i32(prompt_len)))
    if bad_words_ids:
        seqs = tuple(tuple(s) for s in bad_words_ids if not (len(s) == 1 and s[0] in eos_token_ids))
        if seqs:
            procs.append(SequenceBias(seqs, f32([NEG_INF] * len(seqs))))
    if min_length and eos_token_ids:
        procs.append(MinLength(min_length, eos_token_ids))
    if min_new_tokens and eos_token_ids:
        procs.append(MinNewTokens(i32(prompt_len), min_new_tokens, eos_token_ids))
    if forced_bos_token_id is not None:
        procs.append(ForcedBOS(forced_bos_token_id))
    if forced_eos_token_id is not None:
        ids = (forced_eos_token_id,) if isinstance(forced_eos_token_id, int) else tuple(forced_eos_token_id)
        procs.append(ForcedEOS(i32(max_length), ids))
    if remove_invalid_values:
        procs.append(RemoveInvalidValues())
    if exponential_decay_length_penalty is not None:
        start, factor = exponential_decay_length_penalty
        procs.append(ExponentialDecayLengthPenalty(i32(start + prompt_len), eos_token_ids, f32(factor)))
    if suppress_tokens:
        procs.append(SuppressTokens(tuple(suppress_tokens)))
    if begin_suppress_tokens:
        begin = prompt_len if (prompt_len > 1 or forced_bos_token_id is None) else prompt_len + 1
        procs.append(SuppressTokensAtBegin(tuple(begin_suppress_tokens), i32(begin)))
    procs.extend(logits_processor)
    if do_sample:
        keep = len(eos_token_ids) + 1 if num_beams > 1 and eos_token_ids else (2 if num_beams > 1 else 1)
        if (temperature is not None and temperature != 1.0) or neutral:
            procs.append(Temperature(f32(1.0 if temperature is None else temperature)))
        if top_h is not None:
            procs.append(TopH(f32(top_h)))
        if top_k:
            procs.append(TopK(max(top_k, keep)))
        if (top_p is not None and top_p < 1.0) or neutral:
            procs.append(TopP(f32(1.0 if top_p is None else top_p), keep, max(top_k, keep) if top_k else None))
        if min_p is not None or neutral:
            procs.append(MinP(f32(0.0 if min_p is None else min_p), keep))
        if typical_p is not None and typical_p < 1.0:
            procs.append(Typical(f32(typical_p), keep))
        if epsilon_cutoff is not None and 0.0 < epsilon_cutoff < 1.0:
            procs.append(EpsilonCutoff(f32(epsilon_cutoff), keep))
        if eta_cutoff is not None and 0.0 < eta_cutoff < 1.0:
            procs.append(EtaCutoff(f32(eta_cutoff), keep))
    if renormalize_logits:
        procs.append(Renormalize())
    return tuple(procs)
