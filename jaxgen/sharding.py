"""Data- and tensor-parallel decoding on a ``jax.sharding.Mesh``.

Layout (Megatron-style, one reduction per attention and per MLP), the same for every family
since all store their params in one layout (`jaxgen.models`):

- attention: the fused q/k/v kernel ``[n_kv_heads, heads_per_kv + 2, head_dim, d]`` is split
  along its first axis, i.e. by kv heads with their query heads (column-parallel); the output
  projection ``[d, n_heads * head_dim]`` along its input features (row-parallel). A model axis
  larger than the kv head count replicates each kv head over as many devices as needed (their
  query heads are split among the copies), so each device holds whole heads;
- MLP: ``up`` ``[inner, d]`` and ``gate_up`` ``[2, inner, d]`` split along ``inner``
  (column-parallel), ``down`` ``[d, inner]`` along its input (row-parallel);
- embeddings, norms and the LM head are replicated: logits stay whole on every model shard, so
  top-k, sorting and sampling over the vocabulary need no collective;
- the KV cache (keys ``[batch, kv_heads, head_dim, slots]``, values ``[batch, kv_heads, slots,
  head_dim]``, without the batch dim at batch 1) is split by batch along ``data_axis`` and by kv
  heads along ``model_axis``; every per-row decoder array is split by rows (a batch row's beams
  stay on one device).

An axis given as ``None`` (or of size 1) means replication along it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxgen.models.cache import KVCache
from jaxgen.models.config import ModelConfig

# Which axis of a layer's param the model axis splits, by its path below the layer.
_SPLIT = {("attn", "qkv", "kernel"): 0, ("attn", "qkv", "bias"): 0, ("attn", "out", "kernel"): 1,
          ("mlp", "up", "kernel"): 0, ("mlp", "up", "bias"): 0, ("mlp", "gate_up", "kernel"): 1,
          ("mlp", "gate_up", "bias"): 1, ("mlp", "down", "kernel"): 1}


def axis_size(mesh: Mesh, axis: str | None) -> int:
    return 1 if axis is None else mesh.shape[axis]


def check_mesh(mesh, data_axis: str | None, model_axis: str | None) -> None:
    """Raises ValueError unless ``mesh`` is a Mesh with the named axes."""
    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    for name, axis in (("data_axis", data_axis), ("model_axis", model_axis)):
        if axis is not None and axis not in mesh.axis_names:
            raise ValueError(
                f"{name}={axis!r} is not an axis of the mesh (axes: {mesh.axis_names}); name the mesh's axes "
                f"with data_axis= / model_axis=, or pass None to replicate along that role"
            )
    if data_axis is not None and data_axis == model_axis:
        raise ValueError(f"data_axis={data_axis!r} and model_axis={model_axis!r} name the same mesh axis; the batch "
                         "and the model split along different axes (pass None for the role that does not split)")


def auto_axes(mesh: Mesh) -> Mesh:
    """``mesh`` with every axis in ``Auto`` mode: the same devices, names and shape.

    jaxgen lays out every array of its program itself (``with_sharding_constraint``), which JAX
    allows only along ``Auto`` axes, while ``jax.make_mesh`` gives ``Explicit`` ones by default
    in recent JAX. A mesh only tells jaxgen which devices to use, so both are accepted.
    """
    if all(t.name == "Auto" for t in getattr(mesh, "axis_types", ())):  # older JAX: no axis types
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(jax.sharding.AxisType.Auto,) * len(mesh.axis_names))


def _explicit(mesh) -> bool:
    """Whether ``mesh`` (a mesh, an abstract one, or None) has an axis in ``Explicit`` mode."""
    return mesh is not None and any(t.name == "Explicit" for t in getattr(mesh, "axis_types", ()))


def check_context() -> None:
    """Raises ValueError inside a ``jax.set_mesh`` context with ``Explicit`` axes, where JAX
    types every array by that mesh and turns jaxgen's layout constraints into assertions."""
    context = jax.sharding.get_abstract_mesh() if hasattr(jax.sharding, "get_abstract_mesh") else None
    if _explicit(context):
        raise ValueError(
            f"mesh cannot be used inside a jax.set_mesh(...) context with Explicit axes ({context}): jaxgen "
            "lays out its program on the mesh itself; call it outside that context"
        )


def check_inputs(**arrays) -> None:
    """Raises ValueError for a traced input typed by a mesh with ``Explicit`` axes (arrays placed
    on a ``jax.make_mesh`` mesh and passed into the caller's ``jax.jit``): jaxgen's program lays
    its arrays out on the ``Auto`` version of the mesh, which JAX will not mix with them."""
    for name, x in arrays.items():
        if not isinstance(x, jax.core.Tracer):
            continue
        mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
        if _explicit(mesh):
            raise ValueError(f"{name} is sharded over a mesh with Explicit axes inside jax.jit ({mesh}), which "
                             "jaxgen's Auto layout cannot take in: place the inputs on the mesh with Auto axes "
                             "(jax.make_mesh(..., axis_types=(jax.sharding.AxisType.Auto,) * 2)), or call jaxgen "
                             "outside jit")


