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


def head(c) -> dict:
    """The LM head's entry: ``lm_head`` where the checkpoint has its own, none where it is the
    tied embedding. ``c``: a config with ``tie_word_embeddings``, ``vocab_size``, ``d_model``."""
    return {} if c.tie_word_embeddings else {"lm_head": one("lm_head.weight", c.vocab_size, c.d_model)}


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


def linear(name: str, n_out: int, n_in: int, bias: bool) -> dict:
    """A ``torch.nn.Linear`` named ``name``: ``kernel [n_out, n_in]`` (and ``bias``)."""
    p = {"kernel": one(name + ".weight", n_out, n_in)}
    return {**p, "bias": one(name + ".bias", n_out)} if bias else p


def grouped_attention(pre: str, c, *, qkv_bias: bool, out_bias: bool, fused: bool = False) -> dict:
    """q/k/v and output projections of attention module ``pre`` (``"...self_attn."``) in jaxgen's
    layout (`fused_qkv`), from ``q_proj``, ``k_proj``, ``v_proj`` and ``o_proj``, or a fused
    ``qkv_proj`` (``fused``, Phi-3's). ``c``: a config with the model's head counts and sizes."""
    d, hd, kvh = c.d_model, c.head_dim, c.n_kv_heads
    q_size, kv_size = c.n_heads * hd, kvh * hd
    fuse = fused_qkv(kvh, c.n_heads // kvh, hd)

    def qkv(part):
        rest = (d,) if part == "weight" else ()
        if fused:
            split = split_rows(q_size, kv_size, kv_size)
            return one(pre + "qkv_proj." + part, q_size + 2 * kv_size, *rest, build=lambda x: fuse(*split(x)))
        names = tuple(f"{pre}{p}_proj.{part}" for p in "qkv")
        return Source(names, ((q_size, *rest), (kv_size, *rest), (kv_size, *rest)), fuse)

    qkv_params = {"kernel": qkv("weight"), **({"bias": qkv("bias")} if qkv_bias else {})}
    return {"qkv": qkv_params, "out": linear(pre + "o_proj", d, q_size, out_bias)}


def gated_mlp(pre: str, d: int, inner: int, *, bias: bool = False, fused: bool = False) -> dict:
    """``gate_up [2, inner, d]`` and ``down`` of MLP module ``pre`` (``"...mlp."``), from
    ``gate_proj`` and ``up_proj``, or a fused ``gate_up_proj`` (``fused``, Phi-3's)."""
    if fused:
        gate_up = {"kernel": one(pre + "gate_up_proj.weight", 2 * inner, d, build=lambda x: x.reshape(2, inner, d))}
    else:
        stack = lambda g, u: np.stack([g, u])  # noqa: E731
        gate_up = {"kernel": Source((pre + "gate_proj.weight", pre + "up_proj.weight"), ((inner, d),) * 2, stack)}
        if bias:
            gate_up["bias"] = Source((pre + "gate_proj.bias", pre + "up_proj.bias"), ((inner,),) * 2, stack)
    return {"gate_up": gate_up, "down": linear(pre + "down_proj", d, inner, bias)}
