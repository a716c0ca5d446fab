"""Weight-only int8 quantization: symmetric, one float32 scale per output channel.

`quantize` turns a model's products' weights (every layer's kernels, the token embedding and an
untied LM head) into `Int8Weight` leaves; norms, biases and position tables keep the model
dtype. The model's other dtype (its activations, cache, ``config.dtype``) is unchanged, and
every decoder, family and mesh runs a quantized model as it runs the original. How the products
use the int8 weights is each platform's choice (`jaxgen.kernels.matmul.project`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

METHODS = ("int8",)


@struct.dataclass
class Int8Weight:
    """A weight ``w: [*out, in]`` as ``q: int8[*out, in]`` and ``scale: float32[*out]`` with
    ``w ~ q * scale[..., None]`` (``scale = max |w| / 127`` over ``in``). ``dtype``: the dtype of
    the weight it stands for (static), which its dequantised rows take."""

    q: jax.Array
    scale: jax.Array
    dtype_name: str = struct.field(pytree_node=False, default="float32")

    @property
    def dtype(self):
        return jnp.dtype(self.dtype_name)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.q.shape

    def rows(self, index) -> jax.Array:
        """``w[index]`` dequantised (an embedding lookup): dtype[*index.shape, in]."""
        return (self.q[index].astype(jnp.float32) * self.scale[index][..., None]).astype(self.dtype)


def quantizes(path: tuple) -> bool:
    """Whether the param at ``path`` (keys from the params' root) is stored as int8: the layers'
    kernels, the token embedding, an untied LM head."""
    if path in (("embed",), ("lm_head",)):
        return True
    return path[:1] == ("layers",) and path[-1] == "kernel"


def int8(w, dtype_name: str, block_rows: int = 4096) -> Int8Weight:
    """``w: [*out, in]`` (numpy or jax) -> `Int8Weight`, a block of ``block_rows`` output channels
    at a time in float32 (the loader quantizes a checkpoint's tensors on the host this way)."""
    xp = np if isinstance(w, np.ndarray) else jnp
    flat = w.reshape(-1, w.shape[-1])
    block_rows = block_rows if xp is np else flat.shape[0]
    qs, scales = [], []
    for start in range(0, flat.shape[0], block_rows):
        block = flat[start:start + block_rows].astype(np.float32)
        scale = xp.abs(block).max(axis=-1) * np.float32(1 / 127)
        scale = xp.where(scale < np.finfo(np.float32).tiny, np.float32(1), scale)  # a zero row: q = 0
        inverse = (np.float32(1) / scale)[:, None]  # (a product, as XLA computes a division by a row)
        qs.append(xp.clip(xp.round(block * inverse), -127, 127).astype(np.int8))
        scales.append(scale.astype(np.float32))
    q, scale = xp.concatenate(qs), xp.concatenate(scales)
    return Int8Weight(q.reshape(w.shape), scale.reshape(w.shape[:-1]), dtype_name)


def quantize(model, method: str = "int8"):
    """``model`` with its products' weights in int8 (`quantizes`): about a quarter of float32's
    bytes and half of bfloat16's. Raises ValueError for an unknown ``method``."""
    from jaxgen.sharding import path_keys  # (sharding imports the models, which import this module)

    check_method(method, "method")

    def leaf(path, x):
        return int8(x, model.config.dtype) if quantizes(path_keys(path)) and not isinstance(x, Int8Weight) else x

    params = jax.tree_util.tree_map_with_path(leaf, model.params, is_leaf=lambda x: isinstance(x, Int8Weight))
    return model.replace(params=params)


def check_method(method, name: str = "quantize") -> None:
    """ValueError naming ``name`` (the argument) unless ``method`` is one of `METHODS`."""
    if method not in METHODS:
        none = " (or None: keep the weights' dtype)" if name == "quantize" else ""
        raise ValueError(f"{name}={method!r} is not supported; use one of {list(METHODS)}{none}")
