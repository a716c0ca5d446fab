"""The Llama architecture and its close relatives: Llama 2/3.x (``llama``), Mistral
(``mistral``), Qwen2 / Qwen2.5 (``qwen2``), Qwen3 (``qwen3``) and Phi-3 (``phi3``).

One pre-norm block for all: RMSNorm, grouped-query attention with rotary positions, a gated MLP.
What differs is configuration: q/k/v, output and MLP biases (``attention_bias``, ``mlp_bias``;
Qwen2's q/k/v always), Qwen3's RMSNorm of each query and key head before the rotation, sliding
windows (Mistral's on every layer, Qwen's per ``layer_types``, Phi-3's ``sliding_window``), the
rope type and Phi-3's partial rotation, and Phi-3's checkpoint, which fuses q/k/v
(``qkv_proj``) and gate/up (``gate_up_proj``). Numerics follow each ``modeling_<type>.py`` of
transformers 5.x: norms in float32, rotary tables in float32 rounded to the model dtype.
"""

from __future__ import annotations

import dataclasses

from jaxgen.models import attention, checkpoint, layers, rope
from jaxgen.models.checkpoint import one
from jaxgen.models.config import CheckpointError, ModelConfig, token_ids

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3")
PREFIXES = ("model.", "")  # with its LM head's wrapper, or a base model without
IGNORED = (r"\.rotary_emb\.inv_freq$",)  # a buffer older checkpoints saved


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig(ModelConfig):
    inner_dim: int
    activation: str = "silu"
    rms_norm_eps: float = 1e-6
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    fused_checkpoint: bool = False  # Phi-3's qkv_proj and gate_up_proj
    rope: rope.Rope


def config_from_hf(hf, dtype: str) -> LlamaConfig:
    """A transformers config of one of `MODEL_TYPES` -> `LlamaConfig`; raises CheckpointError for
    a setting jaxgen does not implement."""
    kind = hf.model_type
    if hf.hidden_act not in layers.ACTIVATIONS:
        raise CheckpointError(f"config.json hidden_act={hf.hidden_act!r} is not supported; "
                              f"supported: {sorted(layers.ACTIVATIONS)}")
    heads, kv_heads = hf.num_attention_heads, hf.num_key_value_heads or hf.num_attention_heads
    if heads % kv_heads:
        raise CheckpointError(f"config.json num_attention_heads={heads} is not a multiple of "
                              f"num_key_value_heads={kv_heads}")
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
    params = dict(hf.rope_parameters or {})
    if any(isinstance(v, dict) for v in params.values()):
        raise CheckpointError(f"config.json gives rope parameters per layer type ({sorted(params)}); "
                              f"{kind} in jaxgen takes one set for all layers")
    rotary = rope.from_parameters(params, head_dim=head_dim, max_position_embeddings=hf.max_position_embeddings,
                                  partial=kind == "phi3")
    return LlamaConfig(
        model_type=kind, vocab_size=hf.vocab_size, d_model=hf.hidden_size, n_layers=hf.num_hidden_layers,
        n_heads=heads, n_kv_heads=kv_heads, head_dim=head_dim, max_position_embeddings=hf.max_position_embeddings,
        layer_windows=_windows(hf), tie_word_embeddings=hf.tie_word_embeddings, bos_token_id=hf.bos_token_id,
        eos_token_id=token_ids(hf.eos_token_id), dtype=dtype, inner_dim=hf.intermediate_size,
        activation=hf.hidden_act, rms_norm_eps=hf.rms_norm_eps,
        qkv_bias=kind == "qwen2" or (kind in ("llama", "qwen3") and hf.attention_bias),
        out_bias=kind in ("llama", "qwen3") and hf.attention_bias,
        mlp_bias=kind == "llama" and hf.mlp_bias, qk_norm=kind == "qwen3", fused_checkpoint=kind == "phi3",
        rope=rotary, recompute_at=rotary.original_max + 1 if kind == "phi3" and rotary.long_inv_freq else None,
    )


