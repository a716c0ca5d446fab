"""The model object every decoder calls, and the forward pass all families share.

A family (``jaxgen/models/<family>.py``) supplies its config, its checkpoint table and four
pure functions: ``embed`` (tokens, positions -> hidden states, and the rotary tables its layers
share), ``block`` (one decoder layer, given its `attention.Layer`), ``final`` (the last norm) and
``logits`` (the head);
everything else here is shared. The decoders see only this module's
protocol::

    model.init_cache(batch, max_len, group, shared) -> KVCache
    forward(model, tokens, positions, kv_mask, cache, slot) -> (hidden, cache)
    forward(..., capture=Capture(...)) -> (hidden, cache, LayerOutputs)
    logits(model, hidden) -> float32[..., vocab]

and ``model.config``'s `ModelConfig` fields.
"""

from __future__ import annotations

import functools
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from flax.core import FrozenDict

from jaxgen import models, sharding
from jaxgen.models import attention, layers
from jaxgen.models.cache import KVCache
from jaxgen.models.config import DTYPES, ModelConfig


@struct.dataclass
class CausalLM:
    """A causal language model of any supported family: ``params`` (pytree leaves), ``config``
    and ``generation_config`` (static): the checkpoint's generation settings, which a call uses
    where it passes none, as transformers' ``model.generation_config`` (see
    `jaxgen.generation_config`). Pass it through ``jax.jit``, ``device_put`` or ``jax.tree.map``
    like any pytree."""

    params: Any
    config: ModelConfig = struct.field(pytree_node=False)
    generation_config: FrozenDict = struct.field(pytree_node=False, default=FrozenDict())

    @property
    def dtype(self):
        return DTYPES[self.config.dtype]

    @property
    def family(self):
        """The module that implements this model's family (`jaxgen.models.family_of`)."""
        return models.family_of(self.config.model_type)

    def __call__(self, input_ids, attention_mask=None, position_ids=None) -> jax.Array:
        """Full forward without cache: float32 logits ``[batch, seq, vocab]``.

        ``input_ids``: int[batch, seq]; ``attention_mask``: {0,1}[batch, seq] (default all ones);
        ``position_ids``: int[batch, seq], derived from the mask as generation does when omitted
        (``cumsum(mask) - 1``), so a left-padded batch gives the logits generation sees.
        """
        sharding.check_inputs(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        input_ids = jnp.asarray(sharding.gathered(input_ids))
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        attention_mask = jnp.asarray(sharding.gathered(attention_mask))
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask)
        return _jitted_logits(self, input_ids, attention_mask, jnp.asarray(sharding.gathered(position_ids)))

    def early_exit(self, n_layers: int) -> "CausalLM":
        """The model's first ``n_layers`` layers (all where it has fewer), then its final norm and
        head: transformers' ``assistant_early_exit`` draft, on the same weights (not copied)."""
        c = self.config
        n = min(n_layers, c.n_layers)
        config = dataclasses.replace(c, n_layers=n, layer_windows=c.layer_windows[:n])
        return self.replace(params={**self.params, "layers": self.params["layers"][:n]}, config=config)

    def init_cache(self, batch_size: int, max_len: int, group: int = 1, shared: int = 0,
                   ring_below: int | None = None) -> KVCache:
        """An empty cache of ``max_len`` slots for ``batch_size`` groups of ``group`` rows that
        store their first ``shared`` slots once per group (see `KVCache`); a sliding-window layer
        keeps a ring of its window where that window is shorter than ``ring_below`` (the longest
        sequence the cache will see)."""
        c = self.config
        rings = tuple(w if ring_below is not None and w is not None and w < ring_below else None
                      for w in (c.layer_windows or (None,) * c.n_layers))
        return KVCache.empty(n_layers=c.n_layers, n_kv_heads=c.n_kv_heads, head_dim=c.head_dim, dtype=self.dtype,
                             batch=batch_size, max_len=max_len, group=group, shared=shared, rings=rings)


@dataclasses.dataclass(frozen=True)
class Capture:
    """What a forward pass returns beside its output (static): every layer's attention weights,
    and the hidden states at these indices of transformers' ``n_layers + 1`` (the embeddings, the
    output of each layer but the last, then the last's after the final norm; None: none asked)."""

    attentions: bool = False
    hidden_states: tuple[int, ...] | None = None


