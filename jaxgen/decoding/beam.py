"""Beam search (and beam sampling) as transformers 5.x's vectorised ``_beam_search``.

Beams are laid out ``[batch, num_beams, ...]``. Each step:

1. log-softmax, processors, add the running beam scores -> ``[batch, num_beams * V]``;
2. keep the top ``beams_to_keep = max(2, 1 + n_eos) * num_beams`` candidates (or sample them
   without replacement, by the Gumbel top-k trick, for beam sampling);
3. the best ``num_beams`` candidates that did not hit EOS / max length continue running;
4. candidates among the top ``num_beams`` that hit EOS / max length are scored
   ``sum_logprobs / generated_len ** length_penalty`` and merged into the finished beams
   (unless the row can no longer improve, or is full with ``early_stopping=True``);
5. the early-stop heuristic is updated; the surviving beams' histories are re-pointed: the KV
   cache itself never moves (see ``BeamState.ancestry``).

Every constant (-1e9 fillers, the order of float operations) is transformers', so that the same
candidates win, including among near-ties.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxgen.decoding import engine, select
from jaxgen.decoding.engine import DecodeSpec
from jaxgen.models.cache import KVCache
from jaxgen.models.model import CausalLM
from jaxgen.outputs import GenerateOutput, LayerRecord

BIG = -1.0e9


@struct.dataclass
class Beams:
    """The running beams every beam decoder carries (beam search here, group beam search in
    `jaxgen.decoding.group_beam`) and `feed` steps. ``S = P + N`` buffer columns.

    running_sequences: int32[batch, beams, S]; running_scores: float32[batch, beams] summed
    log-probs; running_beam_indices: int32[batch, beams, N]; logits: float32[batch * beams, V];
    positions: int32[batch * beams]; cache: ``batch`` groups of ``beams`` rows; ancestry:
    int32[batch, beams, S], for each running beam and slot the row of its group whose cache
    holds that slot of the beam's history (0 for the prompt's shared slots). Reordering beams
    gathers this small table instead of copying the whole cache every step (``[batch * beams,
    S, d]`` per layer, the largest cost of a beam step at batch 8). scores / raw_logits:
    float32[N, batch * beams, V] or None; layers: attentions and hidden states of the running
    beams in their order of each step (`LayerRecord`), or None.
    """

    step: jax.Array
    running_sequences: jax.Array
    running_scores: jax.Array
    running_beam_indices: jax.Array
    done: jax.Array
    logits: jax.Array
    cache: KVCache
    ancestry: jax.Array
    positions: jax.Array
    scores: jax.Array | None
    raw_logits: jax.Array | None
    layers: LayerRecord | None

    @staticmethod
    def start(model: CausalLM, input_ids: jax.Array, pre: engine.Prefilled, spec: DecodeSpec, fill: int,
              running_scores: jax.Array) -> dict:
        """The fields of a decode's first state: the prompts of ``input_ids: int32[batch, P]``
        followed by ``fill``, every beam of a prompt alike, with ``running_scores``."""
        batch, beams = running_scores.shape
        seqs = engine.initial_sequences(jnp.repeat(input_ids, beams, 0), spec, fill).reshape(batch, beams, -1)
        rows, vocab = pre.logits.shape
        return dict(
            step=jnp.zeros((), jnp.int32), running_sequences=seqs, running_scores=running_scores,
            running_beam_indices=jnp.full((batch, beams, spec.max_new_tokens), -1, jnp.int32),
            done=jnp.zeros((), bool), logits=pre.logits, cache=pre.cache,
            ancestry=jnp.zeros((batch, beams, spec.total_len), jnp.int32), positions=pre.positions,
            scores=engine.score_buffer(spec.output_scores, spec, rows, vocab),
            raw_logits=engine.score_buffer(spec.output_logits, spec, rows, vocab),
            layers=engine.layer_record(model, pre, spec),
        )


@struct.dataclass
class BeamState(Beams):
    """Beam search's loop carry: the running `Beams`, and the finished hypotheses: sequences /
    beam_scores / beam_indices, the running ones' shapes; is_sent_finished: bool[batch, beams];
    improvable: bool[batch, 1] (transformers' ``is_early_stop_heuristic_unsatisfied``)."""

    sequences: jax.Array
    beam_scores: jax.Array
    beam_indices: jax.Array
    is_sent_finished: jax.Array
    improvable: jax.Array


def _gather(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x: [batch, beams, ...], idx: int[batch, k] -> [batch, k, ...] (transformers' _gather_beams)."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def _set_column(x: jax.Array, column: jax.Array, values: jax.Array) -> jax.Array:
    """x[:, :, column] = values for x: [batch, k, S], values: [batch, k]."""
    return jax.lax.dynamic_update_index_in_dim(x, values, column, axis=2)


def candidates_kept(eos_token_ids: tuple[int, ...], beams: int) -> int:
    """transformers' ``beams_to_keep``: so many candidates that ``beams`` of them do not end in
    EOS (each EOS id is at most one candidate of each beam); two a beam at least."""
    return max(2, 1 + len(eos_token_ids)) * beams


def _top_candidates(acc: jax.Array, k: int, key, step, do_sample: bool, beams: int) -> tuple[jax.Array, jax.Array]:
    """acc: float32[batch, beams * V] -> (log-probs, flat indices) of k candidates, best first."""
    if not do_sample:
        return select.top_k(acc, k, groups=beams)
    # k draws without replacement from softmax(acc): Gumbel top-k, then sort by log-prob.
    gumbel = jax.random.gumbel(jax.random.fold_in(key, step), acc.shape, acc.dtype)
    idx = select.top_k(acc + gumbel, k, groups=beams)[1]
    logp = jnp.take_along_axis(acc, idx, -1)
    order = jnp.argsort(-logp, axis=-1, stable=True)
    return jnp.take_along_axis(logp, order, -1), jnp.take_along_axis(idx, order, -1)


def finishing(topk_log_probs, hits, finished, improvable, generated, length_penalty, early_stopping, beams: int):
    """The candidates that finish now and their scores, to merge with the finished hypotheses:
    the first ``beams`` of ``topk_log_probs: float32[batch, keep]`` that hit EOS or the length
    (``hits``), scored ``log-prob / generated ** length_penalty``; BIG where a row cannot take
    them (full with ``early_stopping=True``, or not ``improvable: bool[batch, 1]``). ``finished``:
    bool[batch, beams], the hypotheses that ended before; ``generated`` and ``length_penalty``:
    scalars or [batch, 1]. Returns (float32[batch, keep] scores, bool[batch, keep] did_finish)."""
    did_finish = hits & (jnp.arange(topk_log_probs.shape[1]) < beams)[None]
    scores = topk_log_probs / (jnp.asarray(generated, jnp.float32) ** length_penalty)
    full = jnp.all(finished, axis=-1, keepdims=True) & (early_stopping is True)
    scores += full.astype(jnp.float32) * BIG
    scores += (~improvable).astype(jnp.float32) * BIG
    scores += (~did_finish).astype(jnp.float32) * BIG
    return scores, did_finish


def still_improvable(running_scores, beam_scores, finished, improvable, generated, length_penalty, early_stopping,
                     max_new_tokens):
    """transformers' ``_check_early_stop_heuristic`` (with cur_len + 1): bool[batch, 1], whether
    a row's best running beam can still beat its worst finished hypothesis. ``generated``,
    ``length_penalty`` and ``max_new_tokens``: scalars or [batch, 1]."""
    generated = jnp.asarray(generated, jnp.float32)
    if early_stopping == "never":
        generated = jnp.where(length_penalty > 0.0, jnp.asarray(max_new_tokens, jnp.float32), generated)
    best_running = running_scores[:, :1] / (generated**length_penalty)
    worst_finished = jnp.where(finished, jnp.min(beam_scores, axis=1, keepdims=True), BIG)
    return improvable & jnp.any(best_running > worst_finished, axis=-1, keepdims=True)


def group_reads(kv_mask: jax.Array, ancestry: jax.Array) -> jax.Array:
    """The ``kv_mask`` of a grouped cache (`attention.view`): row ``j`` of a group reads slot ``t``
    from row ``ancestry[b, j, t]``, where the prompt mask ``kv_mask: bool[batch, S]`` allows it.
    ancestry: int32[batch, rows, S] -> bool[batch * rows, S, rows]."""
    batch, rows, total = ancestry.shape
    reads = kv_mask[:, None, :, None] & (ancestry[..., None] == jnp.arange(rows))
    return reads.reshape(batch * rows, total, rows)


def feed(model: CausalLM, s: Beams, source: jax.Array, pre: engine.Prefilled, prompt_len, spec: DecodeSpec):
    """Feeds the running beams' tokens of step ``s.step - 1``: beam ``j`` extends beam
    ``source[b, j]`` of its group (int32[batch, beams]) and reads its history from the rows its
    ancestors computed it in (a gather of ``ancestry`` within each batch row: no
    communication when the batch is sharded), writing the new slot into its own row."""
    batch, beams = source.shape
    column = spec.bucket_len + s.step - 1
    own_row = jnp.broadcast_to(jnp.arange(beams, dtype=jnp.int32), (batch, beams))
    ancestry = _set_column(_gather(s.ancestry, source), column, own_row)
    redo = None
    if spec.recompute:  # the cache is rebuilt from each beam's sequence: every beam reads its own row
        when = engine.recomputes(model, prompt_len, s.step, spec)
        ancestry = jnp.where(when, own_row[:, :, None], ancestry)
        redo = (when, s.running_sequences.reshape(batch * beams, -1), jnp.repeat(pre.kv_mask, beams, 0))
    reads = group_reads(pre.kv_mask, ancestry)
    tokens = jax.lax.dynamic_index_in_dim(s.running_sequences, column, axis=2, keepdims=False).reshape(-1)
    logits, cache, outputs = engine.decode_step(model, tokens, s.positions, reads, s.cache, column, spec, redo)
    return s.replace(logits=logits, cache=cache, ancestry=ancestry, positions=s.positions + 1,
                     layers=engine.record_layers(s.layers, s.step, outputs))


def decode(model: CausalLM, input_ids, attention_mask, prompt_len, processors, key, length_penalty,
           spec: DecodeSpec) -> GenerateOutput:
    """Beam search over ``input_ids: int32[batch, P]`` (left-padded to the bucket)."""
    batch, beams, n = input_ids.shape[0], spec.num_beams, spec.max_new_tokens
    keep = candidates_kept(spec.eos_token_ids, beams)
    pre = engine.prefill(model, input_ids, attention_mask, prompt_len, spec, beams, share_prompt=True)
    vocab = pre.logits.shape[-1]
    # transformers' output_fill_value, quirk included: a pad id of 0 is falsy there, so EOS fills
    fill = (spec.pad_token_id or spec.eos_token_ids[0]) if spec.eos_token_ids else -1
    running = Beams.start(model, input_ids, pre, spec, fill, jnp.zeros((batch, beams), jnp.float32).at[:, 1:].set(BIG))
    state = BeamState(
        **running,
        sequences=running["running_sequences"],
        beam_scores=jnp.full((batch, beams), BIG, jnp.float32),
        beam_indices=running["running_beam_indices"],
        is_sent_finished=jnp.zeros((batch, beams), bool),
        improvable=jnp.ones((batch, 1), bool),
    )
    batch_offset = jnp.arange(batch, dtype=jnp.int32)[:, None] * beams

    def choose(s: BeamState) -> BeamState:
        column = spec.bucket_len + s.step
        flat_running = s.running_sequences.reshape(batch * beams, -1)
        log_probs = jax.nn.log_softmax(s.logits, axis=-1)
        log_probs = engine.process(processors, log_probs, flat_running, s.step, prompt_len, pre.pad_lengths, spec)
        acc = (log_probs.reshape(batch, beams, vocab) + s.running_scores[:, :, None]).reshape(batch, -1)

        # Top-k continuations over all beams of a row.
        topk_log_probs, topk_idx = _top_candidates(acc, keep, key, s.step, spec.do_sample, beams)
        src_beam = (topk_idx // vocab).astype(jnp.int32)
        tokens = (topk_idx % vocab).astype(jnp.int32)
        topk_sequences = _set_column(_gather(s.running_sequences, src_beam), column, tokens)
        topk_beam_indices = _set_column(_gather(s.running_beam_indices, src_beam), s.step, src_beam + batch_offset)
        hits = engine.hits_stop(topk_sequences, column, spec.bucket_len - prompt_len, spec) | (s.step + 1 >= n)

        # Beams that keep running.
        topk_running_log_probs = topk_log_probs + hits.astype(jnp.float32) * BIG
        next_idx = jax.lax.top_k(topk_running_log_probs, beams)[1]
        running_sequences = _gather(topk_sequences, next_idx)
        running_scores = _gather(topk_running_log_probs, next_idx)
        running_beam_indices = _gather(topk_beam_indices, next_idx)

        # Beams that finish now, merged with those finished before.
        finished_scores, did_finish = finishing(topk_log_probs, hits, s.is_sent_finished, s.improvable, s.step + 1,
                                                length_penalty, spec.early_stopping, beams)
        merged_scores = jnp.concatenate([s.beam_scores, finished_scores], axis=1)
        best = jax.lax.top_k(merged_scores, beams)[1]
        sequences = _gather(jnp.concatenate([s.sequences, topk_sequences], 1), best)
        beam_scores = _gather(merged_scores, best)
        beam_indices = _gather(jnp.concatenate([s.beam_indices, topk_beam_indices], 1), best)
        is_sent_finished = _gather(jnp.concatenate([s.is_sent_finished, did_finish], 1), best)

        improvable = still_improvable(running_scores, beam_scores, is_sent_finished, s.improvable, s.step + 1,
                                      length_penalty, spec.early_stopping, n)
        exists_open_beam = ~(jnp.all(is_sent_finished) & (spec.early_stopping is True))
        done = ~(jnp.any(improvable) & exists_open_beam & ~jnp.all(hits))

        return s.replace(
            step=s.step + 1, running_sequences=running_sequences, running_scores=running_scores,
            running_beam_indices=running_beam_indices, sequences=sequences, beam_scores=beam_scores,
            beam_indices=beam_indices, is_sent_finished=is_sent_finished, improvable=improvable, done=done,
            scores=engine.record(s.scores, s.step, log_probs), raw_logits=engine.record(s.raw_logits, s.step, s.logits),
        )

    def advance(s: BeamState) -> BeamState:
        source = jax.lax.dynamic_index_in_dim(s.running_beam_indices, s.step - 1, axis=2, keepdims=False)
        return feed(model, s, source - batch_offset, pre, prompt_len, spec)

    final = engine.run_loop(state, choose, advance, spec)
    r = spec.num_return_sequences
    return GenerateOutput(
        sequences=final.sequences[:, :r].reshape(batch * r, -1),
        num_steps=final.step,
        scores=final.scores,
        logits=final.raw_logits,
        sequences_scores=final.beam_scores[:, :r].reshape(-1),
        beam_indices=final.beam_indices[:, :r].reshape(batch * r, -1),
        layers=final.layers,
        prompt_len=prompt_len, bucket_len=spec.bucket_len, output_scores=spec.output_scores,
    )
