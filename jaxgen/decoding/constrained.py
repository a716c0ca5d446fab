"""Constrained beam search: ``force_words_ids`` / ``constraints`` (transformers 4.53's
``_constrained_beam_search`` and ``ConstrainedBeamSearchScorer``, which transformers 5.x moved
to the hub repository ``transformers-community/constrained-beam-search``).

Beam search whose beams must contain every constraint (`jaxgen.decoding.constraints`; the prompt
counts, as there). Each step, ``max(2, 1 + n_eos) * beams`` candidates by processed log-prob plus
beam score, as 4.53's beam search: an EOS among the first ``beams`` finishes a hypothesis only if
its beam has completed every constraint, the first ``beams`` others are kept. Then every beam
that has not completed them also proposes the tokens that advance a constraint (4.53's
``advance()``), each once (a sequence already among the candidates is not added twice). All are
ranked by ``100 * bank + score`` (a bank counts the constraint steps taken) and picked round-robin
over banks: the best of each bank, then the second best of each, ... (4.53's
``step_sentence_constraint``). A prompt is done as in 4.53's beam search; its beams then emit
``pad_token_id`` as copies of its first beam (4.53 copies the first prompt's, a defect at batch >
1). At the end, the running beams that completed every constraint join the hypotheses, and the
others too if fewer than ``num_return_sequences`` did. ``scores`` are the processed log-probs
plus the beam scores, as 4.53 returns them. A hypothesis keeps the EOS id it ended on (4.53
writes the first of several EOS ids).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxgen.decoding import beam, constraints, engine, select
from jaxgen.decoding.engine import DecodeSpec
from jaxgen.decoding.hypotheses import NONE, is_done, keep_best, output
from jaxgen.models.model import CausalLM
from jaxgen.outputs import GenerateOutput


@struct.dataclass
class ConstrainedState(beam.Beams):
    """Loop carry: the running `beam.Beams` (``B`` prompts, ``N`` beams, ``T`` = max_new_tokens),
    the constraint `constraints.State` of each running beam ([B, N, ...]); same: bool[B, N, N],
    which running beams hold the same sequence (4.53 compares whole sequences); the finished
    hypotheses hyp_sequences / hyp_beam_indices: int32[B, N, S] / [B, N, T], hyp_scores:
    float32[B, N] (`NONE` where empty); prompt_done: bool[B, 1]; source: int32[B, N], the beam
    each beam extended at the last step."""

    state: constraints.State
    same: jax.Array
    hyp_sequences: jax.Array
    hyp_scores: jax.Array
    hyp_beam_indices: jax.Array
    prompt_done: jax.Array
    source: jax.Array


def _read_prompt(t: constraints.Tables, input_ids, prompt_len, spec: DecodeSpec) -> constraints.State:
    """The constraint state after each prompt as passed (its padding included, as 4.53 reads
    ``input_ids``): int32[B, P] -> `State` [B, ...]."""
    first = spec.bucket_len - prompt_len  # bucket padding comes first

    def read(s, column):
        token, col = column
        return jax.tree.map(lambda new, old: jnp.where(col >= first, new, old), constraints.add(t, s, token), s), None

    s, _ = jax.lax.scan(read, constraints.start(t, input_ids.shape[:1]),
                        (input_ids.T.astype(jnp.int32), jnp.arange(input_ids.shape[1])))
    return s


def _take(s: constraints.State, idx: jax.Array) -> constraints.State:
    """The states of beams ``idx: int[B, k]`` of each prompt."""
    return jax.tree.map(lambda a: beam._gather(a, idx), s)


def _rank(scores, banks, valid, beams: int):
    """4.53's ``step_sentence_constraint`` ranking of one step's candidates ([B, M], ``valid``
    where proposed): by ``100 * bank + score``, best first, then round-robin over banks; the
    first ``beams``. Returns their indices into M, int32[B, beams]."""
    zipped = banks.astype(jnp.float32) * 100 + scores
    order = jnp.argsort(-zipped, axis=-1, stable=True)
    order = jnp.take_along_axis(order, jnp.argsort(~jnp.take_along_axis(valid, order, -1), axis=-1, stable=True), -1)
    sorted_banks = jnp.take_along_axis(banks, order, -1)
    position = jnp.arange(order.shape[-1])
    new_run = jnp.concatenate([jnp.ones_like(sorted_banks[:, :1], bool),
                               sorted_banks[:, 1:] != sorted_banks[:, :-1]], -1)
    run_rank = position - jax.lax.cummax(jnp.where(new_run, position, 0), axis=1)
    run_rank = jnp.where(jnp.take_along_axis(valid, order, -1), run_rank, order.shape[-1])
    return jnp.take_along_axis(order, jnp.argsort(run_rank, axis=-1, stable=True)[:, :beams], -1)


def decode(model: CausalLM, input_ids, attention_mask, prompt_len, processors, length_penalty,
           spec: DecodeSpec) -> GenerateOutput:
    """Constrained beam search over ``input_ids: int32[batch, P]`` (left-padded to the bucket)."""
    batch, beams, t_max = input_ids.shape[0], spec.num_beams, spec.max_new_tokens
    t = constraints.tables(spec.constraints)
    keep = beam.candidates_kept(spec.eos_token_ids, beams)
    pre = engine.prefill(model, input_ids, attention_mask, prompt_len, spec, beams, share_prompt=True)
    vocab = pre.logits.shape[-1]
    fill = spec.pad_token_id if spec.pad_token_id is not None else 0
    first_beam = jnp.full((batch, beams), -1e9, jnp.float32).at[:, 0].set(0.0)
    running = beam.Beams.start(model, input_ids, pre, spec, fill, first_beam)
    prompt_state = _read_prompt(t, input_ids, prompt_len, spec)
    state = ConstrainedState(
        **running,
        state=jax.tree.map(lambda a: jnp.repeat(a[:, None], beams, 1), prompt_state),
        same=jnp.ones((batch, beams, beams), bool),
        hyp_sequences=running["running_sequences"],
        hyp_scores=jnp.full((batch, beams), NONE, jnp.float32),
        hyp_beam_indices=jnp.full((batch, beams, t_max), -1, jnp.int32),
        prompt_done=jnp.zeros((batch, 1), bool),
        source=jnp.zeros((batch, beams), jnp.int32),
    )
    rows = jnp.arange(batch, dtype=jnp.int32)[:, None] * beams  # each prompt's first row
    eos = jnp.asarray(spec.eos_token_ids or (-1,), jnp.int32)

    def choose(s: ConstrainedState) -> ConstrainedState:
        column, generated = spec.bucket_len + s.step, (s.step + 1).astype(jnp.float32)
        processed = engine.process(processors, jax.nn.log_softmax(s.logits, axis=-1),
                                   s.running_sequences.reshape(batch * beams, -1), s.step, prompt_len,
                                   pre.pad_lengths, spec)
        scores = processed.reshape(batch, beams, vocab) + s.running_scores[:, :, None]  # [B, N, V]
        top_scores, top = select.top_k(scores.reshape(batch, -1), keep)
        src, tokens = (top // vocab).astype(jnp.int32), (top % vocab).astype(jnp.int32)
        is_eos = jnp.isin(tokens, eos)
        done = s.prompt_done

        # EOS among the first `beams` candidates: a hypothesis if its beam completed every constraint.
        finishing = is_eos & (jnp.arange(keep) < beams) & ~done & beam._gather(constraints.completed(s.state), src)
        finished = beam._set_column(beam._gather(s.running_sequences, src), column, tokens)
        finished_indices = beam._set_column(beam._gather(s.running_beam_indices, src), s.step, src + rows)
        hyp_scores, hyp_sequences, hyp_indices = keep_best(
            s.hyp_scores, s.hyp_sequences, s.hyp_beam_indices,
            jnp.where(finishing, top_scores / generated**length_penalty, NONE), finished, finished_indices)
        hopeless = is_done(hyp_scores, top_scores[:, :1], generated, length_penalty, spec)

        # The first `beams` other candidates, then the tokens that advance a constraint.
        order = jnp.argsort(jnp.where(is_eos, keep, 0) + jnp.arange(keep), axis=-1)[:, :beams]
        sel_scores, sel_tokens, sel_src = (jnp.take_along_axis(x, order, -1) for x in (top_scores, tokens, src))
        sel_states = constraints.add(t, _take(s.state, sel_src), sel_tokens)
        adv_tokens, listed, adv_banks = constraints.advances(t, s.state)  # [B, N, A]
        a = adv_tokens.shape[-1]
        adv_src = jnp.broadcast_to(jnp.arange(beams, dtype=jnp.int32)[:, None], (beams, a)).reshape(-1)
        adv_tokens, adv_banks = adv_tokens.reshape(batch, -1), adv_banks.reshape(batch, -1)
        listed = (listed & ~constraints.completed(s.state)[..., None]).reshape(batch, -1)
        adv_scores = jnp.take_along_axis(scores.reshape(batch, -1), adv_src * vocab + jnp.maximum(adv_tokens, 0), -1)
        # a sequence already proposed (4.53 compares the lists): same beam sequence and token
        same_as_kept = (beam._gather(jnp.swapaxes(s.same, 1, 2), sel_src)[:, :, adv_src]
                        & (sel_tokens[:, :, None] == adv_tokens[:, None, :])).any(1)
        m = adv_tokens.shape[-1]
        earlier = (s.same[:, adv_src][:, :, adv_src] & (adv_tokens[:, :, None] == adv_tokens[:, None, :])
                   & listed[:, :, None] & (jnp.arange(m)[:, None] < jnp.arange(m)[None, :]))
        proposed = listed & ~same_as_kept & ~earlier.any(1)
        adv_states = constraints.add(t, jax.tree.map(lambda x: x[:, adv_src], s.state), adv_tokens)

        all_scores = jnp.concatenate([sel_scores, adv_scores], -1)
        all_tokens = jnp.concatenate([sel_tokens, adv_tokens], -1)
        all_src = jnp.concatenate([sel_src, jnp.broadcast_to(adv_src, (batch, m))], -1)
        all_states = jax.tree.map(lambda x, y: jnp.concatenate([x, y], 1), sel_states, adv_states)
        all_banks = jnp.concatenate([constraints.bank(t, sel_states), adv_banks], -1)
        valid = jnp.concatenate([jnp.ones((batch, beams), bool), proposed], -1)
        picked = _rank(all_scores, all_banks, valid, beams)
        picked = jnp.where(proposed.any(-1, keepdims=True), picked, jnp.arange(beams))  # nothing new: as kept

        next_scores = jnp.where(done, 0.0, jnp.take_along_axis(all_scores, picked, -1))
        next_tokens = jnp.where(done, fill, jnp.take_along_axis(all_tokens, picked, -1))
        source = jnp.where(done, 0, jnp.take_along_axis(all_src, picked, -1))
        next_states = jax.tree.map(lambda x, old: jnp.where(done.reshape(done.shape + (1,) * (x.ndim - 2)),
                                                            beam._gather(old, source), beam._gather(x, picked)),
                                   all_states, s.state)
        same = (beam._gather(jnp.swapaxes(beam._gather(s.same, source), 1, 2), source)
                & (next_tokens[:, :, None] == next_tokens[:, None, :]))
        running_indices = beam._set_column(beam._gather(s.running_beam_indices, source), s.step, source + rows)
        prompt_done = done | hopeless
        return s.replace(
            step=s.step + 1,
            running_sequences=beam._set_column(beam._gather(s.running_sequences, source), column, next_tokens),
            running_scores=next_scores, running_beam_indices=running_indices, state=next_states, same=same,
            hyp_sequences=hyp_sequences, hyp_scores=hyp_scores, hyp_beam_indices=hyp_indices,
            prompt_done=prompt_done, done=jnp.all(prompt_done) | (s.step + 1 >= t_max), source=source,
            scores=engine.record(s.scores, s.step, scores.reshape(batch * beams, vocab)),
            raw_logits=engine.record(s.raw_logits, s.step, s.logits),
        )

    def advance(s: ConstrainedState) -> ConstrainedState:
        return beam.feed(model, s, s.source, pre, prompt_len, spec)

    final = engine.run_loop(state, choose, advance, spec)
    # The running beams of prompts not done: those that completed every constraint join the
    # hypotheses, then the others too if fewer than num_return_sequences did.
    r = spec.num_return_sequences
    open_beams = ~final.prompt_done
    complete = constraints.completed(final.state) & open_beams
    running = final.running_scores / final.step.astype(jnp.float32)**length_penalty
    hyps = (final.hyp_scores, final.hyp_sequences, final.hyp_beam_indices)
    for joins in (complete, open_beams & ~complete & (complete.sum(-1, keepdims=True) < r)):
        hyps = keep_best(*hyps, jnp.where(joins, running, NONE), final.running_sequences, final.running_beam_indices)
    return output(*hyps, final, prompt_len, spec)
