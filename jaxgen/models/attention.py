"""Self-attention over the KV cache: which slots each query may read, and the attention itself.

Queries have ``n_heads`` heads, keys and values ``n_kv_heads`` (grouped-query attention: query
head ``h`` reads kv head ``h // (n_heads / n_kv_heads)``, as transformers' ``repeat_kv``). Scores
and softmax run in float32; a masked score is float32's minimum (not -inf), as transformers.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from flax import struct

from jaxgen.models.cache import KVCache, loaded, stored, to_layout, write
from jaxgen.models.layers import soft_cap


@dataclasses.dataclass
class View:
    """What the layers of one forward pass share: the cache, where the chunk goes, and which
    slots each of its queries may read (per sliding window, None for full attention:
    bool[batch, group, seq, length] over the cache's physical slots, see `KVCache`)."""

    masks: dict
    cache: KVCache | None
    slot: jax.Array | int
    absent: jax.Array | None = None
    weights: bool = False

    def layer(self, index: int, window: int | None) -> "Layer":
        """Layer ``index``'s part of the view."""
        cache = self.cache
        if cache is None:
            return Layer(self.masks[window], None, None, self.slot, jnp.int32(index), self.absent, window,
                         weights=self.weights)
        return Layer(self.masks[window], cache.keys[index], cache.values[index], self.slot, jnp.int32(index),
                     self.absent, window, cache.group, cache.shared, cache.ring(index), self.weights)


@struct.dataclass
class Layer:
    """One layer's attention state: the slots its queries may read (``mask``, bool[batch,
    group, seq, length]), its cache arrays (None in a pass without a cache), the chunk's first
    slot, the layer's index (traced, so that the layers of a model share one traced function),
    ``absent`` (see `view`) and, static, its sliding window, the cache's grouping, the layer's ring
    (see `KVCache`) and whether it returns its attention weights."""

    mask: jax.Array
    keys: jax.Array | None
    values: jax.Array | None
    slot: jax.Array | int
    index: jax.Array
    absent: jax.Array | None = None
    window: int | None = struct.field(pytree_node=False, default=None)
    group: int = struct.field(pytree_node=False, default=1)
    shared: int = struct.field(pytree_node=False, default=0)
    ring: int | None = struct.field(pytree_node=False, default=None)
    weights: bool = struct.field(pytree_node=False, default=False)


def view(kv_mask: jax.Array, seq: int, cache: KVCache | None, slot, windows, absent: jax.Array | None = None,
         weights: bool = False) -> View:
    """The `View` of a chunk of ``seq`` tokens written at ``slot``.

    kv_mask: which key slots each row may read, before the causal and window limits:
    bool[rows, kv_len, group] (row ``b * group + g`` reads slot ``t`` of row ``b * group + r`` where
    ``kv_mask[b * group + g, t, r]``), or bool[rows, kv_len] with ``group == 1``. ``kv_len`` is
    ``seq`` without a cache, ``cache.max_len`` with one (a longer mask is cut to it). A slot shared
    by the group (``t < cache.shared``) is read where any ``r`` is set. A query at slot ``q`` reads
    slots ``t <= q``, and ``t > q - window`` in a layer with a sliding window. A layer that keeps
    a ring (`KVCache`) is masked over its ring: index ``j`` holds slot ``q - ((q - j) % ring)``,
    and of a prompt slot, which every row of a group holds, each row reads its own copy.

    ``absent``: int32[], the slots before it hold no token at all (bucket padding) rather than a
    masked one: a query that may read nothing spreads its weight evenly over the other slots, as
    transformers' eager attention does over its unbucketed prompt (the padding rows of a prefill,
    whose values attentions and hidden states show, and the last of a row whose mask is all zeros,
    which picks its first token). ``weights``: the layers return their attention weights.
    """
    group = 1 if cache is None else cache.group
    kv_len = seq if cache is None else cache.max_len
    kv_mask = kv_mask[:, :kv_len]
    if kv_mask.ndim == 2:
        if group != 1:
            raise ValueError(f"a cache with group={group} needs kv_mask: bool[rows, kv_len, group]")
        kv_mask = kv_mask[:, :, None]
    rows = kv_mask.shape[0]
    query = jnp.broadcast_to(jnp.reshape(slot, (-1, 1)) + jnp.arange(seq), (rows, seq))[..., None]  # [rows, seq, 1]
    t = jnp.arange(kv_len)
    allowed = kv_mask.astype(bool).reshape(-1, group, 1, kv_len, group)
    shared = 0 if cache is None else cache.shared
    masks = {}
    for window in windows:
        ring = None if cache is None else cache.ring_of(window)
        if ring is not None:
            masks[window] = _ring_mask(kv_mask.astype(bool), query, ring, shared, group)
            continue
        reach = t <= query if window is None else (t <= query) & (t > query - window)  # [rows, seq, kv_len]
        m = allowed & reach.reshape(-1, group, seq, kv_len, 1)  # [batch, g, seq, kv_len, r]
        masks[window] = jnp.concatenate([m[..., :shared, :].any(-1), m[..., shared:, :].reshape(*m.shape[:3], -1)], -1)
    return View(masks, cache, slot, absent, weights)


def _ring_mask(kv_mask, query, ring: int, shared: int, group: int):
    """bool[batch, group, seq, ring * group] over a ring's slots (see `view`); kv_mask:
    bool[rows, kv_len, group], query: int[rows, seq, 1]."""
    rows, seq = query.shape[:2]
    held = query - jnp.mod(query - jnp.arange(ring), ring)  # [rows, seq, ring]: the slot at each index
    m = jnp.take_along_axis(kv_mask, jnp.maximum(held, 0).reshape(rows, seq * ring, 1), axis=1)
    m = m.reshape(rows, seq, ring, group) & (held >= 0)[..., None]
    own = jnp.arange(group) == (jnp.arange(rows) % group)[:, None]  # [rows, r]: the row's own copy
    m = jnp.where((held < shared)[..., None], m.any(-1, keepdims=True) & own[:, None, None], m)
    return m.reshape(rows // group, group, seq, ring * group)


def attention(q, k, v, layer: Layer, *, scale, upcast: bool = False, softcap: float | None = None):
    """Attention of a chunk's queries over the cache after writing the chunk's keys and values.

    q: dtype[rows, seq, n_heads, head_dim]; k, v: dtype[rows, seq, n_kv_heads, head_dim] (rotated
    keys); ``scale``: the factor on ``q . k`` (may be traced). ``upcast``: scale the queries
    before the product, all in float32 (GPT-2's ``reorder_and_upcast_attn``). ``softcap``: scaled
    scores become ``softcap * tanh(score / softcap)`` before the mask (Gemma 2). Returns
    (dtype[rows, seq, n_heads * head_dim], the layer's keys and values in the cache layout), and
    with ``layer.weights`` its attention weights after them: dtype[rows, n_heads, seq, max_len],
    over the slots in sequence order (each row's own history, whichever row of its group holds it).
    """
    if layer.keys is None:
        kt, vt = stored(to_layout(k, 1, keys=True)), stored(to_layout(v, 1, keys=False))
    else:
        kt, vt = write(layer.keys, layer.values, k, v, layer.slot, layer.group, layer.shared, layer.ring)
    out, weights = attend(q, loaded(kt, k.dtype), loaded(vt, v.dtype), layer.mask, layer.group, scale, upcast,
                          softcap, layer.absent)
    if not layer.weights:
        return out, (kt, vt)
    if layer.ring is not None:
        raise ValueError("attention weights are returned over whole slots, not a ring's")
    rows, s, h, _ = q.shape
    kvh = kt.shape[-3]
    w = weights.reshape(rows // layer.group, kvh, layer.group, s, h // kvh, -1).transpose(0, 2, 1, 4, 3, 5)
    w = w.reshape(rows, h, s, -1)
    if layer.group > 1:  # slot t of row r sits in one of its group's copies; the others weigh 0
        shared = layer.shared
        w = jnp.concatenate([w[..., :shared], w[..., shared:].reshape(rows, h, s, -1, layer.group).sum(-1)], -1)
    return out, (kt, vt, w)


def attend(q, kt, v, mask, group: int, scale: float, upcast: bool = False, softcap: float | None = None,
           absent: jax.Array | None = None):
    """q: [b * g, s, h, hd]; kt: [b, kvh, hd, L] (keys transposed); v: [b, kvh, L, hd]; mask:
    bool[b, g, s, L] -> ([b * g, s, h * hd], the weights [b, kvh, g * s * heads, L]). With ``b ==
    1``, kt and v come without their batch dim (`KVCache`'s layout) and the products are taken
    without it. ``absent``: slots before it weigh 0 even for a query that may read nothing (`view`)."""
    rows, s, h, hd = q.shape
    b, kvh = rows // group, kt.shape[-3]
    heads = h // kvh  # query heads per kv head
    q = q.reshape(b, group, s, kvh, heads, hd).transpose(0, 3, 1, 2, 4, 5).reshape(b, kvh, group * s * heads, hd)
    mask = mask.reshape(b, 1, group * s, 1, -1)
    if kt.ndim == 3:
        q, mask = q[0], mask[0]
    if upcast:
        q, kt, scale = q.astype(jnp.float32) * scale, kt.astype(jnp.float32), 1.0
    if group > 1 and s == 1:  # a beam step: [beams, hd] x [hd, kv] per head, which XLA:CPU runs
        # faster as a broadcast multiply and a sum than as many tiny matmuls
        scores = (q[..., None].astype(jnp.float32) * kt[..., None, :, :].astype(jnp.float32)).sum(-2)
    else:
        scores = jnp.einsum("...mk,...kn->...mn", q, kt, preferred_element_type=jnp.float32)
    scores = soft_cap(scores * scale, softcap).reshape(*scores.shape[:-2], group * s, heads, -1)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    if absent is not None:
        scores = jnp.where(jnp.arange(scores.shape[-1]) < absent, -jnp.inf, scores)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(*scores.shape[:-3], group * s * heads, -1)
    out = jnp.einsum("...mk,...kn->...mn", weights, v, preferred_element_type=jnp.float32).astype(v.dtype)
    out = out.reshape(b, kvh, group, s, heads, hd).transpose(0, 2, 3, 1, 4, 5)
    return out.reshape(rows, s, h * hd), weights
