"""What every family's config tells the shared code: sizes, windows, special tokens, dtype."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class CheckpointError(ValueError):
    """A checkpoint that cannot be found, read, or mapped onto a jaxgen model family."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The fields the decoders, the cache and the loader read; a family subclasses it with its own.

    Hashable (a static part of every compiled program). ``layer_windows[i]`` is layer ``i``'s
    sliding window (a query sees itself and ``window - 1`` earlier slots), None for full
    attention. ``position_limit``: the longest sequence the model can encode (learned position
    embeddings), None where positions are rotary and unbounded. ``max_position_embeddings``
    caps transformers' default length (20 new tokens) as it does there. ``recompute_at``: the
    sequence length at which transformers drops the cache and runs the whole sequence again
    (Phi-3, whose longrope factors change there), None for models that never do.
    ``unsupported_token_ids``: ids that stand for inputs jaxgen does not run (the image tokens of
    a multimodal checkpoint, whose language model it runs).
    """

    model_type: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    max_position_embeddings: int | None
    position_limit: int | None = None
    layer_windows: tuple[int | None, ...] = ()
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    recompute_at: int | None = None
    unsupported_token_ids: tuple[int, ...] = ()
    dtype: str = "float32"

    @property
    def kv_bytes_per_slot(self) -> int:
        """Bytes of keys and values one cache slot of one row holds, over all layers."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * jnp.dtype(DTYPES[self.dtype]).itemsize

    @property
    def windows(self) -> tuple[int | None, ...]:
        """Every distinct window of the layers (None: full attention)."""
        return tuple(sorted(set(self.layer_windows or (None,)), key=lambda w: (w is not None, w or 0)))

    def window(self, layer: int) -> int | None:
        return self.layer_windows[layer] if self.layer_windows else None


def token_ids(value) -> tuple[int, ...]:
    """A config's ``eos_token_id`` (an int, a list of ints, or None) as a tuple, kept whole."""
    if value is None:
        return ()
    return (int(value),) if isinstance(value, int) else tuple(int(v) for v in value)
