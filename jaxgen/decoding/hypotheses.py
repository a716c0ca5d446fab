"""Finished hypotheses of the decoders that follow transformers 4.53's beam scorers (group and
constrained beam search): 4.53's ``BeamHypotheses`` as arrays.

A list holds the ``k`` best hypotheses, ``score / generated_len ** length_penalty``; scores are
float32[..., k] (`NONE` where a slot is empty: a hypothesis may score -inf, a token banned by a
processor, and 4.53 keeps it), sequences int32[..., k, S], beam indices int32[..., k, T].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxgen.decoding.engine import DecodeSpec
from jaxgen.outputs import GenerateOutput

NONE = jnp.nan  # the score of an empty hypothesis slot: below every score, -inf included


def _best_first(scores: jax.Array) -> jax.Array:
    """The order of ``scores`` [..., n], best first: by score, earlier first among equal ones,
    empty slots last (a sort places NaN last)."""
    return jnp.argsort(-scores, axis=-1, stable=True)


def keep_best(scores, sequences, indices, new_scores, new_sequences, new_indices):
    """A list after adding new hypotheses: the ``k`` best of both, old ones first among equal
    scores (4.53 adds a hypothesis only if it beats the worst of a full list). new_*: [..., n],
    [..., n, L]."""
    n = scores.shape[-1]
    merged = jnp.concatenate([scores, new_scores], -1)
    best = _best_first(merged)[..., :n]
    take = lambda x, y: jnp.take_along_axis(jnp.concatenate([x, y], -2), best[..., None], axis=-2)  # noqa: E731
    return jnp.take_along_axis(merged, best, -1), take(sequences, new_sequences), take(indices, new_indices)


def is_done(scores, best_running, generated, length_penalty, spec: DecodeSpec) -> jax.Array:
    """4.53's ``BeamHypotheses.is_done``: a full list that no running beam can beat any more
    (``best_running``: float32[..., 1], the best candidate's summed log-probs; ``generated``: the
    tokens generated so far, float32[]). bool[..., 1]."""
    full = ~jnp.isnan(scores).any(-1, keepdims=True)
    if spec.early_stopping is True:
        return full
    length = jnp.float32(spec.max_new_tokens) if spec.early_stopping == "never" else generated
    length = jnp.where(length_penalty > 0.0, length, generated)
    return full & (scores.min(-1, keepdims=True) >= best_running / length**length_penalty)


def output(scores, sequences, indices, final, prompt_len, spec: DecodeSpec) -> GenerateOutput:
    """Each prompt's ``num_return_sequences`` best hypotheses of its lists (scores: [B, k], ...)
    and the loop's final state's records."""
    batch, r = scores.shape[0], spec.num_return_sequences
    best = _best_first(scores)[:, :r]
    best_scores = jnp.take_along_axis(scores, best, -1)
    pick = lambda x: jnp.take_along_axis(x, best[..., None], 1).reshape(batch * r, -1)  # noqa: E731
    return GenerateOutput(
        sequences=pick(sequences), num_steps=final.step, scores=final.scores, logits=final.raw_logits,
        sequences_scores=best_scores.reshape(-1), beam_indices=pick(indices), layers=final.layers,
        prompt_len=prompt_len, bucket_len=spec.bucket_len, output_scores=spec.output_scores,
    )
