"""Self-attention over the KV cache: which slots each query may read, and the attention itself.

Queries have ``n_heads`` heads, keys and values ``n_kv_heads`` (grouped-query attention: query
head ``h`` reads kv head ``h // (n_heads / n_kv_heads)``, as transformers' ``repeat_kv``). Scores
and softmax run in float32; a masked score is float32's minimum (not -inf), as transformers.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxgen.models.cache import KVCache, to_layout


@dataclasses.dataclass
class View:
    """What the layers of one forward pass share: the cache they read and write, where the chunk
    goes, and which slots each of its queries may read.

    masks: per sliding window (None: full attention), bool[batch, group, seq, length] over the
    cache's physical slots (see `KVCache`); cache: None for a pass without one (its own keys
    only); slot: first cache slot of the chunk (int32[] or int32[rows]).
    """

    masks: dict
    cache: KVCache | None
    slot: jax.Array | int
    group: int


def view(kv_mask: jax.Array, seq: int, cache: KVCache | None, slot, windows) -> View:
    """The `View` of a chunk of ``seq`` tokens written at ``slot``.

    kv_mask: which key slots each row may read, before the causal and window limits:
    bool[rows, kv_len, group] (row ``b * group + g`` reads slot ``t`` of row ``b * group + r`` where
    ``kv_mask[b * group + g, t, r]``), or bool[rows, kv_len] with ``group == 1``. ``kv_len`` is
    ``seq`` without a cache, ``cache.max_len`` with one (a longer mask is cut to it). A slot shared
    by the group (``t < cache.shared``) is read where any ``r`` is set. A query at slot ``q`` reads
    slots ``t <= q``, and ``t > q - window`` in a layer with a sliding window.
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
        reach = t <= query if window is None else (t <= query) & (t > query - window)  # [rows, seq, kv_len]
        m = allowed & reach.reshape(-1, group, seq, kv_len, 1)  # [batch, g, seq, kv_len, r]
        masks[window] = jnp.concatenate([m[..., :shared, :].any(-1), m[..., shared:, :].reshape(*m.shape[:3], -1)], -1)
    return View(masks, cache, slot, group)


def attention(q, k, v, view: View, layer: int, *, scale: float, window: int | None = None, upcast: bool = False):
    """Attention of a chunk's queries over the cache after writing the chunk's keys and values.

    q: dtype[rows, seq, n_heads, head_dim]; k, v: dtype[rows, seq, n_kv_heads, head_dim] (rotated
    keys). ``upcast``: scale the queries before the product, all in float32 (GPT-2's
    ``reorder_and_upcast_attn``). Returns (dtype[rows, seq, n_heads * head_dim], (keys, values) of
    layer ``layer`` in the cache layout).
    """
    if view.cache is None:
        kt, vt = to_layout(k, 1, keys=True), to_layout(v, 1, keys=False)
    else:
        kt, vt = view.cache.write(layer, k, v, view.slot)
    return attend(q, kt, vt, view.masks[window], view.group, scale, upcast), (kt, vt)


def attend(q, kt, v, mask, group: int, scale: float, upcast: bool = False):
    """q: [b * g, s, h, hd]; kt: [b, kvh, hd, L] (keys transposed); v: [b, kvh, L, hd]; mask:
    bool[b, g, s, L] -> [b * g, s, h * hd]. With ``b == 1``, kt and v come without their batch
    dim (`KVCache`'s layout) and the products are taken without it."""
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
    scores = (scores * scale).reshape(*scores.shape[:-2], group * s, heads, -1)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(*scores.shape[:-3], group * s * heads, -1)
    out = jnp.einsum("...mk,...kn->...mn", weights, v, preferred_element_type=jnp.float32).astype(v.dtype)
    out = out.reshape(b, kvh, group, s, heads, hd).transpose(0, 2, 3, 1, 4, 5)
    return out.reshape(rows, s, h * hd)
