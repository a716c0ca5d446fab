"""GPT-2 in JAX: embeddings, pre-norm blocks, final norm, tied LM head, explicit KV cache.

The whole network is a handful of pure functions over a params pytree::

    params = {
        "wte": [vocab, d], "wpe": [n_positions, d],
        "h": [ {"ln_1": {"scale", "bias"}, "attn": {"c_attn": {"kernel": [3, d, d], "bias": [3, d]},
                                                     "c_proj": {"kernel": [d, d], "bias"}},
                "ln_2": {...}, "mlp": {"c_fc": {"kernel": [inner, d], ...},
                                       "c_proj": {"kernel": [d, inner], ...}}} ] * n_layer,
        "ln_f": {"scale", "bias"},
        "lm_head": [vocab, d]          # only when the checkpoint does not tie it to wte
    }

Kernels are stored ``[out, in]`` (``torch.nn.Linear``'s layout; Hugging Face's GPT-2 Conv1D
weights ``[in, out]`` are transposed on load), the fused q/k/v projection ``[3, out, in]`` so that
a sharding can split it by heads (`jaxgen.shard`), and the LM head is ``wte`` itself
(``[vocab, d]``). `_project` explains why: with the weight as the left, many-row operand,
XLA:CPU's GEMM runs a decode step's matmuls 20-40% faster at 2-32 rows. The model object `GPT2` is a
``flax.struct`` dataclass: params are pytree leaves, the config is static, so a model can be
passed through ``jax.jit``, ``device_put`` with a sharding or ``jax.tree.map``.

Numerics follow ``transformers.GPT2LMHeadModel``: LayerNorm and softmax run in float32 whatever
the params dtype, matmuls accumulate in float32 and add their bias before rounding to it, masked
attention scores take float32's minimum (not -inf), and logits are returned in float32.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from flax.core import FrozenDict

ACTIVATIONS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """The GPT2Config fields that change numbers, plus the compute dtype. Hashable (static)."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 50256
    eos_token_id: int | None = 50256
    dtype: str = "float32"

    @property
    def inner_dim(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def attention_scale(self, layer_idx: int) -> float:
        """The factor applied to ``q @ k^T`` in layer ``layer_idx`` (as GPT2Attention.scaling)."""
        scale = self.head_dim**-0.5 if self.scale_attn_weights else 1.0
        if self.scale_attn_by_inverse_layer_idx:
            scale /= float(layer_idx + 1)
        return scale


@struct.dataclass
class KVCache:
    """Keys and values of every layer, one array each per layer (no stacking, so that a step
    updates each in place with ``lax.dynamic_update_slice``):

    - keys ``dtype[batch, n_head, head_dim, length]``, stored transposed: a decode step's
      ``q . k`` then reduces over a major axis and vectorises along the slots;
    - values ``dtype[batch, n_head, length, head_dim]``;
    - a cache of one batch row (or one group) drops the unit batch dim: keys
      ``dtype[n_head, head_dim, length]``, values ``dtype[n_head, length, head_dim]``. XLA:CPU
      copies a loop-carried array that has a unit dim every step when a dot reads it (four
      copies per array, 3 ms of a 22-24 ms greedy batch-1 step of GPT-2 124M on 2 CPU cores).

    Rows come in groups (``rows = batch * group``, row ``b * group + r``) that may read each
    other's slots. The first ``shared`` slots (the prompt) are stored once per group and read by
    all its rows; after them, index ``shared + (t - shared) * group + r`` holds slot ``t`` of row
    ``r``, so ``length = shared + (max_len - shared) * group``. Beam search keeps each beam's keys
    in the row that computed them and tells every beam, per slot, which row holds its history
    (`forward`'s ``kv_mask``), so reordering beams never moves the cache (a gather plus a copy of
    the whole cache per step, the largest cost of a beam step at batch 8 before), and the prompt
    is neither copied per beam nor read once per beam. Slot-major order keeps a step's write one
    contiguous slice and the attention one contraction over ``length`` keys. Greedy search and
    sampling use ``group == 1``.
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    group: int = struct.field(pytree_node=False, default=1)
    shared: int = struct.field(pytree_node=False, default=0)

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
        return KVCache(tuple(map(fn, self.keys)), tuple(map(fn, self.values)), self.group, self.shared)

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
        """Writes ``prompt`` (a ``group == 1`` cache with this cache's rows, one per group: what
        `forward` returns without a cache) into slots ``[0, prompt.max_len)``, which lie among
        the ``shared`` slots when ``group > 1``."""
        if prompt.group != 1 or prompt.batch != self.batch:
            raise ValueError(f"fill_prompt() needs a group == 1 cache of {self.batch} rows")
        if self.group > 1 and prompt.max_len > self.shared:
            raise ValueError(f"a prompt of {prompt.max_len} slots does not fit in shared={self.shared}")
        keys = tuple(jax.lax.dynamic_update_slice_in_dim(c, p, 0, axis=-1) for c, p in zip(self.keys, prompt.keys))
        values = tuple(jax.lax.dynamic_update_slice_in_dim(c, p, 0, axis=-2)
                       for c, p in zip(self.values, prompt.values))
        return self.replace(keys=keys, values=values)


@struct.dataclass
class GPT2:
    """A GPT-2 language model: ``params`` (pytree leaves), ``config`` and ``generation_config``
    (static): the checkpoint's generation settings, which a call uses where it passes none, as
    transformers' ``model.generation_config`` (see `jaxgen.generation_config`)."""

    params: Any
    config: GPT2Config = struct.field(pytree_node=False)
    generation_config: FrozenDict = struct.field(pytree_node=False, default=FrozenDict())

    @property
    def dtype(self):
        return DTYPES[self.config.dtype]

    def __call__(self, input_ids, attention_mask=None, position_ids=None) -> jax.Array:
        """Full forward without cache: float32 logits ``[batch, seq, vocab]``.

        ``input_ids``: int[batch, seq]; ``attention_mask``: {0,1}[batch, seq] (default all ones);
        ``position_ids``: int[batch, seq], derived from the mask as generation does when omitted
        (``cumsum(mask) - 1``), so a left-padded batch gives the logits generation sees.
        """
        input_ids = jnp.asarray(input_ids)
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        attention_mask = jnp.asarray(attention_mask)
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask)
        return _jitted_logits(self, input_ids, attention_mask, jnp.asarray(position_ids))

    def init_cache(self, batch_size: int, max_len: int, group: int = 1, shared: int = 0) -> KVCache:
        """An empty cache of ``max_len`` slots for ``batch_size`` groups of ``group`` rows that
        store their first ``shared`` slots once per group (see `KVCache`)."""
        if group < 1 or not 0 <= shared <= max_len:
            raise ValueError(f"init_cache needs group >= 1 and 0 <= shared <= max_len, got {group=}, {shared=}")
        c = self.config
        length = shared + (max_len - shared) * group
        lead = (batch_size, c.n_head) if batch_size > 1 else (c.n_head,)  # see KVCache
        keys = tuple(jnp.zeros((*lead, c.head_dim, length), self.dtype) for _ in range(c.n_layer))
        values = tuple(jnp.zeros((*lead, length, c.head_dim), self.dtype) for _ in range(c.n_layer))
        return KVCache(keys, values, group, shared)


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Position ids of a left-padded batch (holes too): ``cumsum(mask) - 1``, padded slots set to 0.

    As ``GenerationMixin._prepare_position_ids_for_generation`` in transformers 5.x. The value at
    padded slots never reaches a real token (padded keys are masked out).
    """
    mask = attention_mask.astype(jnp.int32)
    return jnp.where(mask == 0, 0, jnp.cumsum(mask, axis=-1) - 1)


def _layer_norm(p, x, eps):
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)).astype(x.dtype)


def _linear(p, x, row_shards: int = 1):
    """``x @ kernel^T + bias``: x: dtype[..., in], kernel: [*out, in] -> dtype[..., *out]. The
    product and the bias are summed in float32 and rounded once (as ``torch.addmm`` in
    transformers' Conv1D)."""
    return (_project(x, p["kernel"], row_shards) + p["bias"].astype(jnp.float32)).astype(x.dtype)


def _project(x: jax.Array, w: jax.Array, row_shards: int = 1) -> jax.Array:
    """x: [..., in], w: [*out, in] -> float32[..., *out], accumulated in float32. ``row_shards``:
    into how many equal blocks of consecutive rows a mesh splits ``x`` (see `forward`).

    On CPU the product is computed as ``w @ x^T`` (output ``[*out, rows]``) and transposed after
    an optimization barrier: XLA:CPU's GEMM tiles the output's first axis, so a decode
    step's 2-32 rows in that place leave most of each tile empty, and the weight in it runs at
    full width (GPT-2 124M, 8 rows: LM head 12 -> 7 ms, blocks 21 -> 16 ms on 2 cores; the
    barrier stops XLA from folding the transpose back into the dot). Elsewhere, a plain dot.

    bfloat16 on CPU: XLA:CPU runs a bfloat16 product on its bfloat16 GEMM only when the product
    returns float32 and has two rows or more; any other one converts the weight to float32 first,
    and in a decode loop keeps a float32 copy of every weight for the whole call. Hence the
    float32 result (callers round it), and a single row padded to two and multiplied row-major,
    the faster order there, by the weight as a matrix (a 3-D one it would transpose into a copy).
    GPT-2 124M, greedy batch 1, Zen 5: 14.8 -> 12.5 ms a step (float32: 13), peak memory of a
    call 483 -> 161 MB.

    The rows are the GEMM's vector lanes there, and a count that leaves part of a lane tile
    empty makes it run extra passes over the weight: 5-7 rows cost more than 8, 28 rows 1.4
    times 32. So the product on CPU takes its rows zero-padded (`_gemm_rows`) and drops
    the extra ones; each of the ``row_shards`` blocks its own, so that no row moves between
    devices (padded as one, 24 rows on 8 devices took a collective-permute per product).
    """
    rows = x.reshape(-1, x.shape[-1])

    def row_major(rows, w):
        return jax.lax.dot_general(rows, w, (((1,), (w.ndim - 1,)), ((), ())), preferred_element_type=jnp.float32)

    def cpu(rows, w):
        if rows.shape[0] == 1 and w.dtype == jnp.bfloat16:
            two_rows = jnp.pad(rows, ((0, 1), (0, 0)))
            return row_major(two_rows, w.reshape(-1, w.shape[-1]))[:1].reshape(1, *w.shape[:-1])
        n = rows.shape[0] // row_shards  # rows of one block
        lanes = _gemm_rows(n)
        rows = jnp.pad(rows.reshape(row_shards, n, -1), ((0, 0), (0, lanes - n), (0, 0)))
        rows = rows.reshape(row_shards * lanes, -1)
        y = jax.lax.dot_general(w, rows, (((w.ndim - 1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        y = jnp.moveaxis(jax.lax.optimization_barrier(y), -1, 0).reshape(row_shards, lanes, *w.shape[:-1])
        return y[:, :n].reshape(row_shards * n, *w.shape[:-1])

    y = jax.lax.platform_dependent(rows, w, cpu=cpu, default=row_major)
    return y.reshape(*x.shape[:-1], *w.shape[:-1])


def _gemm_rows(n: int) -> int:
    """How many rows XLA:CPU's GEMM gets for ``n`` rows of a weight-major `_project`: 5-8 -> 8,
    9-64 -> a multiple of 16; up to 4 rows (a kernel of their own) and above 64 (compute-bound,
    where padding costs in proportion) as they are.

    GPT-2 124M on 2 Zen 5 cores, ms a greedy step, padded against unpadded (both compiled in one
    process, timed in turns): batch 6 23.3 -> 21.9, 14 34.6 -> 29.3, 28 56.3 -> 42.6, 56 94.5
    -> 77.1; beam 5 at batch 1 21.2 -> 19.8; bfloat16 batch 5 25.0 -> 20.2. 17-24 and 40-48
    rows come out about even, 33-39 5% slower (not worth a rule of their own), 65-72 10% slower
    (hence the limit). Lane tiles belong to the GEMM library and the CPU's vector width, so
    these are one machine's numbers; multiples of 16 are whole AVX-512 and AVX2 vectors alike.
    """
    if n <= 4 or n > 64:
        return n
    step = 8 if n <= 8 else 16
    return -(-n // step) * step


def _attention(config, layer_idx, q, kt, v, mask):
    """Attention of a chunk's queries over their group's keys.

    q: [b, g, s, h, hd] (``g`` rows per group); kt: [b, h, hd, kv] (keys, transposed);
    v: [b, h, kv, hd]; mask: bool[b, g, s, kv] -> [b * g, s, h * hd]. With ``b == 1``, kt and v
    come without their batch dim (`KVCache`'s layout) and the products are taken without it.
    """
    b, g, s, h, hd = q.shape
    q, mask = q.transpose(0, 3, 1, 2, 4).reshape(b, h, g * s, hd), mask.reshape(b, 1, g * s, -1)
    if kt.ndim == 3:
        q, mask = q[0], mask[0]
    scale = config.attention_scale(layer_idx)
    if config.reorder_and_upcast_attn:  # scale before the matmul, in float32
        q, kt, scale = q.astype(jnp.float32) * scale, kt.astype(jnp.float32), 1.0
    if g > 1 and s == 1:  # a beam step: [beams, hd] x [hd, kv] per head, which XLA:CPU runs
        # 1.5x faster as a broadcast multiply and a sum than as many tiny matmuls
        scores = (q[..., None].astype(jnp.float32) * kt[..., None, :, :].astype(jnp.float32)).sum(-2)
    else:
        scores = jnp.einsum("...mk,...kn->...mn", q, kt, preferred_element_type=jnp.float32)
    scores = scores * scale
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("...mk,...kn->...mn", weights, v, preferred_element_type=jnp.float32).astype(v.dtype)
    return out.reshape(b, h, g, s, hd).transpose(0, 2, 3, 1, 4).reshape(b * g, s, h * hd)


def _grouped_heads(x, n_head, group):
    """[b * g, s, d] -> [b, g, s, h, d / h]."""
    rows, s, d = x.shape
    return x.reshape(rows // group, group, s, n_head, d // n_head)


def _cache_layout(x, n_head, group, keys: bool):
    """[b * g, s, d] -> slot-major (``t * g + r``) keys [b, h, d / h, s * g] or values [b, h, s * g, d / h],
    without the b dim when ``b == 1`` (see `KVCache`)."""
    x = _grouped_heads(x, n_head, group).transpose(0, 3, 2, 1, 4)  # [b, h, s, g, hd]
    x = x.reshape(*x.shape[:2], -1, x.shape[-1])
    x = x[0] if x.shape[0] == 1 else x
    return jnp.swapaxes(x, -2, -1) if keys else x


def forward(
    model: GPT2,
    input_ids: jax.Array,
    position_ids: jax.Array,
    kv_mask: jax.Array,
    cache: KVCache | None = None,
    cache_index: jax.Array | int = 0,
    row_shards: int = 1,
) -> tuple[jax.Array, KVCache]:
    """Runs the blocks over a chunk of tokens; returns the final hidden states and the cache.

    Args:
      input_ids: int[rows, seq], the chunk; ``rows = batch * cache.group`` (``batch`` without a
        cache).
      position_ids: int[rows, seq].
      kv_mask: which key slots each row may read (the causal mask is added here):
        bool[rows, kv_len, group]: row ``b * group + g`` reads slot ``t`` of row
        ``b * group + r`` where ``kv_mask[b * group + g, t, r]`` (beam search: a beam's history
        lies in the rows where its ancestors computed it); with ``group == 1`` also
        bool[rows, kv_len]. ``kv_len`` is ``seq`` without a cache, ``cache.max_len`` with one
        (a longer mask is cut to it, so a cache that grows can keep one mask for all lengths). A
        slot shared by the group (``t < cache.shared``) is read where any ``r`` is set.
      cache: if given, the chunk's keys/values are written at slots
        ``[cache_index, cache_index + seq)`` of each row's own cache row (at or after
        ``cache.shared`` when ``group > 1``), then read as above.
      cache_index: int scalar (may be traced), first slot of the chunk.
      row_shards: static; the number of devices a mesh splits the rows over (its data axis), so
        that the weight products pad each device's rows on their own (`_project`).

    Returns:
      hidden: dtype[rows, seq, n_embd] after the final LayerNorm; the updated cache, or without
      one the chunk's own keys and values as a ``seq``-slot cache (`KVCache.fill_prompt` writes
      a prompt's into a longer one).
    """
    c, p = model.config, model.params
    dtype = model.dtype
    seq = input_ids.shape[1]
    x = (p["wte"][input_ids] + p["wpe"][position_ids]).astype(dtype)  # [rows, seq, d]

    group = 1 if cache is None else cache.group
    kv_len = seq if cache is None else cache.max_len
    kv_mask = kv_mask[:, :kv_len]
    if kv_mask.ndim == 2:
        if group != 1:
            raise ValueError(f"a cache with group={group} needs kv_mask: bool[rows, kv_len, group]")
        kv_mask = kv_mask[:, :, None]
    query_slot = cache_index + jnp.arange(seq)
    causal = jnp.arange(kv_len)[None, :] <= query_slot[:, None]  # [seq, kv_len]
    mask = kv_mask.astype(bool).reshape(-1, group, 1, kv_len, group) & causal[:, :, None]  # [batch, g, seq, kv_len, r]
    shared = 0 if cache is None else cache.shared  # a row reads a shared slot if any r is set
    mask = jnp.concatenate([mask[..., :shared, :].any(-1), mask[..., shared:, :].reshape(*mask.shape[:3], -1)], -1)

    new_keys, new_values = [], []
    for i, block in enumerate(p["h"]):
        h = _layer_norm(block["ln_1"], x, c.layer_norm_epsilon)
        qkv = _linear(block["attn"]["c_attn"], h, row_shards)  # [rows, s, 3, d]
        q = _grouped_heads(qkv[:, :, 0], c.n_head, group)
        k, v = (_cache_layout(qkv[:, :, j].astype(dtype), c.n_head, group, keys=j == 1) for j in (1, 2))
        if cache is not None:
            slot, lead = cache.index(cache_index), (0,) * (k.ndim - 2)
            k = jax.lax.dynamic_update_slice(cache.keys[i], k, (*lead, 0, slot))
            v = jax.lax.dynamic_update_slice(cache.values[i], v, (*lead, slot, 0))
        new_keys.append(k)
        new_values.append(v)
        x = x + _linear(block["attn"]["c_proj"], _attention(c, i, q, k, v, mask), row_shards)
        h = _layer_norm(block["ln_2"], x, c.layer_norm_epsilon)
        act = ACTIVATIONS[c.activation_function]
        x = x + _linear(block["mlp"]["c_proj"], act(_linear(block["mlp"]["c_fc"], h, row_shards)), row_shards)
    x = _layer_norm(p["ln_f"], x, c.layer_norm_epsilon)
    new_cache = KVCache(tuple(new_keys), tuple(new_values)) if cache is None else cache.replace(
        keys=tuple(new_keys), values=tuple(new_values))
    return x, new_cache


def lm_head(model: GPT2, hidden: jax.Array, row_shards: int = 1) -> jax.Array:
    """dtype[..., n_embd] -> float32 logits [..., vocab] (tied to ``wte`` unless untied);
    ``row_shards`` as in `forward`."""
    return _project(hidden, model.params.get("lm_head", model.params["wte"]), row_shards)


@jax.jit
def _jitted_logits(model, input_ids, attention_mask, position_ids):
    hidden, _ = forward(model, input_ids, position_ids, attention_mask)
    return lm_head(model, hidden)


def expected_shapes(config: GPT2Config) -> dict[str, tuple[int, ...]]:
    """Flat ``{"h.0.attn.c_attn.kernel": shape, ...}``: every parameter ``config`` implies, in the
    shapes of a Hugging Face checkpoint (``unflatten_params`` then reshapes the fused q/k/v)."""
    d, inner, v = config.n_embd, config.inner_dim, config.vocab_size
    shapes = {"wte": (v, d), "wpe": (config.n_positions, d), "ln_f.scale": (d,), "ln_f.bias": (d,)}
    for i in range(config.n_layer):
        for name, shape in {
            "ln_1.scale": (d,), "ln_1.bias": (d,), "ln_2.scale": (d,), "ln_2.bias": (d,),
            "attn.c_attn.kernel": (d, 3 * d), "attn.c_attn.bias": (3 * d,),
            "attn.c_proj.kernel": (d, d), "attn.c_proj.bias": (d,),
            "mlp.c_fc.kernel": (d, inner), "mlp.c_fc.bias": (inner,),
            "mlp.c_proj.kernel": (inner, d), "mlp.c_proj.bias": (d,),
        }.items():
            shapes[f"h.{i}.{name}"] = shape
    if not config.tie_word_embeddings:
        shapes["lm_head"] = (v, d)
    return shapes


def unflatten_params(flat: dict[str, Any], n_layer: int) -> dict[str, Any]:
    """``{"h.0.attn.c_attn.kernel": x, ...}`` (checkpoint shapes) -> the nested params pytree:
    Conv1D kernels ``[in, out]`` become ``[out, in]``, the fused q/k/v ``[3, d, in]``."""
    params: dict[str, Any] = {"h": [{} for _ in range(n_layer)]}
    for key, value in flat.items():
        if key.endswith("attn.c_attn.kernel"):
            value = value.T.reshape(3, -1, value.shape[0])
        elif key.endswith("kernel"):
            value = value.T
        elif key.endswith("attn.c_attn.bias"):
            value = value.reshape(3, -1)
        parts = key.split(".")
        node = params["h"][int(parts[1])] if parts[0] == "h" else params
        for part in (parts[2:-1] if parts[0] == "h" else parts[:-1]):
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return params


def flatten_params(params: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `unflatten_params`: the nested pytree -> checkpoint names and shapes."""
    flat: dict[str, Any] = {}
    for key, value in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in key)
        if name.endswith("attn.c_attn.kernel"):
            value = value.reshape(-1, value.shape[-1]).T
        elif name.endswith("kernel"):
            value = value.T
        elif name.endswith("attn.c_attn.bias"):
            value = value.reshape(-1)
        flat[name] = value
    return flat
