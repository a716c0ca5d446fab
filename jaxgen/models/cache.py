"""The KV cache: one keys and one values array per layer, in the layout attention reads fastest.

- keys ``dtype[batch, n_kv_heads, head_dim, length]``, stored transposed: a decode step's
  ``q . k`` then reduces over a major axis and vectorises along the slots;
- values ``dtype[batch, n_kv_heads, length, head_dim]``;
- a cache of one batch row (or one group) drops the unit batch dim: XLA:CPU copies a
  loop-carried array with a unit dim every step when a dot reads it.

One array per layer (no stacking), so that a step updates each in place with
``lax.dynamic_update_slice``. Slot ``t`` holds the token of sequence column ``t``; the cache
has room for ``max_len`` of them.

Rows come in groups (``rows = batch * group``, row ``b * group + r``) that may read each other's
slots (beam search). The first ``shared`` slots (the prompt) are stored once per group and read
by all its rows; after them, index ``shared + (t - shared) * group + r`` holds slot ``t`` of row
``r``, so ``length = shared + (max_len - shared) * group``. Beam search keeps each beam's keys in
the row that computed them and tells every beam, per slot, which row holds its history, so
reordering beams never moves the cache. Slot-major order keeps a step's write one contiguous
slice. Greedy search and sampling use ``group == 1``.

A sliding-window layer whose window ``w`` is shorter than the sequence keeps a ring instead
(``rings[layer] == w``): ``w`` slots per row, slot ``t`` at ring index ``t % w`` (``(t % w) *
group + r``, nothing shared), so its memory is bounded by the window, as transformers' sliding
cache layers are. A query at slot ``q`` then finds slot ``q - ((q - j) % w)`` at ring index
``j``: exactly the window it may read (`attention.view`).

A write goes to one slot for all rows (a scalar) or, with ``group == 1``, to a slot of each
row's own (``int32[rows]``: rows at different lengths).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class KVCache:
    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    group: int = struct.field(pytree_node=False, default=1)
    shared: int = struct.field(pytree_node=False, default=0)
    max_len: int = struct.field(pytree_node=False, default=0)
    rings: tuple[int | None, ...] = struct.field(pytree_node=False, default=())

    @classmethod
    def empty(cls, *, n_layers: int, n_kv_heads: int, head_dim: int, dtype, batch: int, max_len: int,
              group: int = 1, shared: int = 0, rings: tuple[int | None, ...] = ()) -> "KVCache":
        """Zeros for ``batch`` groups of ``group`` rows and ``max_len`` slots, the first ``shared``
        of them stored once per group; layer ``i`` a ring of ``rings[i]`` slots where given."""
        if group < 1 or not 0 <= shared <= max_len:
            raise ValueError(f"a cache needs group >= 1 and 0 <= shared <= max_len, got {group=}, {shared=}")
        rings = tuple(rings) or (None,) * n_layers
        lead = (batch, n_kv_heads) if batch > 1 else (n_kv_heads,)
        lengths = [shared + (max_len - shared) * group if ring is None else ring * group for ring in rings]
        store = storage_dtype(dtype)
        keys = tuple(jnp.zeros((*lead, head_dim, n), store) for n in lengths)
        values = tuple(jnp.zeros((*lead, n, head_dim), store) for n in lengths)
        return cls(keys, values, group, shared, max_len, rings)

    @property
    def batch(self) -> int:
        """How many rows (groups when ``group > 1``) the cache holds."""
        return self.values[0].shape[0] if self.values[0].ndim == 4 else 1

    def ring(self, layer: int) -> int | None:
        return self.rings[layer] if self.rings else None

    def ring_of(self, window: int | None) -> int | None:
        """The ring size of the layers with sliding window ``window`` (None: they keep every slot)."""
        return window if window is not None and window in self.rings else None

    def map_arrays(self, fn) -> "KVCache":
        """Applies ``fn`` to every cache array."""
        return self.replace(keys=tuple(map(fn, self.keys)), values=tuple(map(fn, self.values)))

    def _per_layer(self, fn) -> "KVCache":
        """``fn(x, ring, keys)`` applied to every layer's keys (``keys=True``) and values."""
        return self.replace(keys=tuple(fn(k, self.ring(i), True) for i, k in enumerate(self.keys)),
                            values=tuple(fn(v, self.ring(i), False) for i, v in enumerate(self.values)))

    def grow(self, max_len: int) -> "KVCache":
        """The same cache with room for ``max_len >= self.max_len`` slots (empty ones appended:
        every row's later slots lie after all earlier ones, shared or not; rings stay)."""
        extra = (max_len - self.max_len) * self.group
        if extra < 0:
            raise ValueError(f"grow() cannot shrink a cache of {self.max_len} slots to {max_len}")

        def pad(x, ring, keys):
            axis = x.ndim - (1 if keys else 2)
            return x if ring is not None else jnp.pad(x, [(0, extra if a == axis else 0) for a in range(x.ndim)])

        return self if extra == 0 else self._per_layer(pad).replace(max_len=max_len)

    def repeat(self, n: int) -> "KVCache":
        """Every row repeated ``n`` times, consecutively (a ``group == 1`` cache)."""
        if self.group != 1:
            raise ValueError("repeat() needs a group == 1 cache")
        if n == 1:
            return self
        return self.map_arrays(lambda x: jnp.repeat(x if x.ndim == 4 else x[None], n, axis=0))

    def fill_prompt(self, prompt: "KVCache") -> "KVCache":
        """Writes ``prompt`` (a ``group == 1`` cache with this cache's rows, one per group: what a
        forward pass returns without a cache) into slots ``[0, prompt.max_len)``, which lie among
        the ``shared`` slots when ``group > 1``; a ring receives the prompt's last slots, each
        row of a group its copy."""
        if prompt.group != 1 or prompt.batch != self.batch:
            raise ValueError(f"fill_prompt() needs a group == 1 cache of {self.batch} rows")
        if self.group > 1 and prompt.max_len > self.shared:
            raise ValueError(f"a prompt of {prompt.max_len} slots does not fit in shared={self.shared}")
        length = prompt.max_len

        def fill(i, keys):
            target, source = (self.keys[i], prompt.keys[i]) if keys else (self.values[i], prompt.values[i])
            axis = -1 if keys else -2
            ring = self.ring(i)
            if ring is not None:  # the prompt's last `ring` slots, slot t at index t % ring
                source = jnp.roll(_take_slots(source, max(0, length - ring), min(ring, length), axis), length % ring
                                  if length >= ring else 0, axis)
                source = _spread(source, self.group, axis)
            return jax.lax.dynamic_update_slice_in_dim(target, source, 0, axis=axis)

        return self.replace(keys=tuple(fill(i, True) for i in range(len(self.keys))),
                            values=tuple(fill(i, False) for i in range(len(self.values))))

    def fill_row(self, row, prompt: "KVCache", copies: int = 1) -> "KVCache":
        """Writes ``prompt`` (one row's keys and values, what a forward pass of a single prompt
        returns without a cache) into slots ``[0, prompt.max_len)`` of rows ``[row, row +
        copies)`` (``row``: int32[], may be traced) of this ``group == 1`` cache of several rows
        without rings (continuous batching: a new request takes a finished one's rows)."""
        if self.group != 1 or self.batch < 2 or any(self.rings) or prompt.batch != 1:
            raise ValueError("fill_row() writes one row's prompt into a group == 1 cache of 2+ rows without rings")

        def fill(target, source):
            return jax.lax.dynamic_update_slice(target, jnp.broadcast_to(source, (copies, *source.shape)),
                                                (row, 0, 0, 0))

        return self.replace(keys=tuple(map(fill, self.keys, prompt.keys)),
                            values=tuple(map(fill, self.values, prompt.values)))

    def regroup(self, group: int, shared: int, rings: tuple[int | None, ...] = (), slot=None) -> "KVCache":
        """This ``group == 1`` cache of ``rows = batch * group`` rows in the layout of ``batch``
        groups of ``group`` rows that share their first ``shared`` slots (taken from each group's
        first row); the layers of ``rings`` keep rings holding the slots up to ``slot``."""
        if self.group != 1:
            raise ValueError("regroup() needs a group == 1 cache")

        def relayout(x, ring, keys):  # x: [rows, kvh, ..slots..]
            slot_axis = 3 if keys else 2
            if ring is not None:
                held = slot - jnp.mod(slot - jnp.arange(ring), ring)  # the slot at each ring index
                x = jnp.take(x if x.ndim == 4 else x[None], jnp.maximum(held, 0), axis=slot_axis)
                x = x.reshape(-1, group, *x.shape[1:])
                out = jnp.moveaxis(x, 1, slot_axis + 1)  # [b, kvh, .., ring, group, ..]
                out = out.reshape(*out.shape[:slot_axis], -1, *out.shape[slot_axis + 2:])
                return out[0] if out.shape[0] == 1 else out
            if group == 1:
                return x
            x = x.reshape(-1, group, *x.shape[1:])
            prompt = jax.lax.slice_in_dim(x[:, 0], 0, shared, axis=slot_axis)
            rest = jnp.moveaxis(jax.lax.slice_in_dim(x, shared, x.shape[slot_axis + 1], axis=slot_axis + 1),
                                1, slot_axis + 1)  # [b, kvh, .., slots - shared, group, ..]
            rest = rest.reshape(*rest.shape[:slot_axis], -1, *rest.shape[slot_axis + 2:])
            out = jnp.concatenate([prompt, rest], axis=slot_axis)
            return out[0] if out.shape[0] == 1 else out

        regrouped = KVCache(self.keys, self.values, 1, 0, self.max_len, tuple(rings))
        return regrouped._per_layer(relayout).replace(group=group, shared=shared)


