"""Gemma (``gemma``), Gemma 2 (``gemma2``) and Gemma 3's text model (``gemma3_text``, and the
language model of a multimodal ``gemma3`` checkpoint, whose config nests it under
``text_config``; images are not run).

All three: RMSNorm scaled by ``1 + weight`` in float32, the embedding multiplied by
``sqrt(hidden_size)`` rounded to the model dtype (as transformers rounds it: 55.4256 is 55.5 in
bfloat16), GeGLU MLPs, ``head_dim`` independent of ``hidden_size / heads``, tied LM heads.
Gemma 2 and 3 add norms after attention and after the MLP, ``query_pre_attn_scalar`` as the
attention scale, sliding-window layers (``layer_types``: Gemma 2 every other layer, Gemma 3
five of six), and soft-capping of attention scores and final logits (Gemma 2; optional in 3).
Gemma 3 adds RMSNorms of each query and key head and a rotary base per layer type (its sliding
layers' ``rope_local_base_freq``; rope scaling on global layers only).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxgen.models import attention, checkpoint, layers, rope
from jaxgen.models.checkpoint import one
from jaxgen.models.config import CheckpointError, ModelConfig, token_ids

MODEL_TYPES = ("gemma", "gemma2", "gemma3_text", "gemma3")
# A language model's own checkpoint, its base model, or a multimodal Gemma 3's language model.
PREFIXES = ("model.", "", "language_model.model.", "model.language_model.")
IGNORED = (r"^(model\.)?(vision_tower|multi_modal_projector)\.",)  # a multimodal checkpoint's image side


@dataclasses.dataclass(frozen=True, kw_only=True)
class GemmaConfig(ModelConfig):
    inner_dim: int
    activation: str = "gelu_pytorch_tanh"
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    attention_scale: float
    embed_scale: float
    post_norms: bool = False  # Gemma 2 and 3: norms after attention and after the MLP
    qk_norm: bool = False  # Gemma 3
    attn_softcap: float | None = None
    final_softcap: float | None = None
    rope_global: rope.Rope
    rope_local: rope.Rope | None = None  # Gemma 3's sliding layers


def config_from_hf(hf, dtype: str) -> GemmaConfig:
    """A transformers Gemma config -> `GemmaConfig`; raises CheckpointError for a setting jaxgen
    does not implement."""
    image_tokens = ()
    tied = hf.tie_word_embeddings
    if hf.model_type == "gemma3":  # multimodal: its language model
        image_tokens = token_ids(getattr(hf, "image_token_index", None))
        hf = hf.text_config
    kind = hf.model_type
    if getattr(hf, "use_bidirectional_attention", False):
        raise CheckpointError("config.json sets use_bidirectional_attention=true (an embedding model); jaxgen "
                              "generates with causal language models")
    activation = hf.hidden_act if kind == "gemma" else hf.hidden_activation
    if activation not in layers.ACTIVATIONS:
        raise CheckpointError(f"config.json's activation {activation!r} is not supported; "
                              f"supported: {sorted(layers.ACTIVATIONS)}")
    heads, kv_heads, head_dim = hf.num_attention_heads, hf.num_key_value_heads, hf.head_dim
    if heads % kv_heads:
        raise CheckpointError(f"config.json num_attention_heads={heads} is not a multiple of "
                              f"num_key_value_heads={kv_heads}")
    types = getattr(hf, "layer_types", None) or ["full_attention"] * hf.num_hidden_layers
    unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
    if unknown:
        raise CheckpointError(f"config.json layer_types has {unknown}; jaxgen runs full_attention and "
                              "sliding_attention layers")
    params = dict(hf.rope_parameters or {})
    per_type = {t: params.get(t) for t in ("full_attention", "sliding_attention")} if kind == "gemma3_text" else {}

    def rotary(p):
        return rope.from_parameters(dict(p), head_dim=head_dim, max_position_embeddings=hf.max_position_embeddings,
                                    partial=False)

    return GemmaConfig(
        model_type=kind, vocab_size=hf.vocab_size, d_model=hf.hidden_size, n_layers=hf.num_hidden_layers,
        n_heads=heads, n_kv_heads=kv_heads, head_dim=head_dim, max_position_embeddings=hf.max_position_embeddings,
        layer_windows=tuple(hf.sliding_window if t == "sliding_attention" else None for t in types),
        tie_word_embeddings=tied, bos_token_id=hf.bos_token_id, eos_token_id=token_ids(hf.eos_token_id),
        unsupported_token_ids=image_tokens, dtype=dtype, inner_dim=hf.intermediate_size, activation=activation,
        rms_norm_eps=hf.rms_norm_eps, attention_bias=hf.attention_bias,
        attention_scale=(head_dim if kind == "gemma" else hf.query_pre_attn_scalar) ** -0.5,
        embed_scale=hf.hidden_size**0.5, post_norms=kind != "gemma", qk_norm=kind == "gemma3_text",
        attn_softcap=getattr(hf, "attn_logit_softcapping", None),
        final_softcap=getattr(hf, "final_logit_softcapping", None),
        rope_global=rotary(per_type["full_attention"] if per_type else params),
        rope_local=rotary(per_type["sliding_attention"]) if per_type else None,
    )


def checkpoint_table(c: GemmaConfig) -> dict:
    """The params pytree with, at each leaf, the ``Gemma*ForCausalLM`` tensors it is built from."""
    d, hd = c.d_model, c.head_dim

    def norm(name, size=d):
        return {"scale": one(name + ".weight", size)}

    def block(pre):
        attn = checkpoint.grouped_attention(pre + "self_attn.", c, qkv_bias=c.attention_bias,
                                            out_bias=c.attention_bias)
        if c.qk_norm:
            attn.update(q_norm=norm(pre + "self_attn.q_norm", hd), k_norm=norm(pre + "self_attn.k_norm", hd))
        p = {"attn_norm": norm(pre + "input_layernorm"), "attn": attn,
             "mlp": checkpoint.gated_mlp(pre + "mlp.", d, c.inner_dim)}
        if c.post_norms:
            p.update(attn_post_norm=norm(pre + "post_attention_layernorm"),
                     mlp_norm=norm(pre + "pre_feedforward_layernorm"),
                     mlp_post_norm=norm(pre + "post_feedforward_layernorm"))
        else:
            p["mlp_norm"] = norm(pre + "post_attention_layernorm")
        return p

    return {"embed": one("model.embed_tokens.weight", c.vocab_size, d),
            "layers": [block(f"model.layers.{i}.") for i in range(c.n_layers)],
            "final_norm": norm("model.norm"), **checkpoint.head(c)}


def embed(params, c: GemmaConfig, tokens, positions):
    """Scaled token embeddings, and the rotary tables (cos, sin) of each of ``c.windows``."""
    x = layers.embed(params["embed"], tokens)
    x = x * jnp.asarray(c.embed_scale, x.dtype)
    local = c.rope_local or c.rope_global
    return x, tuple((local if w is not None else c.rope_global).tables(positions, x.dtype) for w in c.windows)


def block(p, c: GemmaConfig, x, rotary, layer, row_shards: int):
    """One decoder layer over x: dtype[rows, seq, d]; returns it and the layer's cache arrays."""
    rows, seq, _ = x.shape
    per_kv = c.n_heads // c.n_kv_heads
    norm = lambda name, h: layers.rms_norm_plus_one(p[name], h, c.rms_norm_eps)  # noqa: E731
    qkv = layers.linear(p["attn"]["qkv"], norm("attn_norm", x), row_shards)  # [rows, seq, kv_heads, per_kv + 2, hd]
    q = qkv[..., :per_kv, :].reshape(rows, seq, c.n_heads, c.head_dim)
    k, v = qkv[..., per_kv, :], qkv[..., per_kv + 1, :]
    if c.qk_norm:
        q = layers.rms_norm_plus_one(p["attn"]["q_norm"], q, c.rms_norm_eps)
        k = layers.rms_norm_plus_one(p["attn"]["k_norm"], k, c.rms_norm_eps)
    cos, sin = rotary[c.windows.index(layer.window)]
    q, k = rope.apply(q, cos, sin), rope.apply(k, cos, sin)
    out, kv = attention.attention(q, k, v, layer, scale=c.attention_scale, softcap=c.attn_softcap)
    h = layers.linear(p["attn"]["out"], out, row_shards)
    x = x + (norm("attn_post_norm", h) if c.post_norms else h)
    h = layers.gated_mlp(p["mlp"], norm("mlp_norm", x), c.activation, row_shards)
    return x + (norm("mlp_post_norm", h) if c.post_norms else h), kv


def final(params, c: GemmaConfig, x):
    return layers.rms_norm_plus_one(params["final_norm"], x, c.rms_norm_eps)


def logits(params, c: GemmaConfig, hidden, row_shards: int = 1):
    return layers.soft_cap(layers.lm_head(params, hidden, row_shards), c.final_softcap)
