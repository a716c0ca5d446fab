"""The KV cache: one keys and one values array per layer, in the layout attention reads fastest.

- keys ``dtype[batch, n_kv_heads, head_dim, length]``, stored transposed: a decode step's
  ``q . k`` then reduces over a major axis and vectorises along the slots;
- values ``dtype[batch, n_kv_heads, length, head_dim]``;
- a cache of one batch row (or one group) drops the unit batch dim: XLA:CPU copies a
  loop-carried array with a unit dim every step when a dot reads it.

One array per layer (no stacking), so that a step updates each in place with
``lax.dynamic_update_slice``.

Rows come in groups (``rows = batch * group``, row ``b * group + r``) that may read each other's
slots (beam search). The first ``shared`` slots (the prompt) are stored once per group and read
by all its rows; after them, index ``shared + (t - shared) * group + r`` holds slot ``t`` of row
``r``, so ``length = shared + (max_len - shared) * group``. Beam search keeps each beam's keys in
the row that computed them and tells every beam, per slot, which row holds its history, so
reordering beams never moves the cache. Slot-major order keeps a step's write one contiguous
slice. Greedy search and sampling use ``group == 1``.

Slot ``t`` holds the token of sequence column ``t``. A write goes to one slot for all rows (a
scalar) or, with ``group == 1``, to a slot of each row's own (``int32[rows]``: rows at different
lengths).
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

    @classmethod
    def empty(cls, *, n_layers: int, n_kv_heads: int, head_dim: int, dtype, batch: int, max_len: int,
              group: int = 1, shared: int = 0) -> "KVCache":
        """Zeros for ``batch`` groups of ``group`` rows and ``max_len`` slots, the first ``shared``
        of them stored once per group."""
        if group < 1 or not 0 <= shared <= max_len:
            raise ValueError(f"a cache needs group >= 1 and 0 <= shared <= max_len, got {group=}, {shared=}")
        length = shared + (max_len - shared) * group
        lead = (batch, n_kv_heads) if batch > 1 else (n_kv_heads,)
        keys = tuple(jnp.zeros((*lead, head_dim, length), dtype) for _ in range(n_layers))
        values = tuple(jnp.zeros((*lead, length, head_dim), dtype) for _ in range(n_layers))
        return cls(keys, values, group, shared)

    @property
    def max_len(self) -> int:
        return self.shared + (self.values[0].shape[-2] - self.shared) // self.group

    @property
    def batch(self) -> int:
        """How many rows (groups when ``group > 1``) the cache holds."""
        return self.values[0].shape[0] if self.values[0].ndim == 4 else 1

    def index(self, slot):
        """Where row 0 of a group keeps ``slot >= shared`` (any slot when ``group == 1``)."""
        return self.shared + (slot - self.shared) * self.group

    def map_arrays(self, fn) -> "KVCache":
        """Applies ``fn`` to every cache array."""
        return self.replace(keys=tuple(map(fn, self.keys)), values=tuple(map(fn, self.values)))

    def grow(self, max_len: int) -> "KVCache":
        """The same cache with room for ``max_len >= self.max_len`` slots (empty ones appended:
        every row's later slots lie after all earlier ones, shared or not)."""
        extra = (max_len - self.max_len) * self.group
        if extra < 0:
            raise ValueError(f"grow() cannot shrink a cache of {self.max_len} slots to {max_len}")
        if extra == 0:
            return self

        def pad(x, axis):
            return jnp.pad(x, [(0, extra if a == axis else 0) for a in range(x.ndim)])

        return self.replace(keys=tuple(pad(k, k.ndim - 1) for k in self.keys),
                            values=tuple(pad(v, v.ndim - 2) for v in self.values))

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
        the ``shared`` slots when ``group > 1``."""
        if prompt.group != 1 or prompt.batch != self.batch:
            raise ValueError(f"fill_prompt() needs a group == 1 cache of {self.batch} rows")
        if self.group > 1 and prompt.max_len > self.shared:
            raise ValueError(f"a prompt of {prompt.max_len} slots does not fit in shared={self.shared}")
        keys = tuple(jax.lax.dynamic_update_slice_in_dim(c, p, 0, axis=-1) for c, p in zip(self.keys, prompt.keys))
        values = tuple(jax.lax.dynamic_update_slice_in_dim(c, p, 0, axis=-2)
                       for c, p in zip(self.values, prompt.values))
        return self.replace(keys=keys, values=values)

    def regroup(self, group: int, shared: int) -> "KVCache":
        """This ``group == 1`` cache of ``rows = batch * group`` rows in the layout of ``batch``
        groups of ``group`` rows that share their first ``shared`` slots (taken from each group's
        first row)."""
        if self.group != 1:
            raise ValueError("regroup() needs a group == 1 cache")
        if group == 1:
            return self

        def relayout(x, slot_axis):  # x: [rows, kvh, ..slots..]
            x = x.reshape(-1, group, *x.shape[1:])
            prompt = jax.lax.slice_in_dim(x[:, 0], 0, shared, axis=slot_axis)
            rest = jnp.moveaxis(jax.lax.slice_in_dim(x, shared, x.shape[slot_axis + 1], axis=slot_axis + 1),
                                1, slot_axis + 1)  # [b, kvh, .., slots - shared, group, ..]
            rest = rest.reshape(*rest.shape[:slot_axis], -1, *rest.shape[slot_axis + 2:])
            out = jnp.concatenate([prompt, rest], axis=slot_axis)
            return out[0] if out.shape[0] == 1 else out

        return KVCache(tuple(relayout(k, 3) for k in self.keys), tuple(relayout(v, 2) for v in self.values),
                       group, shared)


def write(keys: jax.Array, values: jax.Array, k: jax.Array, v: jax.Array, slot, group: int = 1,
          shared: int = 0) -> tuple[jax.Array, jax.Array]:
    """One layer's cache arrays (`KVCache` layout) with ``k, v: dtype[rows, seq, n_kv_heads,
    head_dim]`` written at slots ``[slot, slot + seq)`` of each row: one ``slot`` for all rows
    (int32[]) or, with ``group == 1``, one per row (int32[rows])."""
    kt, vt = to_layout(k, group, keys=True), to_layout(v, group, keys=False)
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
