"""Decoder outputs: a static-shape pytree inside jit, `trim()` to Hugging Face's shapes on the host."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxgen.models.model import LayerOutputs


@struct.dataclass
class LayerRecord:
    """The attentions and hidden states of every forward pass of a decode (transformers'
    ``output_attentions`` / ``output_hidden_states``), in static buffers allocated only when asked.

    ``rows`` as the scores' (batch x beams, or batch x return sequences), ``k`` captured hidden
    state indices. prompt_attentions: dtype[n_layers, rows, n_heads, P, P] and prompt_hidden:
    dtype[k, rows, P, d], the prefill's; attentions: dtype[N - 1, n_layers, rows, n_heads, P + N]
    and hidden: dtype[N - 1, k, rows, d], entry ``i`` from the forward pass of one token that
    gives the logits of token ``i + 1``. Memory: ``n_layers x rows x n_heads x (P^2 + N (P + N))``
    weights and ``k x rows x (P + N) x d`` states. Static: ``indices`` (the captured ones, of
    ``n_hidden = n_layers + 1``; None when no hidden state is asked) and each layer's sliding
    window, which crops what `trim` returns of a step to the keys transformers' sliding cache
    layers keep.
    """

    prompt_attentions: jax.Array | None
    attentions: jax.Array | None
    prompt_hidden: jax.Array | None
    hidden: jax.Array | None
    indices: tuple[int, ...] | None = struct.field(pytree_node=False, default=None)
    n_hidden: int = struct.field(pytree_node=False, default=0)
    windows: tuple[int | None, ...] = struct.field(pytree_node=False, default=())

    @classmethod
    def start(cls, prompt: LayerOutputs, max_new_tokens: int, indices: tuple[int, ...] | None, n_hidden: int,
              windows: tuple[int | None, ...]) -> "LayerRecord":
        """Buffers holding the prefill's `LayerOutputs` (``[rows, ..., P, ...]`` each) and room
        for ``max_new_tokens - 1`` steps."""
        n = max_new_tokens
        attentions = hidden = prompt_attentions = prompt_hidden = None
        if prompt.attentions is not None:
            prompt_attentions = jnp.stack(prompt.attentions)
            layers, rows, heads, p, _ = prompt_attentions.shape
            attentions = jnp.zeros((n - 1, layers, rows, heads, p + n), prompt_attentions.dtype)
        if prompt.hidden_states is not None:
            prompt_hidden = jnp.stack(prompt.hidden_states)
            k, rows, _, d = prompt_hidden.shape
            hidden = jnp.zeros((n - 1, k, rows, d), prompt_hidden.dtype)
        return cls(prompt_attentions, attentions, prompt_hidden, hidden, indices, n_hidden, windows)

    def record(self, step: jax.Array, outputs: LayerOutputs) -> "LayerRecord":
        """Stores the `LayerOutputs` of the one-token forward pass that gives token ``step``'s
        logits (``step >= 1``; its attentions over the cache's slots so far)."""
        attentions, hidden = self.attentions, self.hidden
        if attentions is not None and attentions.shape[0]:  # none with max_new_tokens=1
            a = jnp.stack([w[:, :, 0] for w in outputs.attentions])  # [layers, rows, heads, slots]
            a = jnp.pad(a, [(0, 0)] * 3 + [(0, attentions.shape[-1] - a.shape[-1])])
            attentions = jax.lax.dynamic_update_index_in_dim(attentions, a, step - 1, 0)
        if hidden is not None and hidden.shape[0]:
            h = jnp.stack([x[:, 0] for x in outputs.hidden_states])
            hidden = jax.lax.dynamic_update_index_in_dim(hidden, h, step - 1, 0)
        return self.replace(attentions=attentions, hidden=hidden)

    def record_rows(self, steps: jax.Array, outputs: LayerOutputs) -> "LayerRecord":
        """Stores the `LayerOutputs` of a forward pass of ``q`` tokens a row that runs each row at
        its own step (assisted decoding's): position ``i`` of row ``r`` gives token ``steps[r, i]``'s
        logits (int32[rows, q]; steps outside ``[1, N)`` are dropped), as `record` would store the
        one-token pass of that step (the slots past it get no weight from its query)."""
        buffers = [b for b in (self.attentions, self.hidden) if b is not None]
        n = buffers[0].shape[0] if buffers else 0
        if not n:  # nothing asked, or max_new_tokens=1
            return self
        entry = jnp.where((steps >= 1) & (steps <= n), steps - 1, n)  # n: out of range, dropped
        rows = jnp.arange(steps.shape[0])[:, None]
        attentions, hidden = self.attentions, self.hidden
        if attentions is not None:
            a = jnp.stack(outputs.attentions)[..., :attentions.shape[-1]]  # [layers, rows, heads, q, P + N]
            attentions = attentions.at[entry, :, rows].set(a.transpose(1, 3, 0, 2, 4), mode="drop")
        if hidden is not None:
            h = jnp.stack(outputs.hidden_states)  # [k, rows, q, d]
            hidden = hidden.at[entry, :, rows].set(h.transpose(1, 2, 0, 3), mode="drop")
        return self.replace(attentions=attentions, hidden=hidden)

    def trim(self, steps: int, prompt_len: int, bucket_len: int):
        """(attentions, hidden_states) as transformers returns them, or None each: one tuple per
        step of one entry per layer, ``[rows, n_heads, q, kv]`` (the prompt's ``q = kv = L``, then
        ``q = 1`` and ``kv = L + step``, a sliding layer's at most its window), and of
        ``n_layers + 1`` entries ``[rows, q, d]`` (None where not captured)."""
        start = bucket_len - prompt_len
        attentions = hidden = None
        if self.attentions is not None:
            prompt, later = np.asarray(self.prompt_attentions), np.asarray(self.attentions)

            def step_attentions(i):  # a sliding layer: its last `w` keys at most
                end = bucket_len + i
                return tuple(a[..., None, end - min(end - start, w or end):end]
                             for a, w in zip(later[i - 1], self.windows))

            attentions = (tuple(prompt[:, :, :, start:, start:]),) + tuple(step_attentions(i) for i in range(1, steps))
        if self.indices is not None:
            def spread(entries):  # the captured entries at their indices, None elsewhere
                at = dict(zip(self.indices, entries))
                return tuple(at.get(i) for i in range(self.n_hidden))

            if self.hidden is None:  # indices that select nothing
                hidden = (spread(()),) * steps
            else:
                prompt, later = np.asarray(self.prompt_hidden), np.asarray(self.hidden)
                hidden = (spread(prompt[:, :, start:]),) + tuple(spread(later[i - 1][:, :, None])
                                                                 for i in range(1, steps))
        return attentions, hidden


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
    layers: the attentions and hidden states of every step (`LayerRecord`), None unless asked.
    num_drafted / num_accepted: int32[rows], assisted decoding's draft tokens proposed and kept
      per row (jaxgen's own: transformers returns no such count); None for the other decoders.
    """

    sequences: jax.Array
    num_steps: jax.Array
    scores: jax.Array | None = None
    logits: jax.Array | None = None
    sequences_scores: jax.Array | None = None
    beam_indices: jax.Array | None = None
    layers: LayerRecord | None = None
    num_drafted: jax.Array | None = None
    num_accepted: jax.Array | None = None
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
        sequences = np.asarray(self.sequences)[:, start:self.bucket_len + generated].astype(np.int64)
        per_step = lambda buf: None if buf is None else tuple(np.asarray(buf[:steps]))  # noqa: E731
        has_seq_scores = self.sequences_scores is not None and self.output_scores
        attentions, hidden_states = (None, None) if self.layers is None else self.layers.trim(
            steps, int(self.prompt_len), self.bucket_len)
        return HFOutput(
            sequences=sequences,
            scores=per_step(self.scores),
            logits=per_step(self.logits),
            sequences_scores=np.asarray(self.sequences_scores) if has_seq_scores else None,
            beam_indices=beam_indices,
            attentions=attentions,
            hidden_states=hidden_states,
        )


@dataclasses.dataclass
class HFOutput:
    """Host-side output with the shapes transformers returns.

    sequences: int64[rows, prompt_len + generated]; sequences_scores: float32[rows] (beam search
    with ``output_scores``, as transformers); scores / logits: tuple of float32[beam_rows, V], one
    per step; beam_indices: int32[rows, generated] (beam search); attentions / hidden_states:
    per step, per layer (see `LayerRecord.trim`).

    Read as transformers' ``ModelOutput`` too: a mapping of the fields that are not None
    (``out["scores"]``, ``out.keys()``, ``"scores" in out``), indexed in field order by position
    (``out[0]`` is ``sequences``), ``out.to_tuple()``.
    """

    sequences: np.ndarray
    sequences_scores: np.ndarray | None = None
    scores: tuple[np.ndarray, ...] | None = None
    logits: tuple[np.ndarray, ...] | None = None
    beam_indices: np.ndarray | None = None
    attentions: tuple[tuple[np.ndarray, ...], ...] | None = None
    hidden_states: tuple[tuple[np.ndarray | None, ...], ...] | None = None

    def to_tuple(self) -> tuple:
        """The fields that are not None, in order (transformers' ``ModelOutput.to_tuple``)."""
        return tuple(self.values())

    def keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]

    def values(self) -> list:
        return [getattr(self, k) for k in self.keys()]

    def items(self) -> list[tuple[str, object]]:
        return list(zip(self.keys(), self.values()))

    def __getitem__(self, key):
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]

    def __iter__(self):
        return iter(self.keys())

    def __contains__(self, key) -> bool:
        return key in self.keys()

    def __len__(self) -> int:
        return len(self.keys())