def _windows(hf) -> tuple[int | None, ...]:
    """Each layer's sliding window, as the model type's modeling code applies it."""
    window = getattr(hf, "sliding_window", None)
    if hf.model_type in ("mistral", "phi3"):
        return (window,) * hf.num_hidden_layers
    types = getattr(hf, "layer_types", None) or ["full_attention"] * hf.num_hidden_layers
    unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
    if unknown:
        raise CheckpointError(f"config.json layer_types has {unknown}; jaxgen runs full_attention and "
                              "sliding_attention layers")
    return tuple(window if t == "sliding_attention" else None for t in types)


def checkpoint_table(c: LlamaConfig) -> dict:
    """The params pytree with, at each leaf, the ``<Type>ForCausalLM`` tensors it is built from."""
    d, hd = c.d_model, c.head_dim

    def block(pre):
        attn = checkpoint.grouped_attention(pre + "self_attn.", c, qkv_bias=c.qkv_bias, out_bias=c.out_bias,
                                            fused=c.fused_checkpoint)
        if c.qk_norm:
            attn["q_norm"] = {"scale": one(pre + "self_attn.q_norm.weight", hd)}
            attn["k_norm"] = {"scale": one(pre + "self_attn.k_norm.weight", hd)}
        return {"attn_norm": {"scale": one(pre + "input_layernorm.weight", d)}, "attn": attn,
                "mlp_norm": {"scale": one(pre + "post_attention_layernorm.weight", d)},
                "mlp": checkpoint.gated_mlp(pre + "mlp.", d, c.inner_dim, bias=c.mlp_bias, fused=c.fused_checkpoint)}

    return {"embed": one("model.embed_tokens.weight", c.vocab_size, d),
            "layers": [block(f"model.layers.{i}.") for i in range(c.n_layers)],
            "final_norm": {"scale": one("model.norm.weight", d)}, **checkpoint.head(c)}


def embed(params, c: LlamaConfig, tokens, positions):
    """Token embeddings, and the rotary tables (cos, sin) every layer uses."""
    x = layers.embed(params["embed"], tokens)
    return x, c.rope.tables(positions, x.dtype)


def block(p, c: LlamaConfig, x, rotary, layer, row_shards: int):
    """One decoder layer over x: dtype[rows, seq, d]; returns it and the layer's cache arrays."""
    rows, seq, _ = x.shape
    per_kv = c.n_heads // c.n_kv_heads
    h = layers.rms_norm(p["attn_norm"], x, c.rms_norm_eps)
    qkv = layers.linear(p["attn"]["qkv"], h, row_shards)  # [rows, seq, kv_heads, per_kv + 2, hd]
    q = qkv[..., :per_kv, :].reshape(rows, seq, c.n_heads, c.head_dim)
    k, v = qkv[..., per_kv, :], qkv[..., per_kv + 1, :]
    if c.qk_norm:
        q = layers.rms_norm(p["attn"]["q_norm"], q, c.rms_norm_eps)
        k = layers.rms_norm(p["attn"]["k_norm"], k, c.rms_norm_eps)
    cos, sin = rotary
    q, k = rope.apply(q, cos, sin), rope.apply(k, cos, sin)
    out, kv = attention.attention(q, k, v, layer, scale=c.head_dim**-0.5)
    x = x + layers.linear(p["attn"]["out"], out, row_shards)
    h = layers.rms_norm(p["mlp_norm"], x, c.rms_norm_eps)
    return x + layers.gated_mlp(p["mlp"], h, c.activation, row_shards), kv


def final(params, c: LlamaConfig, x):
    return layers.rms_norm(params["final_norm"], x, c.rms_norm_eps)


def logits(params, c: LlamaConfig, hidden, row_shards: int = 1):
    return layers.lm_head(params, hidden, row_shards)
