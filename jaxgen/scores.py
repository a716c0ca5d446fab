"""`compute_transition_scores`, as ``GenerationMixin.compute_transition_scores``."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def compute_transition_scores(sequences, scores, beam_indices=None, normalize_logits: bool = False) -> jax.Array:
    """The score of each generated token.

    Args:
      sequences: int[rows, prompt_len + generated] (e.g. ``out.trim().sequences``).
      scores: one float[beam_rows, V] per step (a tuple, as transformers) or float[steps, beam_rows, V].
      beam_indices: int[rows, generated] from beam search (-1 after a beam ended), or None.
      normalize_logits: log-softmax the scores first.

    Returns:
      float32[rows, generated]: ``scores[step][beam_indices[row, step], token]``, 0 where the
      beam had ended.
    """
    scores = [_array(s) for s in scores] if isinstance(scores, Sequence) else _array(scores)
    sequences, beam_indices = _array(sequences), None if beam_indices is None else _array(beam_indices)
    stacked = jnp.stack(scores) if isinstance(scores, list) else jnp.asarray(scores)
    steps, beam_rows, vocab = stacked.shape
    if normalize_logits:
        stacked = jax.nn.log_softmax(stacked, axis=-1)
    sequences = jnp.asarray(sequences)
    if beam_indices is None:
        beam_indices = jnp.broadcast_to(jnp.arange(beam_rows)[:, None], (beam_rows, steps))
    beam_indices = jnp.asarray(beam_indices)
    ended = beam_indices < 0
    max_len = int((~ended).sum(-1).max())
    beam_indices, ended = beam_indices[:, :max_len], ended[:, :max_len]
    tokens = sequences[:, sequences.shape[-1] - max_len:]
    rows = jnp.where(ended, 0, beam_indices)
    picked = stacked[jnp.arange(max_len)[None, :], rows, tokens]
    return jnp.where(ended, 0.0, picked)


def _array(x):
    """A torch tensor (transformers' outputs) as numpy; anything else (numpy, JAX, traced) as is."""
    return x.detach().cpu().numpy() if type(x).__module__.startswith("torch") else x