def _take_slots(x, start: int, size: int, axis: int):
    return jax.lax.slice_in_dim(x, start, start + size, axis=axis % x.ndim)


def _spread(x, group: int, axis: int):
    """Slots [..., n, ...] -> [..., n * group, ...] with each slot repeated for every row of a
    group (slot-major), the ring layout of a group whose rows all hold the same slots."""
    return x if group == 1 else jnp.repeat(x, group, axis=axis)


def storage_dtype(dtype):
    """The dtype cache arrays hold: a 16-bit float's bits as uint16 (XLA:CPU updates a bfloat16
    array in a loop by converting all of it to float32 and back at every write)."""
    return jnp.uint16 if jnp.dtype(dtype).itemsize == 2 else dtype


def stored(x: jax.Array) -> jax.Array:
    """``x`` in its cache storage dtype (`storage_dtype`)."""
    return jax.lax.bitcast_convert_type(x, jnp.uint16) if jnp.dtype(x.dtype).itemsize == 2 else x


def loaded(x: jax.Array, dtype) -> jax.Array:
    """Cache storage ``x`` as ``dtype`` again."""
    return jax.lax.bitcast_convert_type(x, dtype) if x.dtype == jnp.uint16 else x


def write(keys: jax.Array, values: jax.Array, k: jax.Array, v: jax.Array, slot, group: int = 1,
          shared: int = 0, ring: int | None = None) -> tuple[jax.Array, jax.Array]:
    """One layer's cache arrays (`KVCache` layout) with ``k, v: dtype[rows, seq, n_kv_heads,
    head_dim]`` written at slots ``[slot, slot + seq)`` of each row: one ``slot`` for all rows
    (int32[]) or, with ``group == 1``, one per row (int32[rows]). A ring takes one slot at a time."""
    kt, vt = stored(to_layout(k, group, keys=True)), stored(to_layout(v, group, keys=False))
    if ring is not None:
        if k.shape[1] != 1:
            raise ValueError(f"a ring of {ring} slots takes one slot at a time, not {k.shape[1]}")
        slot, shared = jnp.mod(slot, ring), 0
    if jnp.ndim(slot) == 0 or values.ndim == 3:
        start = shared + (jnp.reshape(slot, (-1,))[0] - shared) * group
        lead = (0,) * (kt.ndim - 2)
        return (jax.lax.dynamic_update_slice(keys, kt, (*lead, 0, start)),
                jax.lax.dynamic_update_slice(values, vt, (*lead, start, 0)))
    if group != 1:
        raise ValueError("per-row write slots need a group == 1 cache")
    put = jax.vmap(lambda c, x, s, axis: jax.lax.dynamic_update_slice_in_dim(c, x, s, axis), (0, 0, 0, None))
    return put(keys, kt, slot, -1), put(values, vt, slot, -2)


def to_layout(x: jax.Array, group: int, keys: bool) -> jax.Array:
    """[b * g, s, kvh, hd] -> slot-major (``t * g + r``) keys [b, kvh, hd, s * g] or values
    [b, kvh, s * g, hd], without the b dim when ``b == 1``."""
    rows, s, kvh, hd = x.shape
    x = x.reshape(rows // group, group, s, kvh, hd).transpose(0, 3, 2, 1, 4)  # [b, kvh, s, g, hd]
    x = x.reshape(rows // group, kvh, s * group, hd)
    x = x[0] if x.shape[0] == 1 else x
    return jnp.swapaxes(x, -2, -1) if keys else x
