"""Group (diverse) beam search: ``num_beam_groups > 1`` (transformers 4.53's ``_group_beam_search``
and ``BeamSearchScorer``, which transformers 5.x moved to the hub).

The ``num_beams`` beams of a prompt form ``G`` groups of ``g = num_beams / G``. Each step, one
forward pass for every beam, then the groups choose in turn: a group's log-probs, processed with
the diversity penalty (each token loses ``diversity_penalty`` times the count of earlier groups
that chose it at this step for the same prompt), plus its beams' scores give ``max(2, 1 + n_eos)
* g`` candidates; EOS candidates among the first ``g`` become finished hypotheses of that group
(``score / generated_len ** length_penalty``, at most ``g`` a group, the worst dropped),
the first ``g`` others continue. A group is done once it holds ``g`` hypotheses none of its
running beams can beat (4.53's ``BeamHypotheses.is_done``, with ``early_stopping``); a done
group's beams continue as copies of its first beam emitting ``pad_token_id`` (their scores are
still returned; 4.53 copies the first prompt's beam instead, a defect at batch > 1). At the end
the running beams of groups not done join their hypotheses, and each prompt returns its
``num_return_sequences`` best over all groups. A hypothesis keeps the EOS id it ended on (4.53
writes the first of several EOS ids).

The cache is beam search's (`beam.feed`): beams never move, a table says which row holds each slot.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxgen.decoding import beam, engine, select
from jaxgen.decoding.engine import DecodeSpec
from jaxgen.decoding.hypotheses import NONE, is_done, keep_best, output
from jaxgen.models.model import CausalLM
from jaxgen.outputs import GenerateOutput


@struct.dataclass
class GroupBeamState(beam.Beams):
    """Loop carry: the running `beam.Beams` (``B`` prompts, ``N`` beams in ``G`` groups, beam
    ``j`` of group ``i`` at ``i * g + j``, ``T`` = max_new_tokens), and hyp_sequences /
    hyp_beam_indices: int32[B, G, g, S] / [B, G, g, T], the finished hypotheses of each group,
    hyp_scores: float32[B, G, g] (`NONE` where empty); group_done: bool[B, G]; source:
    int32[B, N], the beam each beam extended at the last step.
    """

    hyp_sequences: jax.Array
    hyp_scores: jax.Array
    hyp_beam_indices: jax.Array
    group_done: jax.Array
    source: jax.Array


def decode(model: CausalLM, input_ids, attention_mask, prompt_len, processors, length_penalty,
           spec: DecodeSpec) -> GenerateOutput:
    """Group beam search over ``input_ids: int32[batch, P]`` (left-padded to the bucket)."""
    batch, beams, groups, t_max = input_ids.shape[0], spec.num_beams, spec.num_beam_groups, spec.max_new_tokens
    g = beams // groups
    keep = beam.candidates_kept(spec.eos_token_ids, g)
    pre = engine.prefill(model, input_ids, attention_mask, prompt_len, spec, beams, share_prompt=True)
    vocab = pre.logits.shape[-1]
    fill = spec.pad_token_id if spec.pad_token_id is not None else 0
    first_of_each_group = jnp.full((batch, groups, g), -1e9, jnp.float32).at[:, :, 0].set(0.0).reshape(batch, beams)
    running = beam.Beams.start(model, input_ids, pre, spec, fill, first_of_each_group)
    state = GroupBeamState(
        **running,
        hyp_sequences=running["running_sequences"].reshape(batch, groups, g, -1),
        hyp_scores=jnp.full((batch, groups, g), NONE, jnp.float32),
        hyp_beam_indices=jnp.full((batch, groups, g, t_max), -1, jnp.int32),
        group_done=jnp.zeros((batch, groups), bool),
        source=jnp.zeros((batch, beams), jnp.int32),
    )
    rows = jnp.arange(batch, dtype=jnp.int32)[:, None] * beams  # each prompt's first row
    eos = jnp.asarray(spec.eos_token_ids or (-1,), jnp.int32)

    def choose(s: GroupBeamState) -> GroupBeamState:
        column, generated = spec.bucket_len + s.step, (s.step + 1).astype(jnp.float32)
        log_probs = jax.nn.log_softmax(s.logits, axis=-1).reshape(batch, beams, vocab)
        chosen = jnp.zeros((batch, 0), jnp.int32)  # this step's tokens of the groups so far
        processed, out = [], []
        for i in range(groups):
            part = slice(i * g, (i + 1) * g)
            sequences, scores = s.running_sequences[:, part], s.running_scores[:, part]
            group_scores = engine.process(
                processors, log_probs[:, part].reshape(batch * g, vocab), sequences.reshape(batch * g, -1), s.step,
                prompt_len, pre.pad_lengths.reshape(batch, beams)[:, part].reshape(-1), spec,
                jnp.repeat(chosen, g, 0)).reshape(batch, g, vocab)
            processed.append(group_scores)
            top_scores, top = select.top_k((group_scores + scores[:, :, None]).reshape(batch, -1), keep)
            src, tokens = (top // vocab).astype(jnp.int32), (top % vocab).astype(jnp.int32)
            is_eos = jnp.isin(tokens, eos)
            done = s.group_done[:, i:i + 1]

            # EOS among the first g candidates: finished hypotheses (unless the group is done).
            finishing = is_eos & (jnp.arange(keep) < g) & ~done
            finished = beam._set_column(beam._gather(sequences, src), column, tokens)
            finished_indices = beam._set_column(beam._gather(s.running_beam_indices[:, part], src), s.step,
                                                src + i * g + rows)
            hyps = keep_best(s.hyp_scores[:, i], s.hyp_sequences[:, i], s.hyp_beam_indices[:, i],
                             jnp.where(finishing, top_scores / generated**length_penalty, NONE), finished,
                             finished_indices)
            hopeless = is_done(hyps[0], top_scores[:, :1], generated, length_penalty, spec)

            # The first g other candidates continue; a done group's beams copy its first one.
            order = jnp.argsort(jnp.where(is_eos, keep, 0) + jnp.arange(keep), axis=-1)[:, :g]
            next_scores = jnp.where(done, 0.0, jnp.take_along_axis(top_scores, order, -1))
            next_tokens = jnp.where(done, fill, jnp.take_along_axis(tokens, order, -1))
            next_src = jnp.where(done, 0, jnp.take_along_axis(src, order, -1))
            chosen = jnp.concatenate([chosen, next_tokens], -1)
            out.append((next_scores, next_tokens, next_src + i * g, hyps, done | hopeless))

        next_scores, next_tokens, source = (jnp.concatenate([o[k] for o in out], 1) for k in range(3))
        hyp_scores, hyp_sequences, hyp_indices = (jnp.stack([o[3][k] for o in out], 1) for k in range(3))
        group_done = jnp.concatenate([o[4] for o in out], 1)
        running_indices = beam._set_column(beam._gather(s.running_beam_indices, source), s.step, source + rows)
        processed = jnp.concatenate(processed, 1).reshape(batch * beams, vocab)
        return s.replace(
            step=s.step + 1,
            running_sequences=beam._set_column(beam._gather(s.running_sequences, source), column, next_tokens),
            running_scores=next_scores, running_beam_indices=running_indices, hyp_sequences=hyp_sequences,
            hyp_scores=hyp_scores, hyp_beam_indices=hyp_indices, group_done=group_done,
            done=jnp.all(group_done) | (s.step + 1 >= t_max), source=source,
            scores=engine.record(s.scores, s.step, processed), raw_logits=engine.record(s.raw_logits, s.step, s.logits),
        )

    def advance(s: GroupBeamState) -> GroupBeamState:
        return beam.feed(model, s, s.source, pre, prompt_len, spec)

    final = engine.run_loop(state, choose, advance, spec)
    # The running beams of groups not done join their hypotheses, scored by the length generated.
    running = jnp.where(final.group_done[:, :, None], NONE,
                        final.running_scores.reshape(batch, groups, g) / final.step.astype(jnp.float32)**length_penalty)
    hyp_scores, hyp_sequences, hyp_indices = keep_best(
        final.hyp_scores, final.hyp_sequences, final.hyp_beam_indices, running,
        final.running_sequences.reshape(batch, groups, g, -1), final.running_beam_indices.reshape(batch, groups, g, -1))
    return output(hyp_scores.reshape(batch, beams), hyp_sequences.reshape(batch, beams, -1),
                  hyp_indices.reshape(batch, beams, -1), final, prompt_len, spec)
