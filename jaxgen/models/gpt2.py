"""GPT-2 (``model_type`` ``gpt2``): learned positions, pre-norm LayerNorm blocks, fused q/k/v,
a GELU MLP, a tied LM head.

Numerics follow ``transformers.GPT2LMHeadModel``: LayerNorm and softmax in float32, the
attention scaling options ``scale_attn_weights``, ``scale_attn_by_inverse_layer_idx`` and
``reorder_and_upcast_attn``, masked scores at float32's minimum. Hugging Face's Conv1D weights
``[in, out]`` are stored ``[out, in]`` here, the fused q/k/v as ``[n_head, 3, head_dim, d]``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxgen.models import attention, checkpoint, layers
from jaxgen.models.checkpoint import one
from jaxgen.models.config import CheckpointError, ModelConfig, token_ids

MODEL_TYPES = ("gpt2",)
PREFIXES = ("transformer.", "")  # with its LM head's wrapper, or a base model without
IGNORED = (r"\.attn\.(masked_)?bias$",)  # the causal mask some checkpoints carry


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPT2Config(ModelConfig):
    model_type: str = "gpt2"
    inner_dim: int
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False

    def attention_scale(self, layer):
        """The factor on ``q @ k^T`` in layer ``layer`` (an int, or traced; as GPT2Attention.scaling)."""
        scale = self.head_dim**-0.5 if self.scale_attn_weights else 1.0
        return scale / (layer + 1.0) if self.scale_attn_by_inverse_layer_idx else scale


def config_from_hf(hf, dtype: str) -> GPT2Config:
    """A transformers ``GPT2Config`` -> `GPT2Config`, rejecting what jaxgen cannot run."""
    if hf.add_cross_attention:
        raise CheckpointError("config.json sets add_cross_attention=true; jaxgen runs decoder-only GPT-2")
    if hf.activation_function not in layers.ACTIVATIONS:
        raise CheckpointError(f"config.json activation_function={hf.activation_function!r} is not supported; "
                              f"supported: {sorted(layers.ACTIVATIONS)}")
    if hf.n_head <= 0 or hf.n_embd % hf.n_head:
        raise CheckpointError(f"config.json n_embd={hf.n_embd} is not divisible by n_head={hf.n_head}")
    return GPT2Config(
        vocab_size=hf.vocab_size, d_model=hf.n_embd, n_layers=hf.n_layer, n_heads=hf.n_head, n_kv_heads=hf.n_head,
        head_dim=hf.n_embd // hf.n_head, max_position_embeddings=hf.n_positions, position_limit=hf.n_positions,
        tie_word_embeddings=hf.tie_word_embeddings, bos_token_id=hf.bos_token_id,
        eos_token_id=token_ids(hf.eos_token_id), dtype=dtype,
        inner_dim=hf.n_inner if hf.n_inner is not None else 4 * hf.n_embd,
        activation_function=hf.activation_function, layer_norm_epsilon=hf.layer_norm_epsilon,
        scale_attn_weights=hf.scale_attn_weights, scale_attn_by_inverse_layer_idx=hf.scale_attn_by_inverse_layer_idx,
        reorder_and_upcast_attn=hf.reorder_and_upcast_attn,
    )


def checkpoint_table(c: GPT2Config) -> dict:
    """The params pytree with, at each leaf, the ``transformers.GPT2LMHeadModel`` tensors it is
    built from."""
    d, inner, h, hd = c.d_model, c.inner_dim, c.n_heads, c.head_dim

    def qkv(x):  # Conv1D [d, 3d] (or bias [3d]) -> [h, 3, hd, d] ([h, 3, hd])
        x = x.T if x.ndim == 2 else x
        return np.moveaxis(x.reshape(3, h, hd, *x.shape[1:]), 0, 1)

    def norm(name):
        return {"scale": one(name + ".weight", d), "bias": one(name + ".bias", d)}

    def conv(name, n_in, n_out):
        return {"kernel": one(name + ".weight", n_in, n_out, build=np.transpose), "bias": one(name + ".bias", n_out)}

    def block(pre):
        return {
            "attn_norm": norm(pre + "ln_1"),
            "attn": {"qkv": {"kernel": one(pre + "attn.c_attn.weight", d, 3 * d, build=qkv),
                             "bias": one(pre + "attn.c_attn.bias", 3 * d, build=qkv)},
                     "out": conv(pre + "attn.c_proj", d, d)},
            "mlp_norm": norm(pre + "ln_2"),
            "mlp": {"up": conv(pre + "mlp.c_fc", d, inner), "down": conv(pre + "mlp.c_proj", inner, d)},
        }

    return {"embed": one("transformer.wte.weight", c.vocab_size, d),
            "pos_embed": one("transformer.wpe.weight", c.position_limit, d),
            "layers": [block(f"transformer.h.{i}.") for i in range(c.n_layers)],
            "final_norm": norm("transformer.ln_f"), **checkpoint.head(c)}


def embed(params, c: GPT2Config, tokens, positions):
    x = layers.embed(params["embed"], tokens) + layers.embed(params["pos_embed"], positions)
    return x.astype(params["embed"].dtype), None


def block(p, c: GPT2Config, x, rotary, layer, row_shards: int):
    """One GPT-2 layer over x: dtype[rows, seq, d]; returns it and the layer's cache arrays."""
    h = layers.layer_norm(p["attn_norm"], x, c.layer_norm_epsilon)
    qkv = layers.linear(p["attn"]["qkv"], h, row_shards)  # [rows, seq, heads, 3, hd]
    out, kv = attention.attention(qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :], layer,
                                  scale=c.attention_scale(layer.index), upcast=c.reorder_and_upcast_attn)
    x = x + layers.linear(p["attn"]["out"], out, row_shards)
    h = layers.layer_norm(p["mlp_norm"], x, c.layer_norm_epsilon)
    return x + layers.mlp(p["mlp"], h, c.activation_function, row_shards), kv


def final(params, c: GPT2Config, x):
    return layers.layer_norm(params["final_norm"], x, c.layer_norm_epsilon)


def logits(params, c: GPT2Config, hidden, row_shards: int = 1):
    return layers.lm_head(params, hidden, row_shards)
