"""Classifier-free guidance (``guidance_scale``, transformers' first logits processor,
``UnbatchedClassifierFreeGuidanceLogitsProcessor``), for greedy search and sampling.

A second, unconditional branch runs the model on ``negative_prompt_ids`` (default: each row's
last prompt token) with a cache of its own, then on each generated token, as transformers'
processor does; its positions count from 0 whatever its mask (transformers' model takes them
from the cache length). Each step's scores become ``scale * (c - u) + u`` of the log-softmaxes of
the conditional (``c``) and unconditional (``u``) logits, before the other processors.

Shapes: ``rows`` decode rows, ``U`` the unconditional prompt's length, ``N`` max_new_tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxgen.models.cache import KVCache
from jaxgen.models.model import CausalLM, forward
from jaxgen.models.model import logits as logits_of


@struct.dataclass
class Guidance:
    """The call's guidance: scale float32[]; input_ids int32[rows, U], the unconditional prompt,
    or None for each row's last prompt token (U = 1); attention_mask int32[rows, U] over it, or
    None for all ones."""

    scale: jax.Array
    input_ids: jax.Array | None = None
    attention_mask: jax.Array | None = None


@struct.dataclass
class Unconditional:
    """The unconditional branch: logits float32[rows, V] for the next token; its cache and
    kv_mask bool[rows, U + N]; length: int32[], the tokens it has read."""

    logits: jax.Array
    cache: KVCache
    kv_mask: jax.Array
    length: jax.Array


def start(model: CausalLM, guidance: Guidance, last_tokens: jax.Array, max_new_tokens: int) -> Unconditional:
    """The unconditional prompt's forward: ``guidance.input_ids``, else ``last_tokens``
    (int32[rows], each row's last prompt token)."""
    ids = last_tokens[:, None] if guidance.input_ids is None else guidance.input_ids
    mask = jnp.ones(ids.shape, bool) if guidance.attention_mask is None else guidance.attention_mask.astype(bool)
    rows, length = ids.shape
    hidden, prompt = forward(model, ids, jnp.broadcast_to(jnp.arange(length), ids.shape), mask)
    cache = model.init_cache(rows, length + max_new_tokens).fill_prompt(prompt)
    kv_mask = jnp.concatenate([mask, jnp.ones((rows, max_new_tokens), bool)], axis=1)
    return Unconditional(logits_of(model, hidden[:, -1]), cache, kv_mask, jnp.int32(length))


def step(model: CausalLM, branch: Unconditional, tokens: jax.Array) -> Unconditional:
    """Feeds ``tokens: int32[rows]``, the tokens just chosen."""
    position = jnp.broadcast_to(branch.length, tokens.shape)[:, None]
    hidden, cache = forward(model, tokens[:, None], position, branch.kv_mask, branch.cache, branch.length)
    return branch.replace(logits=logits_of(model, hidden[:, 0]), cache=cache, length=branch.length + 1)


def guide(logits: jax.Array, branch: Unconditional, scale: jax.Array) -> jax.Array:
    """float32[rows, V]: the conditional ``logits`` guided by the unconditional branch's."""
    conditional, unconditional = jax.nn.log_softmax(logits, -1), jax.nn.log_softmax(branch.logits, -1)
    return scale * (conditional - unconditional) + unconditional
