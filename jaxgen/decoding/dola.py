"""DoLa decoding (``dola_layers``: "Decoding by Contrasting Layers", transformers 4.53's
``_dola_decoding``, which transformers 5.x moved to the hub): greedy search or sampling whose
scores are the final layer's log-probabilities minus an earlier ("premature") layer's.

Each step the LM head also reads the candidate layers' hidden states at the last position (as
they leave their layer: no final norm, no soft-cap, as transformers' ``lm_head``); with several
candidates the one whose distribution is furthest from the final one (Jensen-Shannon divergence,
averaged over the batch: one layer for the whole batch, as transformers) is contrasted. Tokens
the final layer gives less than a tenth of its best probability are -inf (the relative-top
filter); the processors then run on the contrast as on logits.

Shapes: ``rows`` decode rows, ``C`` candidate layers, ``V`` vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import xlogy

from jaxgen.models.model import CausalLM, LayerOutputs, head

RELATIVE_TOP = 0.1  # transformers' `_relative_top_filter` defaults
BASE_FILTER_VALUE = -1e-3


def candidate_layers(dola_layers, n_layers: int, tied: bool) -> tuple[int, ...]:
    """The hidden-state indices (0: the embeddings) DoLa contrasts: ``"low"`` / ``"high"`` (the
    lower or upper half of the layers, every other one, at most 20 layers' span) or a list of
    indices, those below ``n_layers`` kept (transformers' rule; a negative index counts from the
    end of the ``n_layers + 1`` hidden states, as Python's). Raises ValueError for anything else."""
    start = 0 if not tied else 2 if n_layers > 2 else 1 if n_layers == 2 else 0  # a tied head skips the embeddings
    if isinstance(dola_layers, str) and dola_layers == "low":
        kept = [start] if start == n_layers // 2 else list(range(start, n_layers // 2 if n_layers <= 40 else 20, 2))
    elif isinstance(dola_layers, str) and dola_layers == "high":
        kept = list(range(n_layers // 2, n_layers, 2) if n_layers <= 40 else range(n_layers - 20, n_layers, 2))
    elif isinstance(dola_layers, (list, tuple)) and all(isinstance(i, (int, np.integer)) and not isinstance(i, bool)
                                                        for i in dola_layers):
        kept = [int(i) for i in dola_layers if i < n_layers]
        if any(i < -(n_layers + 1) for i in kept):
            raise ValueError(f"dola_layers={list(dola_layers)} is not allowed: the model has {n_layers + 1} hidden "
                             f"states (indices -{n_layers + 1} to {n_layers})")
    else:
        raise ValueError(f"dola_layers={dola_layers!r} is not allowed: expected 'low', 'high' or a list of layer "
                         "indices (as transformers)")
    if not kept:  # transformers' contrast fails on an empty stack
        raise ValueError(f"dola_layers={dola_layers!r} is not allowed: it leaves no layer below the final one "
                         f"({n_layers}) to contrast")
    return tuple(i % (n_layers + 1) for i in kept)


def split(model: CausalLM, outputs: LayerOutputs | None, layers: tuple[int, ...], asked: bool,
          row_shards: int = 1) -> tuple[LayerOutputs | None, jax.Array | None]:
    """A forward's captured outputs (`DecodeSpec.capture`: the hidden states asked for, then the
    candidate ``layers``') -> (the outputs the call asked for, or None unless ``asked``;
    float32[C, rows, V] the candidate layers' logits at the last position, or None without DoLa)."""
    if not layers:
        return outputs, None
    states = outputs.hidden_states
    premature = jnp.stack([head(model, h[:, -1], row_shards) for h in states[-len(layers):]])
    own = LayerOutputs(outputs.attentions, states[:-len(layers)] or None) if asked else None
    return own, premature


def contrast(final: jax.Array, premature: jax.Array) -> jax.Array:
    """float32[rows, V]: the final logits ``final`` contrasted with the premature layer's (of
    ``premature: float32[C, rows, V]``, the one furthest from the final distribution)."""
    base = premature[0]
    if premature.shape[0] > 1:
        m = 0.5 * (jax.nn.softmax(final, -1)[None] + jax.nn.softmax(premature, -1))  # [C, rows, V]
        kl_final = (xlogy(m, m) - m * jax.nn.log_softmax(final, -1)[None]).mean(-1)  # torch's kl_div, per row
        kl_premature = (xlogy(m, m) - m * jax.nn.log_softmax(premature, -1)).mean(-1)
        js = (0.5 * (kl_final + kl_premature)).mean(-1)  # [C]: over the batch
        base = jnp.take(premature, jnp.argmax(js), axis=0)
    final, base = jax.nn.log_softmax(final, -1), jax.nn.log_softmax(base, -1)
    threshold = final.max(-1, keepdims=True) + np.float32(np.log(RELATIVE_TOP))
    below = final < threshold
    return jnp.where(below, -jnp.inf, final) - jnp.where(below, BASE_FILTER_VALUE, base)
