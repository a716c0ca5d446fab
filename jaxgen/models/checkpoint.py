"""How a family's params come from a Hugging Face checkpoint: a table of `Source` entries."""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np


def _only(x: np.ndarray) -> np.ndarray:
    return x


@dataclasses.dataclass(frozen=True)
class Source:
    """One param leaf, built from checkpoint tensors ``names`` (each of the shape in ``shapes``,
    as transformers stores it) by ``build`` (numpy arrays -> the leaf in jaxgen's layout)."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    build: Callable[..., np.ndarray] = _only


def one(name: str, *shape: int, build: Callable[[np.ndarray], np.ndarray] = _only) -> Source:
    return Source((name,), (tuple(shape),), build)


def fused_qkv(n_kv_heads: int, heads_per_kv: int, head_dim: int) -> Callable[..., np.ndarray]:
    """q ``[n_heads * hd, ...]``, k and v ``[n_kv_heads * hd, ...]`` (weights or biases) -> one
    ``[n_kv_heads, heads_per_kv + 2, hd, ...]``: each kv head's query heads, then its key and its
    value, so that splitting the first axis splits attention by kv heads (`jaxgen.shard`)."""

    def build(q, k, v):
        rest = q.shape[1:]
        q = q.reshape(n_kv_heads, heads_per_kv, head_dim, *rest)
        k, v = (x.reshape(n_kv_heads, 1, head_dim, *rest) for x in (k, v))
        return np.concatenate([q, k, v], axis=1)

    return build


def split_rows(*sizes: int) -> Callable[[np.ndarray], list[np.ndarray]]:
    """An array's first axis cut into consecutive parts of ``sizes`` (a fused checkpoint tensor)."""
    return lambda x: np.split(x, np.cumsum(sizes)[:-1], axis=0)