@struct.dataclass
class LayerOutputs:
    """What a `Capture` asks of one forward pass of ``seq`` tokens over ``max_len`` slots:
    attentions, one per layer, dtype[rows, n_heads, seq, max_len] (slots in sequence order); and
    hidden_states, one per captured index, dtype[rows, seq, d_model]. None where not asked."""

    attentions: tuple[jax.Array, ...] | None
    hidden_states: tuple[jax.Array, ...] | None


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Position ids of a left-padded batch (holes too): ``cumsum(mask) - 1``, padded slots set to 0.

    As ``GenerationMixin._prepare_position_ids_for_generation`` in transformers 5.x. The value at
    padded slots never reaches a real token (padded keys are masked out).
    """
    mask = attention_mask.astype(jnp.int32)
    return jnp.where(mask == 0, 0, jnp.cumsum(mask, axis=-1) - 1)


def forward(model: CausalLM, input_ids: jax.Array, position_ids: jax.Array, kv_mask: jax.Array,
            cache: KVCache | None = None, cache_index: jax.Array | int = 0,
            row_shards: int = 1, capture: Capture | None = None, absent: jax.Array | None = None):
    """Runs the layers over a chunk of tokens; returns the final hidden states and the cache
    (and, with ``capture``, the `LayerOutputs` it asks for).

    Args:
      input_ids: int[rows, seq], the chunk; ``rows = batch * cache.group`` (``batch`` without a
        cache).
      position_ids: int[rows, seq].
      kv_mask: which key slots each row may read (see `attention.view`; the causal and window
        limits are added there).
      cache: if given, the chunk's keys and values are written at slots
        ``[cache_index, cache_index + seq)`` of each row's own cache row (at or after
        ``cache.shared`` when ``group > 1``), then read as ``kv_mask`` says.
      cache_index: first slot of the chunk: int32[] (may be traced), or int32[rows] where rows
        stand at different lengths (``group == 1``).
      row_shards: static; how many devices a mesh splits the rows over (its data axis), so that
        the weight products pad each device's rows on their own (`kernels.matmul.project`).
      capture: static; the attentions and hidden states to return (`Capture`).
      absent: int32[]: the slots before it are bucket padding (see `attention.view`).

    Returns:
      hidden: dtype[rows, seq, d_model] after the final norm; the updated cache, or without one
      the chunk's own keys and values as a ``seq``-slot cache (`KVCache.fill_prompt` writes a
      prompt's into a longer one).
    """
    family, config, params = model.family, model.config, model.params
    view = attention.view(kv_mask, input_ids.shape[1], cache, cache_index, config.windows, absent,
                          capture is not None and capture.attentions)
    x, rotary = family.embed(params, config, input_ids, position_ids)
    keys, values, weights, states = [], [], [], [x]
    for i, layer in enumerate(params["layers"]):
        x, (k, v, *w) = _block(family, config, row_shards, layer, x, rotary, view.layer(i, config.window(i)))
        keys.append(k)
        values.append(v)
        weights += w
        states.append(x)
    x = family.final(params, config, x)
    states[-1] = x
    if cache is None:
        cache = KVCache(tuple(keys), tuple(values), max_len=input_ids.shape[1])
    else:
        cache = cache.replace(keys=tuple(keys), values=tuple(values))
    if capture is None:
        return x, cache
    return x, cache, LayerOutputs(tuple(weights) if capture.attentions else None,
                                  tuple(states[i] for i in capture.hidden_states or ()) or None)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _block(family, config, row_shards, params, x, rotary, layer):
    """One layer, traced once for all the layers of a model that share its shapes (the layer's
    index is traced): tracing and lowering then take the same time at any depth."""
    return family.block(params, config, x, rotary, layer, row_shards)


def logits(model: CausalLM, hidden: jax.Array, row_shards: int = 1) -> jax.Array:
    """dtype[..., d_model] -> float32 logits [..., vocab]; ``row_shards`` as in `forward`."""
    return model.family.logits(model.params, model.config, hidden, row_shards)


def head(model: CausalLM, hidden: jax.Array, row_shards: int = 1) -> jax.Array:
    """The LM head alone (transformers' ``get_output_embeddings()``: no final soft-cap):
    dtype[..., d_model] -> float32[..., vocab]."""
    return layers.lm_head(model.params, hidden, row_shards)


@jax.jit
def _jitted_logits(model, input_ids, attention_mask, position_ids):
    hidden, _ = forward(model, input_ids, position_ids, attention_mask)
    return logits(model, hidden)
