"""Assisted (speculative) decoding: drafts from prompt lookup (transformers'
``prompt_lookup_num_tokens``) or a draft model (``assistant_model``, or the model's own first
layers: ``assistant_early_exit``), verified several tokens a forward pass. Greedy: greedy
search's output (its tokens; its scores up to float rounding, a forward over ``K + 1`` tokens
summing in another order than over one). Sampling: the target's distribution exactly.

Each iteration every row drafts up to ``K`` tokens: by finding its last n-gram (the longest of
``max_matching_ngram_size`` down to 1) earlier in its own text and copying what followed it, or
as the draft model's tokens (`model_draft`, on a cache of its own, under the same processors);
one forward pass of ``K + 1`` tokens (its last token, then the draft) gives the target's scores
after each, and `accept` keeps the draft's longest acceptable prefix plus one token of the
target's own. So each row advances by 1 to ``K + 1`` tokens, at its own pace (per-row cache write
slots and columns). A row that finished keeps emitting ``pad_token_id`` as greedy search does, a
whole iteration at a time, so that its scores at every step are greedy's too. Attentions and
hidden states, when asked, are the verify forward's at each kept position: greedy's as well.

Shapes: ``rows`` = batch, ``P`` bucketed prompt, ``N`` = max_new_tokens, ``K`` = the most tokens
drafted; the token buffer and the caches hold ``P + N + K + 1`` columns (a draft may run past N).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from jaxgen.decoding import engine, select
from jaxgen.decoding.engine import DecodeSpec
from jaxgen.models.cache import KVCache
from jaxgen.models.model import CausalLM, forward
from jaxgen.models.model import logits as logits_of
from jaxgen.outputs import GenerateOutput, LayerRecord


@struct.dataclass
class Assistant:
    """The draft model, and its confidence threshold (float32[]): a row stops drafting after a
    token its processed distribution gives less probability (transformers' ``ConfidenceCriteria``;
    used where ``spec.lookup_confidence``)."""

    model: CausalLM
    confidence: jax.Array


@struct.dataclass
class LookupState:
    """Loop carry. sequences: int32[rows, P + N + K + 1]; generated: int32[rows], tokens each row
    has (its next token goes to column ``P + generated``); ended: int32[rows], where each row's
    real tokens end (``N`` until it finishes); unfinished: bool[rows]; cache; draft_cache: the
    draft model's (None for prompt lookup); scores / raw_logits: float32[N, rows, V] or None;
    done: bool[]; iteration: int32[], for the random keys; draft_len: int32[rows], tokens each row
    drafts next (transformers' ``num_assistant_tokens``, moved by the heuristic schedules);
    drafted / accepted: int32[rows], draft tokens proposed and kept so far; streamed: int32[],
    steps handed to the streamer; layers: the attentions and hidden states of each kept step
    (`LayerRecord`), or None."""

    sequences: jax.Array
    generated: jax.Array
    ended: jax.Array
    unfinished: jax.Array
    cache: KVCache
    draft_cache: KVCache | None
    scores: jax.Array | None
    raw_logits: jax.Array | None
    done: jax.Array
    iteration: jax.Array
    draft_len: jax.Array
    drafted: jax.Array
    accepted: jax.Array
    streamed: jax.Array
    layers: LayerRecord | None


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


def model_draft(assistant: Assistant, cache: KVCache, sequences, last, position, kv_mask, limit, choose,
                spec: DecodeSpec):
    """The draft model's tokens after each row's column ``last`` (int32[rows]; its position id
    ``position``), at most ``limit`` (int32[rows], <= K) a row: ``choose(logits, sequences, i)``
    turns its logits for draft token ``i`` into (int32[rows] tokens, float32[rows, V] the
    processed scores they were chosen from). It first feeds columns ``last - 1`` and ``last``
    (the last iteration left at most these two unseen: a draft it did not feed, and the target's
    own token; a slot it saw is rewritten with the same token), then each token but a row's last,
    while any row drafts. Returns (int32[rows, K] tokens, int32[rows] how many a row drafted,
    float32[rows, K, V] the probabilities they were drawn from (sampling) or None, the draft
    cache)."""
    k = spec.lookup

    def step(fed, at, cache):
        positions = position[:, None] + (at - last)[:, None] + jnp.arange(fed.shape[1])
        hidden, cache = forward(assistant.model, fed, positions, kv_mask, cache, at, spec.row_shards)
        return logits_of(assistant.model, hidden[:, -1], spec.row_shards), cache

    def pick(i, logits, carry):
        """Draft token ``i`` of the rows still drafting; a row stops at its limit, or after a token
        its draft is not confident of."""
        sequences, tokens, drawn_from, count, drafting = carry
        token, scores = choose(logits, sequences, i)
        sequences = _put(sequences, (last + 1 + i)[:, None], token[:, None])
        tokens = tokens.at[:, i].set(token)
        probs = jax.nn.softmax(scores, -1) if drawn_from is not None or spec.lookup_confidence else None
        drawn_from = None if drawn_from is None else drawn_from.at[:, i].set(probs)
        count = jnp.where(drafting, i + 1, count)
        drafting &= i + 1 < limit
        if spec.lookup_confidence:
            drafting &= jnp.take_along_axis(probs, token[:, None], 1)[:, 0] >= assistant.confidence
        return sequences, tokens, drawn_from, count, drafting

    rows, vocab = sequences.shape[0], assistant.model.config.vocab_size
    fed = jnp.take_along_axis(sequences, last[:, None] + jnp.arange(-1, 1)[None], axis=1)  # [rows, 2]
    logits, cache = step(fed, last - 1, cache)
    drawn_from = jnp.zeros((rows, k, vocab), jnp.float32) if spec.do_sample else None
    carry = pick(0, logits, (sequences, jnp.zeros((rows, k), jnp.int32), drawn_from, jnp.zeros((rows,), jnp.int32),
                             limit > 0))

    def body(loop):
        i, carry, cache = loop
        logits, cache = step(carry[1][:, i - 1, None], last + i, cache)
        return i + 1, pick(i, logits, carry), cache

    _, (_, tokens, drawn_from, count, _), cache = jax.lax.while_loop(
        lambda loop: (loop[0] < k) & loop[1][-1].any(), body, (1, carry, cache))
    return tokens, count, drawn_from, cache


def accept(scores, drafted, count, draft_probs, key, do_sample: bool):
    """Which drafted tokens a row keeps, and the target's token after them.

    scores: float32[rows, K + 1, V], the target's processed scores after the row's last token and
    after each drafted token; drafted: int32[rows, K], ``count`` (int32[rows]) of them real;
    draft_probs: float32[rows, K, V] the probabilities the draft model drew them from, or None.
    Greedy: the drafts equal to the target's argmax, then its argmax. Sampling without
    draft_probs (prompt lookup): a draw at every position, the drafts equal to the draws, then
    the next draw. With them, speculative sampling: draft ``i`` stays with probability
    ``min(1, p_i / q_i)`` (its target and draft probabilities) while all before it stayed, then a
    draw from ``max(p - q, 0)`` normalised at the first rejected position, or from ``p`` after a
    whole draft (transformers' ``_speculative_sampling``): the target's distribution, whatever the
    draft's. Returns (int32[rows, K + 1] the tokens from each position on, its prefix of drafts
    and then the target's; int32[rows] how many drafts stay)."""
    k = drafted.shape[1]
    real = jnp.arange(k)[None] < count[:, None]
    key_draw, key_accept = jax.random.split(key) if do_sample else (None, None)
    if draft_probs is None:
        chosen = select.categorical(key_draw, scores) if do_sample else select.first_argmax(scores)
        agree = jnp.cumprod((drafted == chosen[:, :k]) & real, axis=1).sum(1)
        return chosen, agree
    p, q = jax.nn.softmax(scores, -1), draft_probs
    p_i = jnp.take_along_axis(p[:, :k], drafted[..., None], 2)[..., 0]
    q_i = jnp.take_along_axis(q, drafted[..., None], 2)[..., 0]
    stays = jax.random.uniform(key_accept, p_i.shape) < p_i / q_i
    agree = jnp.cumprod(stays & real, axis=1).sum(1)
    at = lambda x, i: jnp.take_along_axis(x, i[:, None, None], 1)[:, 0]  # noqa: E731  x[r, i[r]]
    p_next = at(p, agree)
    residual = jnp.where((agree < count)[:, None], jnp.maximum(p_next - at(q, jnp.minimum(agree, k - 1)), 0), p_next)
    token = select.categorical(key_draw, jnp.where(residual > 0, jnp.log(residual), -jnp.inf))
    chosen = jnp.where(jnp.arange(k + 1)[None] < agree[:, None], jnp.pad(drafted, ((0, 0), (0, 1))), token[:, None])
    return chosen, agree


def decode(model: CausalLM, input_ids, attention_mask, prompt_len, processors, key, streamer_id, spec: DecodeSpec,
           assistant: Assistant | None = None) -> GenerateOutput:
    """Greedy search or sampling of ``input_ids: int32[batch, P]`` with drafts of up to
    ``spec.lookup`` tokens: the ``assistant``'s, or without one prompt lookup's."""
    k, n_max, pad = spec.lookup, spec.max_new_tokens, spec.pad_token_id if spec.pad_token_id is not None else 0
    width = spec.total_len + k + 1
    pre = engine.prefill(model, input_ids, attention_mask, prompt_len, spec, 1, rings=False)
    draft_cache = None
    if assistant is not None:
        uncaptured = dataclasses.replace(spec, output_attentions=False, output_hidden_states=None)  # the target's only
        draft_cache = engine.prefill(assistant.model, input_ids, attention_mask, prompt_len, uncaptured, 1,
                                     rings=False).cache
        draft_cache = draft_cache.grow(width)
    rows, vocab = pre.logits.shape
    offset = spec.bucket_len - prompt_len
    first_real = offset + pre.pad_lengths  # [rows]: the column of each row's first real token
    kv_mask = jnp.concatenate([pre.kv_mask, jnp.ones((rows, k + 1), bool)], axis=1)
    finishes = spec.finishes_rows

    def processed(sequences, scores, steps):
        """Each row's processors at its own step: scores float32[rows, V], steps int32[rows]."""
        return engine.process_rows(processors, scores, sequences, prompt_len + steps, pre.pad_lengths, offset)

    def keyed(*data):
        """The key of one draw (None when greedy): ``key`` folded with ``data``."""
        if not spec.do_sample:
            return None
        folded = key
        for d in data:
            folded = jax.random.fold_in(folded, d)
        return folded

    def pick(scores, key):
        return select.categorical(key, scores) if spec.do_sample else select.first_argmax(scores)

    def stream(sequences, start, stop):
        if spec.stream:
            engine.stream_steps(streamer_id, sequences[:, spec.bucket_len:spec.total_len], start, stop)

    # The first token, from the prompt's logits, as greedy search's or sampling's first step.
    sequences = jnp.pad(jnp.asarray(input_ids, jnp.int32), ((0, 0), (0, width - spec.bucket_len)),
                        constant_values=pad)
    scores0 = processed(sequences, pre.logits, jnp.zeros((rows,), jnp.int32))
    sequences = sequences.at[:, spec.bucket_len].set(pick(scores0, keyed(0)))
    stream(sequences, 0, 1)
    hit = engine.hits_stop(sequences, spec.bucket_len, offset, spec)
    zeros = jnp.zeros((rows,), jnp.int32)
    state = LookupState(
        sequences=sequences, generated=jnp.ones((rows,), jnp.int32),
        ended=jnp.where(hit, 1, n_max).astype(jnp.int32), unfinished=~hit,
        cache=pre.cache.grow(width), draft_cache=draft_cache,
        scores=engine.record(engine.score_buffer(spec.output_scores, spec, rows, vocab), 0, scores0),
        raw_logits=engine.record(engine.score_buffer(spec.output_logits, spec, rows, vocab), 0, pre.logits),
        done=jnp.all(hit) | (n_max == 1), iteration=jnp.int32(1), draft_len=zeros + k, drafted=zeros,
        accepted=zeros, streamed=jnp.int32(1), layers=engine.layer_record(model, pre, spec))
    # finished rows fill their scores, attentions and hidden states up to the end
    catch_up = spec.output_scores or spec.output_logits or spec.capture is not None

    def iteration(s: LookupState) -> LookupState:
        last = spec.bucket_len + s.generated - 1  # [rows]: the column of each row's last token
        position = pre.positions + s.generated - 1  # [rows]: its position id
        room = n_max - s.generated - 1  # drafts beyond max_new_tokens could never be kept
        limit = jnp.where(s.unfinished, jnp.clip(jnp.minimum(s.draft_len, room), 0, k), 0)
        draft_cache, draft_probs = s.draft_cache, None
        if assistant is None:
            tokens, count = jax.vmap(lambda row, f, e: draft(row, f, e, k, spec.lookup_ngram))(
                s.sequences, first_real, last + 1)
            count = jnp.minimum(count, limit)
        else:
            def choose(logits, sequences, i):
                scores = processed(sequences, logits, s.generated + i)
                return pick(scores, keyed(s.iteration, i)), scores

            tokens, count, draft_probs, draft_cache = model_draft(assistant, draft_cache, s.sequences, last, position,
                                                                   kv_mask, limit, choose, spec)
        j = jnp.arange(k)
        drafted = jnp.where(j[None] < count[:, None], tokens, pad)
        cols = last[:, None] + 1 + j[None]  # [rows, k]
        with_draft = _put(s.sequences, cols, drafted)
        fed = jnp.concatenate([jnp.take_along_axis(s.sequences, last[:, None], 1), drafted], axis=1)  # [rows, k+1]
        positions = position[:, None] + jnp.arange(k + 1)[None]
        hidden, cache, *outputs = forward(model, fed, positions, kv_mask, s.cache, last, spec.row_shards,
                                          spec.capture)
        raw = logits_of(model, hidden, spec.row_shards)  # [rows, k+1, V]
        steps = s.generated[:, None] + jnp.arange(k + 1)[None]  # the step each position's token is
        scores = jax.vmap(processed, in_axes=(None, 1, 1), out_axes=1)(with_draft, raw, steps)
        chosen, agree = accept(scores, drafted, count, draft_probs, keyed(s.iteration, k), spec.do_sample)
        # Keep the accepted drafts, then the target's next token; a finished row keeps its pads
        # (K + 1 of them).
        new = jnp.where(s.unfinished[:, None], chosen, pad)
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
        # transformers' heuristic schedules: two more drafts after a whole draft was kept (its
        # matches counted after the EOS and length cuts), one fewer (at least one) otherwise.
        draft_len = s.draft_len
        if spec.lookup_schedule:
            whole = keep - 1 == count
            draft_len = jnp.where(s.unfinished, jnp.where(whole, draft_len + 2, jnp.maximum(draft_len - 1, 1)),
                                  draft_len)
        ready = jnp.where(unfinished.any(), jnp.min(jnp.where(unfinished, generated, n_max)), jnp.max(ended))
        stream(sequences, s.streamed, ready)
        record = jnp.where(kept, steps, n_max)  # out of range: dropped
        return s.replace(
            sequences=sequences, generated=generated, ended=ended, unfinished=unfinished,
            cache=cache, draft_cache=draft_cache, done=done, iteration=s.iteration + 1, draft_len=draft_len,
            drafted=s.drafted + count, accepted=s.accepted + jnp.where(s.unfinished, jnp.minimum(agree, keep), 0),
            streamed=jnp.maximum(s.streamed, ready),
            scores=_record_rows(s.scores, record, scores), raw_logits=_record_rows(s.raw_logits, record, raw),
            layers=None if s.layers is None else s.layers.record_rows(record, outputs[0]))

    final = jax.lax.while_loop(lambda s: ~s.done, iteration, state)
    num_steps = jnp.max(final.ended)
    zeros_after = lambda buf: None if buf is None else jnp.where(  # noqa: E731  (as greedy's: 0 past num_steps)
        jnp.arange(n_max)[:, None, None] < num_steps, buf, 0.0)
    return GenerateOutput(
        sequences=final.sequences[:, :spec.total_len], num_steps=num_steps, scores=zeros_after(final.scores),
        logits=zeros_after(final.raw_logits), sequences_scores=None, beam_indices=None,
        layers=final.layers, prompt_len=prompt_len,
        bucket_len=spec.bucket_len, output_scores=spec.output_scores, num_drafted=final.drafted,
        num_accepted=final.accepted)


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
