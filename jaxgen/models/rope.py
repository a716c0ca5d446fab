"""Rotary position embeddings, every ``rope_type`` of transformers 5.x's ``modeling_rope_utils``.

`Rope` is the static description of one rotary embedding; `from_parameters` builds it from a
transformers config's standardised ``rope_parameters``. The inverse frequencies of ``default``,
``linear``, ``llama3`` and ``yarn`` are constants, computed once in float32 as transformers
does. Two types depend on the sequence: ``dynamic`` (NTK) recomputes its base from the largest
position of the batch at each forward pass (never below ``max_position_embeddings``), and
``longrope`` switches from its short to its long factors once that length exceeds
``original_max_position_embeddings``. Keys already in the cache keep the rotation they were
written with, as in transformers.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.models.config import CheckpointError

TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")


@dataclasses.dataclass(frozen=True)
class Rope:
    """A rotary embedding (hashable: part of the compiled program).

    ``dim``: how many leading dims of each head rotate (``head_dim * partial_rotary_factor``);
    ``inv_freq``: float32[dim / 2] as a tuple; ``scaling``: the factor on cos and sin.
    ``dynamic``: (theta, factor, max_position_embeddings) for NTK scaling; ``long_inv_freq`` and
    ``original_max``: longrope's long factors and the length beyond which they apply.
    """

    dim: int
    inv_freq: tuple[float, ...]
    scaling: float = 1.0
    dynamic: tuple[float, float, int] | None = None
    long_inv_freq: tuple[float, ...] | None = None
    original_max: int | None = None

    def frequencies(self, positions: jax.Array) -> jax.Array:
        """float32[dim / 2]: the inverse frequencies a forward pass over ``positions`` uses."""
        inv_freq = jnp.asarray(self.inv_freq, jnp.float32)
        seq_len = jnp.max(positions) + 1
        if self.dynamic is not None:
            theta, factor, max_pos = self.dynamic
            length = seq_len.astype(jnp.float32)
            base = theta * ((factor * length / max_pos) - (factor - 1)) ** (self.dim / (self.dim - 2))
            scaled = 1.0 / base ** (jnp.arange(0, self.dim, 2, dtype=jnp.float32) / self.dim)
            inv_freq = jnp.where(seq_len > max_pos, scaled, inv_freq)
        if self.long_inv_freq is not None:
            inv_freq = jnp.where(seq_len > self.original_max, jnp.asarray(self.long_inv_freq, jnp.float32), inv_freq)
        return inv_freq

    def tables(self, positions: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
        """cos, sin: dtype[rows, seq, dim] for ``positions: int[rows, seq]`` (float32, scaled, then
        rounded to the model dtype, as transformers' rotary embedding returns them)."""
        freqs = positions[..., None].astype(jnp.float32) * self.frequencies(positions)
        emb = jnp.concatenate([freqs, freqs], axis=-1)
        return (jnp.cos(emb) * self.scaling).astype(dtype), (jnp.sin(emb) * self.scaling).astype(dtype)


def apply(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates the first ``dim`` dims of every head: x [rows, seq, heads, head_dim], cos / sin
    [rows, seq, dim] (``rotate_half`` convention); the rest pass through."""
    dim = cos.shape[-1]
    cos, sin = cos[:, :, None], sin[:, :, None]
    rot, rest = x[..., :dim], x[..., dim:]
    half = dim // 2
    rotated = jnp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
    out = rot * cos + rotated * sin
    return out if rest.shape[-1] == 0 else jnp.concatenate([out, rest], axis=-1)


def _exponents(dim: int) -> np.ndarray:
    return np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)


def _default(theta: float, dim: int) -> np.ndarray:
    return np.float32(1.0) / (np.float32(theta) ** _exponents(dim))


def from_parameters(params: dict, *, head_dim: int, max_position_embeddings: int, partial: bool) -> Rope:
    """A `Rope` from a standardised transformers ``rope_parameters`` dict.

    ``partial``: whether the family honours ``partial_rotary_factor`` in every rope type (Phi-3
    does; Llama's default rope ignores it, as jaxgen then does, and its other types would not fit
    its heads).
    Raises CheckpointError for a type or setting jaxgen does not implement.
    """
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in TYPES:
        raise CheckpointError(f"config.json sets rope_type={kind!r}; jaxgen implements {', '.join(TYPES)}")
    theta = float(params["rope_theta"])
    factor_of_dim = float(params.get("partial_rotary_factor", 1.0))
    if kind == "default" and not partial:
        factor_of_dim = 1.0
    if factor_of_dim != 1.0 and not partial:
        raise CheckpointError(f"config.json sets partial_rotary_factor={factor_of_dim}, which this model family's "
                              "rotary embedding does not apply in transformers; jaxgen does not run it either")
    dim = int(head_dim * factor_of_dim)
    if kind == "default":
        return Rope(dim, tuple(_default(theta, dim).tolist()))
    if kind == "linear":
        return Rope(dim, tuple((_default(theta, dim) / np.float32(params["factor"])).tolist()))
    if kind == "dynamic":
        return Rope(dim, tuple(_default(theta, dim).tolist()),
                    dynamic=(theta, float(params["factor"]), int(max_position_embeddings)))
    if kind == "llama3":
        return Rope(dim, tuple(_llama3(_default(theta, dim), params).tolist()))
    if kind == "yarn":
        inv_freq, scaling = _yarn(theta, dim, params, max_position_embeddings)
        return Rope(dim, tuple(inv_freq.tolist()), float(scaling))
    return _longrope(theta, dim, params, max_position_embeddings)


def _llama3(inv_freq: np.ndarray, p: dict) -> np.ndarray:
    factor, low, high = float(p["factor"]), float(p["low_freq_factor"]), float(p["high_freq_factor"])
    old = float(p["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old / low, old / high
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / np.float32(factor), inv_freq)
    smooth = (np.float32(old) / wavelen - np.float32(low)) / np.float32(high - low)
    smoothed = (1 - smooth) * scaled / np.float32(factor) + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _yarn(theta: float, dim: int, p: dict, max_position_embeddings: int) -> tuple[np.ndarray, float]:
    original = p["original_max_position_embeddings"]
    factor = p.get("factor") or max_position_embeddings / original
    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = p.get("mscale"), p.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations):
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    pos_freqs = np.float32(theta) ** _exponents(dim)
    extrapolation, interpolation = np.float32(1.0) / pos_freqs, np.float32(1.0) / (np.float32(factor) * pos_freqs)
    keep = np.float32(1) - ramp
    return (interpolation * (1 - keep) + extrapolation * keep).astype(np.float32), float(attention_factor)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _longrope(theta: float, dim: int, p: dict, max_position_embeddings: int) -> Rope:
    original = int(p["original_max_position_embeddings"])
    factor = p.get("factor") or max_position_embeddings / original
    scaling = p.get("attention_factor")
    if scaling is None:
        scaling = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    shape = np.float32(theta) ** _exponents(dim)

    def inv_freq(factors):
        if len(factors) != dim // 2:
            raise CheckpointError(f"config.json's longrope factors have {len(factors)} entries; the rotary "
                                  f"dimension {dim} needs {dim // 2}")
        return tuple((np.float32(1.0) / (np.asarray(factors, np.float32) * shape)).tolist())

    return Rope(dim, inv_freq(p["short_factor"]), float(scaling), long_inv_freq=inv_freq(p["long_factor"]),
                original_max=original)
