"""Weight products ``x @ w^T`` as each platform runs them fastest (docs/performance.md has the
measurements behind every rule here).

On XLA:CPU a GEMM tiles its output's first axis, so a decode step's few rows placed there leave
most of each tile empty; the product is taken weight-major (``w @ x^T``) with the rows as the
vector lanes, padded to whole lane tiles where that is faster on this machine (`probe`). A
half-precision product runs on XLA:CPU's bfloat16 GEMM only when it returns float32 and has two
rows or more (otherwise XLA converts the weight to float32, and keeps that copy for the whole
decode loop), so a single row is padded to two, and multiplied in whichever order this machine
runs faster. XLA:CPU has no fast float16 GEMM (it converts the weight to float32 first, at
about 2 GB/s): a float16 product is taken in float32 on a copy that XLA makes once a call,
outside the decode loop. Elsewhere (GPU, TPU) the product is a plain dot.

An int8 weight (`jaxgen.quantization.Int8Weight`) is multiplied as int8 everywhere, never converted
whole: on XLA:CPU, which converts a weight whole for a mixed-type product (and keeps that copy),
each row of ``x`` is quantized to int8 with a scale of its own and the product taken in int8
with int32 sums (rows padded to two at least: a single row takes a far slower path); elsewhere
the weight is converted to ``x``'s dtype inside the product, which GPU and TPU compilers fuse.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxgen.kernels import probe
from jaxgen.quantization import Int8Weight


def project(x: jax.Array, w: jax.Array, row_shards: int = 1) -> jax.Array:
    """x: dtype[..., in], w: dtype[*out, in] -> float32[..., *out], accumulated in float32.

    ``row_shards``: into how many equal blocks of consecutive rows a mesh splits ``x`` (its data
    axis); each block is padded on its own, so that no row moves between devices. ``w`` may be an
    `Int8Weight` ``[*out, in]``.
    """
    if isinstance(w, Int8Weight):
        return _project_int8(x, w, row_shards)
    rows = x.reshape(-1, x.shape[-1])

    def row_major(rows, w):
        return jax.lax.dot_general(rows, w, (((1,), (w.ndim - 1,)), ((), ())), preferred_element_type=jnp.float32)

    def cpu(rows, w):
        if w.dtype == jnp.float16:  # no fast float16 GEMM on XLA:CPU: a float32 one, on a copy made once a call
            rows, w = rows.astype(jnp.float32), w.astype(jnp.float32)
        n = rows.shape[0] // row_shards  # rows of one block
        if n == 1 and w.dtype == jnp.bfloat16:  # two rows at least, in this machine's order
            if _single_half_row(w.dtype) == "row-major":
                two_rows = jnp.pad(rows, ((0, 1), (0, 0)))
                return row_major(two_rows, w.reshape(-1, w.shape[-1]))[:1].reshape(1, *w.shape[:-1])
            lanes = 2
        else:
            lanes = _lanes(n, w.dtype)
        rows = jnp.pad(rows.reshape(row_shards, n, -1), ((0, 0), (0, lanes - n), (0, 0)))
        rows = rows.reshape(row_shards * lanes, -1)
        y = jax.lax.dot_general(w, rows, (((w.ndim - 1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        # The barrier keeps XLA from folding the transpose back into the dot.
        y = jnp.moveaxis(jax.lax.optimization_barrier(y), -1, 0).reshape(row_shards, lanes, *w.shape[:-1])
        return y[:, :n].reshape(row_shards * n, *w.shape[:-1])

    y = jax.lax.platform_dependent(rows, w, cpu=cpu, default=row_major)
    return y.reshape(*x.shape[:-1], *w.shape[:-1])


def _project_int8(x, w: Int8Weight, row_shards: int):
    """`project` for an int8 weight: x dtype[..., in] -> float32[..., *out] (module docstring)."""
    rows = x.reshape(-1, x.shape[-1])
    q = w.q.reshape(-1, w.q.shape[-1])  # [out, in]

    def weights_in_dtype(rows, q):
        return jax.lax.dot_general(rows, q.astype(rows.dtype), (((1,), (1,)), ((), ())),
                                   preferred_element_type=jnp.float32)

    def cpu(rows, q):
        n = rows.shape[0] // row_shards
        lanes = max(n, 2)
        x32 = rows.astype(jnp.float32)
        row_scale = jnp.max(jnp.abs(x32), axis=-1, keepdims=True) / 127
        row_scale = jnp.where(row_scale == 0, 1, row_scale)
        # a product by the reciprocal, kept apart: XLA would compile the division as a division in
        # one program and as such a product in another, rounding some rows to other int8 values
        inverse = jax.lax.optimization_barrier(1 / row_scale)
        xq = jnp.round(x32 * inverse).astype(jnp.int8)
        xq = jnp.pad(xq.reshape(row_shards, n, -1), ((0, 0), (0, lanes - n), (0, 0))).reshape(row_shards * lanes, -1)
        if _int8_order(lanes) == "row-major":
            y = jax.lax.dot_general(xq, q, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
        else:
            y = jax.lax.dot_general(q, xq, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
            y = jax.lax.optimization_barrier(y).T
        y = y.reshape(row_shards, lanes, -1)[:, :n].reshape(row_shards * n, -1)
        return y.astype(jnp.float32) * row_scale

    y = jax.lax.platform_dependent(rows, q, cpu=cpu, default=weights_in_dtype)
    return y.reshape(*x.shape[:-1], *w.shape[:-1]) * w.scale


def _int8_order(lanes: int) -> str:
    """The faster order of an int8 product of ``lanes`` rows on this machine."""
    rows = lambda: jnp.ones((lanes, 1024), jnp.int8)  # noqa: E731
    dims = (((1,), (1,)), ((), ()))
    return probe.fastest(("int8 order", lanes), {
        "row-major": lambda w: jax.lax.dot_general(rows(), w, dims, preferred_element_type=jnp.int32),
        "weight-major": lambda w: jax.lax.optimization_barrier(
            jax.lax.dot_general(w, rows(), dims, preferred_element_type=jnp.int32)).T,
    }, jnp.int8)


def _weight_major(w, rows, lanes: int):
    """w: [out, in], rows: [n, in] -> float32[n, out] through a GEMM of ``lanes >= n`` rows."""
    n = rows.shape[0]
    y = jax.lax.dot_general(w, jnp.pad(rows, ((0, lanes - n), (0, 0))), (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32)
    return jax.lax.optimization_barrier(y).T[:n]


def _lanes(n: int, dtype) -> int:
    """How many GEMM rows ``n`` decode rows take on this machine: `gemm_rows` or ``n`` itself."""
    padded = gemm_rows(n)
    if padded == n:
        return n
    rows = lambda: jnp.ones((n, 1024), dtype)  # noqa: E731
    choice = probe.fastest(("lanes", n, jnp.dtype(dtype).name), {
        "padded": lambda w: _weight_major(w, rows(), padded),
        "as is": lambda w: _weight_major(w, rows(), n),
    }, dtype)
    return padded if choice == "padded" else n


def _single_half_row(dtype) -> str:
    """The faster order of a single half-precision row's product (padded to two) on this machine."""
    row = lambda: jnp.ones((1, 1024), dtype)  # noqa: E731
    return probe.fastest(("single row", jnp.dtype(dtype).name), {
        "row-major": lambda w: jax.lax.dot_general(jnp.pad(row(), ((0, 1), (0, 0))), w, (((1,), (1,)), ((), ())),
                                                   preferred_element_type=jnp.float32)[:1],
        "weight-major": lambda w: _weight_major(w, row(), 2),
    }, dtype)


def gemm_rows(n: int) -> int:
    """How many rows XLA:CPU's GEMM gets for ``n`` rows of a weight-major `project`: 5-8 -> 8,
    9-64 -> a multiple of 16 (whole AVX2 and AVX-512 vectors); up to 4 rows (a kernel of their
    own) and above 64 (compute-bound, where padding costs in proportion) as they are."""
    if n <= 4 or n > 64:
        return n
    step = 8 if n <= 8 else 16
    return -(-n // step) * step
