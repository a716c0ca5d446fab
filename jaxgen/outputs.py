"""Decoder outputs: a static-shape pytree inside jit, `trim()` to Hugging Face's shapes on the host."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import struct


@struct.dataclass
class GenerateOutput:
    """What a decoder returns; field names and meanings as transformers' ``Generate*Output``.

    ``rows`` = batch x num_return_sequences, ``P`` = bucketed prompt length, ``N`` =
    max_new_tokens, ``V`` = vocab, ``beam_rows`` = batch x num_beams (batch x
    num_return_sequences without beams).

    sequences: int32[rows, P + N]; bucket padding first, then the prompt as passed, then the
      generated tokens; unused tail slots hold the pad filler.
    num_steps: int32[], decoding steps run (transformers' ``len(scores)``).
    scores: float32[N, beam_rows, V] processed scores per step (log-probs for beams); steps
      ``>= num_steps`` are 0. None unless ``output_scores``.
    logits: float32[N, beam_rows, V] raw logits, same layout. None unless ``output_logits``.
    sequences_scores: float32[rows] length-penalised beam scores (beam search only).
    beam_indices: int32[rows, N], the ``batch * num_beams`` row each token came from, -1 after
      the beam ended (beam search only).
    """

    sequences: jax.Array
    num_steps: jax.Array
    scores: jax.Array | None = None
    logits: jax.Array | None = None
    sequences_scores: jax.Array | None = None
    beam_indices: jax.Array | None = None
    prompt_len: jax.Array | int = 0  # int32[], the prompt length as passed
    bucket_len: int = struct.field(pytree_node=False, default=0)
    output_scores: bool = struct.field(pytree_node=False, default=False)

    def trim(self) -> "HFOutput":
        """Crops on the host to exactly what ``model.generate(..., return_dict_in_generate=True)``
        returns: numpy arrays, ``scores`` / ``logits`` as tuples with one array per step, the
        prompt exactly as passed, sequences cut to the longest generated row."""
        steps = int(self.num_steps)
        beam_indices = None if self.beam_indices is None else np.asarray(self.beam_indices)
        if beam_indices is not None:
            generated = int((beam_indices != -1).sum(1).max()) if beam_indices.size else 0
            beam_indices = beam_indices[:, :generated]
        else:
            generated = steps
        start = self.bucket_len - int(self.prompt_len)
        sequences = np.asarray(self.sequences)[:, start:self.bucket_len + generated]
        per_step = lambda buf: None if buf is None else tuple(np.asarray(buf[:steps]))  # noqa: E731
        has_seq_scores = self.sequences_scores is not None and self.output_scores
        return HFOutput(
            sequences=sequences,
            scores=per_step(self.scores),
            logits=per_step(self.logits),
            sequences_scores=np.asarray(self.sequences_scores) if has_seq_scores else None,
            beam_indices=beam_indices,
        )


@dataclasses.dataclass
class HFOutput:
    """Host-side output with the shapes transformers returns.

    sequences: int64-compatible int32[rows, prompt_len + generated]; scores / logits: tuple of
    float32[beam_rows, V], one per step; sequences_scores: float32[rows] (beam search with
    ``output_scores``, as transformers); beam_indices: int32[rows, generated] (beam search).
    """

    sequences: np.ndarray
    scores: tuple[np.ndarray, ...] | None = None
    logits: tuple[np.ndarray, ...] | None = None
    sequences_scores: np.ndarray | None = None
    beam_indices: np.ndarray | None = None
