"""The layers families share: norms, linear maps, MLPs, the LM head. Pure functions over params
dicts; activations in the model dtype, statistics and products accumulated in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxgen.kernels.matmul import project
from jaxgen.quantization import Int8Weight

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


def embed(table: jax.Array, tokens: jax.Array) -> jax.Array:
    """``table[tokens]``. A 16-bit table is tied to ``tokens`` by an optimization barrier: in a
    decode loop XLA:CPU otherwise hoists the conversion its gather needs out of the loop and keeps
    a float32 copy of the whole table for the loop's length (154 MB for GPT-2's bfloat16
    embedding); tied to the step's tokens, the gather converts the rows it reads only, and takes
    half the time. An int8 table dequantises the gathered rows only."""
    if isinstance(table, Int8Weight):
        return table.rows(tokens)
    if jnp.dtype(table.dtype).itemsize == 2:
        table, tokens = jax.lax.optimization_barrier((table, tokens))
    return table[tokens]


def layer_norm(p, x, eps: float):
    """LayerNorm with ``scale`` and ``bias``, its statistics in float32 (``torch.nn.LayerNorm``)."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)).astype(x.dtype)


def rms_norm(p, x, eps: float):
    """RMSNorm as Llama's: normalised in float32, rounded to the input dtype, then scaled in it."""
    x32 = x.astype(jnp.float32)
    y = (x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + eps)).astype(x.dtype)
    return p["scale"].astype(x.dtype) * y


def rms_norm_plus_one(p, x, eps: float):
    """Gemma's RMSNorm: normalised and scaled by ``1 + scale`` all in float32, then rounded."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + eps)
    return (y * (1.0 + p["scale"].astype(jnp.float32))).astype(x.dtype)


def soft_cap(x, cap: float | None):
    """``cap * tanh(x / cap)`` (Gemma 2's soft-capping), or ``x`` without a cap."""
    return x if cap is None else jnp.tanh(x / cap) * cap


def linear(p, x, row_shards: int = 1):
    """``x @ kernel^T (+ bias)``: x dtype[..., in], kernel [*out, in] -> dtype[..., *out]; the
    product and the bias summed in float32 and rounded once (as ``torch.addmm``)."""
    y = project(x, p["kernel"], row_shards)
    if "bias" in p:
        y = y + p["bias"].astype(jnp.float32)
    return y.astype(x.dtype)


def activate(activation: str, x, *others):
    """``act(x) * others...`` computed in float32 and rounded once to ``x.dtype`` (a half-precision
    tanh or erf is emulated slowly on CPU; transformers' CPU kernels compute them in float32 too)."""
    y = ACTIVATIONS[activation](x.astype(jnp.float32))
    for other in others:
        y = y * other.astype(jnp.float32)
    return y.astype(x.dtype)


def mlp(p, x, activation: str, row_shards: int = 1):
    """``down(act(up(x)))`` (GPT-2's ``c_fc`` / ``c_proj``)."""
    return linear(p["down"], activate(activation, linear(p["up"], x, row_shards)), row_shards)


def gated_mlp(p, x, activation: str, row_shards: int = 1):
    """``down(act(gate(x)) * up(x))`` with ``gate_up.kernel: [2, inner, d]`` (gate first)."""
    gate_up = linear(p["gate_up"], x, row_shards)  # [..., 2, inner]
    return linear(p["down"], activate(activation, gate_up[..., 0, :], gate_up[..., 1, :]), row_shards)


def lm_head(params, hidden, row_shards: int = 1):
    """dtype[..., d] -> float32 logits [..., vocab]: ``lm_head``, or the embedding when tied."""
    return project(hidden, params.get("lm_head", params["embed"]), row_shards)
