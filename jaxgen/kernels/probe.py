"""Choices between equivalent formulations whose speed depends on the machine, made by a short
measurement at first use and kept for the process.

A rule measured on one CPU can lose on the next (this project's 2-core machine has been an AMD
Zen 3, 4 and 5 and an Intel Xeon with AMX, and the same product's best formulation differed
between them; docs/performance.md). Where formulations compute the same thing (their float32
sums in other orders: results within ~1e-5 relative), the first program that needs the choice
times each on representative weights (once per process, a fraction of a second, inside
``jax.ensure_compile_time_eval`` so that it runs while a caller is being traced). The first
candidate stays unless another beats it by `MARGIN`: a near tie, which timing noise could decide
either way, does not change a machine's results from one process to the next.
``JAXGEN_PROBE=off`` skips the measurements and takes each choice's first candidate; `choose`
fixes one by hand (tests, reproducible benchmarks).
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp

_chosen: dict[tuple, str] = {}
MARGIN = 0.15  # how much faster than the first candidate another must be to be chosen
# The weights a measurement reads, at least: out of the caches (a few MB, and an L3 that a
# virtual machine may share widely), where a decode step reads its weights from. 12 MB of int8
# weights measured two orders of an int8 product as a near tie, 32 MB the one 1.2-2x faster.
PROBE_BYTES = 32 * 2**20


def choose(key: tuple, name: str | None) -> None:
    """Fixes (or, with None, forgets) the choice ``key``. Programs already traced keep the choice
    they were traced with (``jax.clear_caches()`` drops them)."""
    if name is None:
        _chosen.pop(key, None)
    else:
        _chosen[key] = name


@contextlib.contextmanager
def fixed(key: tuple, name: str):
    """`choose` for the duration of a ``with`` block: traced programs are dropped on entry (they
    keep the choice they were traced with), the earlier choice comes back on exit."""
    earlier = _chosen.get(key)
    choose(key, name)
    jax.clear_caches()
    try:
        yield
    finally:
        choose(key, earlier)


def fastest(key: tuple, candidates: dict[str, Callable], dtype, shape=(2048, 1024)) -> str:
    """The name of the fastest of ``candidates`` (each ``fn(weight)`` over distinct
    ``dtype[shape]`` weights of `PROBE_BYTES` in all, so that they are read from memory, not
    cache), measured once per ``key``. The first candidate where measuring is off or not on a CPU."""
    if key not in _chosen:
        if os.environ.get("JAXGEN_PROBE", "").lower() == "off" or jax.default_backend() != "cpu":
            _chosen[key] = next(iter(candidates))
        else:
            copies = -(-PROBE_BYTES // (shape[0] * shape[1] * jnp.dtype(dtype).itemsize))
            _chosen[key] = _measure(candidates, dtype, shape, copies)
    return _chosen[key]


def _measure(candidates, dtype, shape, copies) -> str:
    with jax.ensure_compile_time_eval():
        weights = [jnp.full(shape, 0.5 + i, dtype) for i in range(copies)]
        best, best_time = None, float("inf")
        for name, fn in candidates.items():
            run = jax.jit(lambda ws, fn=fn: [fn(w) for w in ws])
            jax.block_until_ready(run(weights))
            seconds = min(_timed(run, weights) for _ in range(3))
            if best is None:
                best, best_time = name, seconds * (1 - MARGIN)
            elif seconds < best_time:
                best, best_time = name, seconds
        return best


def _timed(run, weights) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(run(weights))
    return time.perf_counter() - t0