def gathered(x):
    """``x`` itself, or for a concrete array typed by a mesh with ``Explicit`` axes its values on
    the host (jaxgen's model forward lays its arrays out on its own)."""
    concrete = isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)
    return np.asarray(x) if concrete and _explicit(getattr(x.sharding, "mesh", None)) else x


def plan(config: ModelConfig, mesh: Mesh, model_axis: str | None) -> tuple[ModelConfig, int]:
    """The config of ``config``'s model split along ``model_axis``, and by how many devices each
    kv head is replicated (1 unless the axis is larger than the kv head count).

    Raises ValueError unless every device gets whole query heads and an equal part of the MLP.
    """
    m = axis_size(mesh, model_axis)
    inner = getattr(config, "inner_dim", 0)
    kv = config.n_kv_heads
    if config.n_heads % m or inner % m or (kv % m and m % kv):
        raise ValueError(
            f"model_axis={model_axis!r} has {m} devices, but n_heads={config.n_heads} and the MLP width {inner} "
            f"must be divisible by it, and n_kv_heads={kv} divisible by it or a divisor of it"
        )
    repeat = 1 if kv % m == 0 else m // kv
    return dataclasses.replace(config, n_kv_heads=kv * repeat), repeat


def repeat_kv_heads(qkv, heads_per_kv: int, repeat: int):
    """A fused q/k/v param ``[kv, heads_per_kv + 2, ...]`` -> ``[kv * repeat, heads_per_kv /
    repeat + 2, ...]``: each kv head copied ``repeat`` times, its query heads split among the
    copies in order (numpy or jax arrays alike). The same attention, over more kv heads."""
    if repeat == 1:
        return qkv
    xp = np if isinstance(qkv, np.ndarray) else jnp
    kv, rest = qkv.shape[0], qkv.shape[2:]
    q = qkv[:, :heads_per_kv].reshape(kv, repeat, heads_per_kv // repeat, *rest)
    k_v = xp.broadcast_to(qkv[:, None, heads_per_kv:], (kv, repeat, 2, *rest))
    return xp.concatenate([q, k_v], axis=2).reshape(kv * repeat, heads_per_kv // repeat + 2, *rest)


def param_spec(path: tuple, ndim: int, model_axis: str | None) -> P:
    """The PartitionSpec of the param at ``path`` (keys from the params' root). An int8 kernel's
    ``q`` splits as the kernel, its ``scale`` (the kernel less its input axis) along the same
    axis unless that is the input axis."""
    if path[-1:] in (("q",), ("scale",)):
        path = path[:-1]
    axis = _SPLIT.get(tuple(path[2:])) if path[:1] == ("layers",) and model_axis is not None else None
    if axis is None or axis >= ndim:
        return P()
    return P(*(model_axis if a == axis else None for a in range(ndim)))


def path_keys(path) -> tuple:
    """A pytree path's keys as plain values (dict keys, list indices, dataclass field names)."""
    return tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", None))) for k in path)


def param_specs(params, model_axis: str | None):
    """A PartitionSpec for every param leaf (a pytree of the params' structure)."""
    def spec(path, leaf):
        return param_spec(path_keys(path), leaf.ndim, model_axis)

    return jax.tree_util.tree_map_with_path(spec, params)


def shard(model, mesh: Mesh, *, data_axis: str | None = "data", model_axis: str | None = "model"):
    """Places ``model``'s params on ``mesh`` (tensor-parallel along ``model_axis``).

    Raises ValueError for a mesh without the named axes, or heads / MLP width that do not split
    evenly (`plan`). ``data_axis`` is only checked here; decoders shard the batch along it.
    """
    check_mesh(mesh, data_axis, model_axis)
    mesh = auto_axes(mesh)
    config, repeat = plan(model.config, mesh, model_axis)
    params = model.params
    if repeat > 1:
        per_kv = model.config.n_heads // model.config.n_kv_heads
        params = {**params, "layers": [
            {**layer, "attn": {**layer["attn"], "qkv": jax.tree.map(lambda x: repeat_kv_heads(x, per_kv, repeat),
                                                                       layer["attn"]["qkv"])}}
            for layer in params["layers"]]}
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(params, model_axis))
    return model.replace(params=jax.device_put(params, shardings), config=config)


def is_on(model, mesh: Mesh) -> bool:
    """Whether every param already lives on ``mesh`` (e.g. placed by `shard`)."""
    return all(isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh for x in jax.tree.leaves(model.params))


def rows_sharding(mesh: Mesh, data_axis: str | None, ndim: int) -> NamedSharding:
    """Arrays whose leading axis is rows (batch x beams): split by rows."""
    return NamedSharding(mesh, P(data_axis, *([None] * (ndim - 1))))


def constrain_cache(cache: KVCache, mesh: Mesh | None, data_axis, model_axis) -> KVCache:
    """Pins the cache layout ``[batch, kv_heads, ...]`` -> (data, model, -, -); a one-row cache,
    stored ``[kv_heads, ...]``, -> (model, -, -)."""
    if mesh is None:
        return cache

    def constrain(x):
        rows = (data_axis,) if x.ndim == 4 else ()
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*rows, model_axis, None, None)))

    return cache.map_arrays(constrain)


def constrain_rows(x: jax.Array, mesh: Mesh | None, data_axis) -> jax.Array:
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, rows_sharding(mesh, data_axis, x.ndim))
