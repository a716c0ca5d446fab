"""Data- and tensor-parallel decoding on a ``jax.sharding.Mesh``.

Layout (Megatron-style, one reduction per attention and per MLP):

- attention: the fused q/k/v kernel ``[3, d, d]`` (``[out, in]``) is split along its output
  features, i.e. by heads (column-parallel); ``c_proj`` ``[d, d]`` along its input features
  (row-parallel);
- MLP: ``c_fc`` ``[inner, d]`` column-parallel, ``c_proj`` ``[d, inner]`` row-parallel;
- embeddings ``wte`` / ``wpe``, the (tied) LM head and LayerNorms are replicated: logits stay
  whole on every model shard, so top-k, sorting and sampling over the vocabulary need no
  collective (for GPT-2 XL this costs 321 MB of ``wte`` per device);
- the KV cache (keys ``[batch, heads, head_dim, slots]``, values ``[batch, heads, slots,
  head_dim]``, without the batch dim at batch 1) is split by batch along ``data_axis`` and by
  heads along ``model_axis``; every per-row decoder array is split by rows (a batch row's beams
  stay on one device).

An axis given as ``None`` (or of size 1) means replication along it.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxgen.models.gpt2 import GPT2, KVCache

_COLUMN = {("attn", "c_attn", "kernel"): P(None, "M", None), ("attn", "c_attn", "bias"): P(None, "M"),
           ("mlp", "c_fc", "kernel"): P("M", None), ("mlp", "c_fc", "bias"): P("M")}
_ROW = {("attn", "c_proj", "kernel"): P(None, "M"), ("mlp", "c_proj", "kernel"): P(None, "M")}


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


def auto_axes(mesh: Mesh) -> Mesh:
    """``mesh`` with every axis in ``Auto`` mode: the same devices, names and shape.

    jaxgen lays out every array of its program itself (``with_sharding_constraint``), which JAX
    allows only along ``Auto`` axes, while ``jax.make_mesh`` gives ``Explicit`` ones by default
    in recent JAX (0.10 here). A mesh only tells jaxgen which devices to use, so both are accepted.
    """
    if all(t.name == "Auto" for t in getattr(mesh, "axis_types", ())):  # older JAX: no axis types
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(jax.sharding.AxisType.Auto,) * len(mesh.axis_names))


def check_context() -> None:
    """Raises ValueError inside a ``jax.set_mesh`` context with ``Explicit`` axes, where JAX
    types every array by that mesh and turns jaxgen's layout constraints into assertions."""
    context = jax.sharding.get_abstract_mesh() if hasattr(jax.sharding, "get_abstract_mesh") else None
    if context is not None and any(t.name == "Explicit" for t in context.axis_types):
        raise ValueError(
            f"mesh cannot be used inside a jax.set_mesh(...) context with Explicit axes ({context}): jaxgen "
            "lays out its program on the mesh itself; call it outside that context"
        )


def param_specs(model: GPT2, model_axis: str | None):
    """A PartitionSpec for every param leaf (a pytree of the params' structure)."""

    def spec(path, leaf):
        keys = tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path)
        if keys[0] != "h" or model_axis is None:
            return P()
        rule = _COLUMN.get(keys[2:]) or _ROW.get(keys[2:]) or P()
        return P(*(model_axis if s == "M" else s for s in rule))

    return jax.tree_util.tree_map_with_path(spec, model.params)


def shard(model: GPT2, mesh: Mesh, *, data_axis: str | None = "data", model_axis: str | None = "model") -> GPT2:
    """Places ``model``'s params on ``mesh`` (tensor-parallel along ``model_axis``).

    Raises ValueError for a mesh without the named axes, or heads / MLP width not divisible by
    the model axis. ``data_axis`` is only checked here; decoders shard the batch along it.
    """
    check_mesh(mesh, data_axis, model_axis)
    mesh = auto_axes(mesh)
    m = axis_size(mesh, model_axis)
    c = model.config
    if c.n_head % m or c.inner_dim % m:
        raise ValueError(
            f"model_axis={model_axis!r} has {m} devices, but n_head={c.n_head} and the MLP width "
            f"{c.inner_dim} must both be divisible by it"
        )
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(model, model_axis))
    return model.replace(params=jax.device_put(model.params, shardings))


def is_on(model: GPT2, mesh: Mesh) -> bool:
    """Whether every param already lives on ``mesh`` (e.g. placed by `shard`)."""
    return all(isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh for x in jax.tree.leaves(model.params))


def rows_sharding(mesh: Mesh, data_axis: str | None, ndim: int) -> NamedSharding:
    """Arrays whose leading axis is rows (batch x beams): split by rows."""
    return NamedSharding(mesh, P(data_axis, *([None] * (ndim - 1))))


def constrain_cache(cache: KVCache, mesh: Mesh | None, data_axis, model_axis) -> KVCache:
    """Pins the cache layout ``[batch, heads, ...]`` -> (data, model, -, -); a one-row cache,
    stored ``[heads, ...]``, -> (model, -, -)."""
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
