"""Assisted (speculative) greedy decoding: prompt lookup (transformers' ``prompt_lookup_num_tokens``)
or a draft model (``assistant_model``): several tokens a forward pass where the drafts are right,
with greedy search's output (its tokens; its scores up to float rounding: a forward over ``K + 1``
tokens sums in another order than over one).

Each iteration every row drafts up to ``K`` tokens: by finding its last n-gram (the longest of
``max_matching_ngram_size`` down to 1) earlier in its own text and copying what followed it, or
as the draft model's greedy tokens (`model_draft`, on a cache of its own); one forward pass of
``K + 1`` tokens (its last token, then the draft) gives the logits after each;
the row keeps the draft's longest prefix that greedy search would have chosen, plus greedy's own
next token. So each row advances by 1 to ``K + 1`` tokens, at its own pace (per-row cache write
slots and columns). A row that finished keeps emitting ``pad_token_id`` as greedy search does, a
whole iteration at a time, so that its scores at every step are greedy's too.

Shapes: ``rows`` = batch, ``P`` bucketed prompt, ``N`` = max_new_tokens, ``K`` = the draft
length; the token buffer and the cache hold ``P + N + K + 1`` columns (a draft may run past N).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxgen.decoding import engine, select
from jaxgen.decoding.engine import DecodeSpec
from jaxgen.models.cache import KVCache
from jaxgen.models.model import CausalLM, forward
from jaxgen.models.model import logits as logits_of
from jaxgen.outputs import GenerateOutput


@struct.dataclass
class LookupState:
    """Loop carry. sequences: int32[rows, P + N + K + 1]; generated: int32[rows], tokens each row
    has (its next token goes to column ``P + generated``); ended: int32[rows], where each row's
    real tokens end (``N`` until it finishes); unfinished: bool[rows]; cache; draft_cache: the
    draft model's (None for prompt lookup); scores / raw_logits: float32[N, rows, V] or None;
    done: bool[]."""

    sequences: jax.Array
    generated: jax.Array
    ended: jax.Array
    unfinished: jax.Array
    cache: KVCache
    draft_cache: KVCache | None
    scores: jax.Array | None
    raw_logits: jax.Array | None
    done: jax.Array


def draft(row: jax.Array, first: jax.Array, end: jax.Array, k: int, max_ngram: int) -> tuple[jax.Array, jax.Array]:
    """A row's draft: (int32[k] tokens, int32[] how many are real) from its text ``row[first:end]``:
    the continuation of the earliest earlier occurrence of its last n-gram, longest n first
    (transformers' ``PromptLookupCandidateGenerator``); none where no n-gram recurs."""
    width = row.shape[0]
    cols = jnp.arange(width)
    start, count = jnp.int32(0), jnp.int32(0)
    for n in range(1, max_ngram + 1):  # longer n-grams, found later, take precedence
        gram = jax.lax.dynamic_slice_in_dim(row, jnp.maximum(end - n, 0), n)
        match = jnp.ones((width,), bool)
        for j in range(n):
            match &= jnp.roll(row, -j) == gram[j]
        match &= (cols >= first) & (cols + n < end) & (end - n >= first)
        found = match.any()
        at = jnp.argmax(match) + n
        start = jnp.where(found, at, start)
        count = jnp.where(found, jnp.minimum(k, end - at), count)
    tokens = jax.lax.dynamic_slice_in_dim(jnp.concatenate([row, jnp.zeros((k,), row.dtype)]), start, k)
    return tokens, count


def model_draft(assistant: CausalLM, cache: KVCache, sequences, last, position, kv_mask, k: int, spec: DecodeSpec):
    """The draft model's ``k`` greedy tokens after each row's column ``last`` (int32[rows]; its
    position id ``position``): it first feeds columns ``last - 1`` and ``last`` (the last
    iteration left at most these two unseen: a draft it did not feed, and the target's own
    token; a slot it saw is rewritten with the same token), then each of its tokens but the last.
    Returns (int32[rows, k], its cache)."""
    def step(fed, at, cache):
        hidden, cache = forward(assistant, fed, position[:, None] + (at - last)[:, None] + jnp.arange(fed.shape[1]),
                                kv_mask, cache, at, spec.row_shards)
        return select.first_argmax(logits_of(assistant, hidden[:, -1], spec.row_shards)), cache

    fed = jnp.take_along_axis(sequences, last[:, None] + jnp.arange(-1, 1)[None], axis=1)  # [rows, 2]
    token, cache = step(fed, last - 1, cache)

    def body(i, carry):
        tokens, token, cache = carry
        tokens = tokens.at[:, i].set(token)
        token, cache = step(token[:, None], last + 1 + i, cache)
        return tokens, token, cache

    tokens, token, cache = jax.lax.fori_loop(0, k - 1, body, (jnp.zeros((last.shape[0], k), jnp.int32), token, cache))
    return tokens.at[:, k - 1].set(token), cache


def decode(model: CausalLM, input_ids, attention_mask, prompt_len, processors, key, streamer_id, spec: DecodeSpec,
           assistant: CausalLM | None = None) -> GenerateOutput:
    """Greedy search of ``input_ids: int32[batch, P]`` with drafts of ``spec.lookup`` tokens: the
    ``assistant`` model's, or without one prompt lookup's."""
    k, n_max, pad = spec.lookup, spec.max_new_tokens, spec.pad_token_id if spec.pad_token_id is not None else 0
    width = spec.total_len + k + 1
    pre = engine.prefill(model, input_ids, attention_mask, prompt_len, spec, 1, rings=False)
    draft_cache = None
    if assistant is not None:
        draft_cache = engine.prefill(assistant, input_ids, attention_mask, prompt_len, spec, 1, rings=False).cache
        draft_cache = draft_cache.grow(width)
    rows, vocab = pre.logits.shape
    offset = spec.bucket_len - prompt_len
    first_real = offset + pre.pad_lengths  # [rows]: the column of each row's first real token
    kv_mask = jnp.concatenate([pre.kv_mask, jnp.ones((rows, k + 1), bool)], axis=1)
    finishes = bool(spec.eos_token_ids or spec.stop_sequences)

    def processed(sequences, scores, steps):
        """Each row's processors at its own step: scores float32[rows, V], steps int32[rows]."""
        return engine.process_rows(processors, scores, sequences, prompt_len + steps, pre.pad_lengths, offset)

    # The first token, from the prompt's logits, as greedy search's first step.
    sequences = jnp.pad(jnp.asarray(input_ids, jnp.int32), ((0, 0), (0, width - spec.bucket_len)),
                        constant_values=pad)
    scores0 = processed(sequences, pre.logits, jnp.zeros((rows,), jnp.int32))
    token = select.first_argmax(scores0)
    sequences = sequences.at[:, spec.bucket_len].set(token)
    hit = engine.hits_stop(sequences, spec.bucket_len, offset, spec)
    state = LookupState(
        sequences=sequences, generated=jnp.ones((rows,), jnp.int32),
        ended=jnp.where(hit, 1, n_max).astype(jnp.int32), unfinished=~hit,
        cache=pre.cache.grow(width), draft_cache=draft_cache,
        scores=engine.record(engine.score_buffer(spec.output_scores, spec, rows, vocab), 0, scores0),
        raw_logits=engine.record(engine.score_buffer(spec.output_logits, spec, rows, vocab), 0, pre.logits),
        done=jnp.all(hit) | (n_max == 1))
    catch_up = spec.output_scores or spec.output_logits  # finished rows fill their scores up to the end

    def iteration(s: LookupState) -> LookupState:
        last = spec.bucket_len + s.generated - 1  # [rows]: the column of each row's last token
        position = pre.positions + s.generated - 1  # [rows]: its position id
        draft_cache = s.draft_cache
        if assistant is None:
            tokens, count = jax.vmap(lambda row, f, e: draft(row, f, e, k, spec.lookup_ngram))(
                s.sequences, first_real, last + 1)
        else:
            tokens, draft_cache = model_draft(assistant, draft_cache, s.sequences, last, position, kv_mask, k, spec)
            count = jnp.full((rows,), k, jnp.int32)
        room = n_max - s.generated - 1  # drafts beyond max_new_tokens could never be kept
        count = jnp.where(s.unfinished, jnp.clip(count, 0, jnp.maximum(room, 0)), 0)
        j = jnp.arange(k)
        drafted = jnp.where(j[None] < count[:, None], tokens, pad)
        cols = last[:, None] + 1 + j[None]  # [rows, k]
        with_draft = _put(s.sequences, cols, drafted)
        fed = jnp.concatenate([jnp.take_along_axis(s.sequences, last[:, None], 1), drafted], axis=1)  # [rows, k+1]
        positions = position[:, None] + jnp.arange(k + 1)[None]
        hidden, cache = forward(model, fed, positions, kv_mask, s.cache, last, spec.row_shards)
        raw = logits_of(model, hidden, spec.row_shards)  # [rows, k+1, V]
        steps = s.generated[:, None] + jnp.arange(k + 1)[None]  # the step each position's token is
        scores = jax.vmap(processed, in_axes=(None, 1, 1), out_axes=1)(with_draft, raw, steps)
        greedy = select.first_argmax(scores)  # [rows, k+1]
        # Keep the draft's prefix that greedy agrees with, then greedy's next token; a finished row
        # keeps its pads (K + 1 of them).
        agree = jnp.cumprod((drafted == greedy[:, :k]) & (j[None] < count[:, None]), axis=1).sum(1)
        new = jnp.where(s.unfinished[:, None], greedy, pad)
        keep = jnp.where(s.unfinished, agree + 1, k + 1)
        new_cols = last[:, None] + 1 + jnp.arange(k + 1)[None]  # [rows, k+1]
        sequences = _put(s.sequences, new_cols, jnp.where(jnp.arange(k + 1)[None] < keep[:, None], new, pad))
        # Where the kept tokens end the row: an EOS or a stop sequence, or max_new_tokens.
        if finishes:
            hits = jax.vmap(jax.vmap(lambda row, c: engine.hits_stop(row, c, offset, spec), in_axes=(None, 0)))
            stops = hits(sequences, new_cols) & s.unfinished[:, None] & (jnp.arange(k + 1)[None] < keep[:, None])
            first_stop = jnp.where(stops.any(1), jnp.argmax(stops, 1), k + 1)
            keep = jnp.minimum(keep, first_stop + 1)
        else:
            stops = jnp.zeros((rows, k + 1), bool)
        keep = jnp.minimum(keep, n_max - s.generated)
        kept = jnp.arange(k + 1)[None] < keep[:, None]
        sequences = _put(s.sequences, new_cols, jnp.where(kept, new, pad))
        stopped = (stops & kept).any(1)
        generated = s.generated + keep
        unfinished = s.unfinished & ~stopped & (generated < n_max)
        ended = jnp.where(s.unfinished & ~unfinished, generated, s.ended)
        target = jnp.max(jnp.where(unfinished, n_max, ended))
        done = ~unfinished.any()
        if catch_up:
            done &= jnp.all(generated >= target)
        record = jnp.where(kept, steps, n_max)  # out of range: dropped
        return s.replace(
            sequences=sequences, generated=generated, ended=ended, unfinished=unfinished,
            cache=cache, draft_cache=draft_cache, done=done,
            scores=_record_rows(s.scores, record, scores), raw_logits=_record_rows(s.raw_logits, record, raw))

    final = jax.lax.while_loop(lambda s: ~s.done, iteration, state)
    num_steps = jnp.max(final.ended)
    zeros_after = lambda buf: None if buf is None else jnp.where(  # noqa: E731  (as greedy's: 0 past num_steps)
        jnp.arange(n_max)[:, None, None] < num_steps, buf, 0.0)
    return GenerateOutput(
        sequences=final.sequences[:, :spec.total_len], num_steps=num_steps, scores=zeros_after(final.scores),
        logits=zeros_after(final.raw_logits), sequences_scores=None, beam_indices=None, prompt_len=prompt_len,
        bucket_len=spec.bucket_len, output_scores=spec.output_scores)


def _put(sequences, cols, values):
    """``sequences[r, cols[r, i]] = values[r, i]`` (columns past the buffer dropped)."""
    rows = jnp.arange(sequences.shape[0])[:, None]
    return sequences.at[rows, cols].set(values, mode="drop")


def _record_rows(buffer, steps, values):
    """``buffer[steps[r, i], r] = values[r, i]``: buffer float32[N, rows, V], steps int32[rows, k+1]
    (N or more: dropped), values float32[rows, k+1, V]."""
    if buffer is None:
        return None
    rows = jnp.arange(buffer.shape[1])[:, None]
    return buffer.at[steps, rows].set(values, mode="drop")
