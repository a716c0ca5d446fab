"""The constraints of constrained beam search as one automaton over static tables (transformers
4.53's ``PhrasalConstraint``, ``DisjunctiveConstraint`` and ``ConstraintListState``).

Each constraint is a trie of the token sequences that fulfil it: one sequence for a phrase
(``force_words_ids=[[ids]]``), several for a disjunction (``[[[ids], [ids]]]``), children in
the order their tokens were first inserted (a Python dict's, as 4.53's trie). All tries share
one node table. A beam's state, `State`, is 4.53's ``ConstraintListState`` after reading the
beam's whole sequence, prompt included: the constraints still pending in their list order, the
one in progress and its trie node; the others are complete. 4.53 recomputes it from the whole
sequence at every step; reading one token at a time gives the same state.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Constraint = tuple[tuple[int, ...], ...]  # the token sequences that fulfil it
DONE = np.iinfo(np.int32).max  # the order key of a constraint that is not pending


class Tables(NamedTuple):
    """child_token / child_node: int32[nodes, K], each node's children in order (-1: none);
    leaf: bool[nodes]; depth: int32[nodes]; root: int32[C]; seqlen: int32[C], the longest
    sequence of each constraint; max_seqlen: int (4.53's ``ConstraintListState.max_seqlen``)."""

    child_token: jax.Array
    child_node: jax.Array
    leaf: jax.Array
    depth: jax.Array
    root: jax.Array
    seqlen: jax.Array
    max_seqlen: int


class State(NamedTuple):
    """One beam's constraints, every field with the beams' leading dims: order: int32[..., C], a
    key that sorts the pending constraints in their list's order (`DONE` where not pending; one
    put back goes after the largest); progress: int32[...], the constraint in progress (-1: none);
    node: int32[...], its trie node."""

    order: jax.Array
    progress: jax.Array
    node: jax.Array


def tables(constraints: tuple[Constraint, ...]) -> Tables:
    """The shared node table of ``constraints`` (built at trace time, from static ids)."""
    children: list[dict[int, int]] = []
    depth, root = [], []
    for sequences in constraints:
        root.append(len(children))
        children.append({})
        depth.append(0)
        for seq in sequences:
            node = root[-1]
            for token in seq:
                if token not in children[node]:
                    children[node][token] = len(children)
                    children.append({})
                    depth.append(depth[node] + 1)
                node = children[node][token]
    k = max(len(c) for c in children)
    child_token = np.full((len(children), k), -1, np.int32)
    child_node = np.zeros((len(children), k), np.int32)
    for n, kids in enumerate(children):
        child_token[n, :len(kids)] = list(kids)
        child_node[n, :len(kids)] = list(kids.values())
    seqlen = [max(len(seq) for seq in sequences) for sequences in constraints]
    return Tables(jnp.asarray(child_token), jnp.asarray(child_node), jnp.asarray([not c for c in children]),
                  jnp.asarray(depth, jnp.int32), jnp.asarray(root, jnp.int32), jnp.asarray(seqlen, jnp.int32),
                  max(seqlen))


def start(t: Tables, shape: tuple[int, ...]) -> State:
    """Nothing read yet: every constraint pending, in the order given."""
    c = t.root.shape[0]
    return State(jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32), shape + (c,)),
                 jnp.full(shape, -1, jnp.int32), jnp.zeros(shape, jnp.int32))


def _child(t: Tables, node: jax.Array, token: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(whether ``token`` is a child of ``node``, that child's node)."""
    hit = t.child_token[node] == token[..., None]
    nodes = jnp.broadcast_to(t.child_node[node], hit.shape)
    return hit.any(-1), jnp.take_along_axis(nodes, jnp.argmax(hit, -1)[..., None], -1)[..., 0]


def completed(s: State) -> jax.Array:
    """bool[...]: every constraint complete (4.53's ``ConstraintListState.completed``)."""
    return (s.order == DONE).all(-1) & (s.progress < 0)


def add(t: Tables, s: State, token: jax.Array) -> State:
    """4.53's ``ConstraintListState.add(token)``. In progress: a child of its node steps (a leaf
    completes it), any other token drops it back to the end of the pending list, the token lost.
    Otherwise the first pending constraint in list order that the token starts takes it."""
    # the constraint in progress
    stepped, child = _child(t, s.node, token)
    tail = jnp.max(jnp.where(s.order == DONE, -1, s.order), -1) + 1
    dropped = jnp.where(jnp.arange(s.order.shape[-1]) == s.progress[..., None], tail[..., None], s.order)
    busy = (jnp.where(stepped[..., None], s.order, dropped),
            jnp.where(stepped & ~t.leaf[child], s.progress, -1), jnp.where(stepped, child, s.node))
    # a pending constraint starts
    starts, first = _child(t, t.root, token[..., None])  # [..., C]
    keyed = jnp.where(starts & (s.order != DONE), s.order, DONE)
    c = jnp.argmin(keyed, -1)
    found = jnp.min(keyed, -1) != DONE
    node = jnp.take_along_axis(first, c[..., None], -1)[..., 0]
    taken = jnp.where(jnp.arange(s.order.shape[-1]) == c[..., None], DONE, s.order)
    idle = (jnp.where(found[..., None], taken, s.order), jnp.where(found & ~t.leaf[node], c, -1),
            jnp.where(found, node, s.node))
    return _where(completed(s), s, _where(s.progress >= 0, State(*busy), State(*idle)))


def _where(cond: jax.Array, a: State, b: State) -> State:
    """Per beam: ``a`` where ``cond`` (bool[...]), else ``b``."""
    return State(*(jnp.where(cond.reshape(cond.shape + (1,) * (x.ndim - cond.ndim)), x, y) for x, y in zip(a, b)))


def _complete(s: State) -> jax.Array:
    """int32[...]: how many constraints are complete (neither pending nor in progress)."""
    return (s.order == DONE).sum(-1) - (s.progress >= 0)


def bank(t: Tables, s: State) -> jax.Array:
    """int32[...]: 4.53's ``get_bank``: ``max_seqlen`` for each complete constraint, plus, for the
    one in progress, ``max_seqlen`` less the steps its longest sequence has left."""
    remaining = t.seqlen[jnp.maximum(s.progress, 0)] - t.depth[s.node]
    return _complete(s) * t.max_seqlen + jnp.where(s.progress >= 0, t.max_seqlen - remaining, 0)


def advances(t: Tables, s: State) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The tokens 4.53's ``advance()`` lists for each beam, and the bank of the beam that each
    extends, as 4.53 computes it: (tokens int32[..., A], listed bool[..., A], banks int32[..., A]).

    Without a constraint in progress: the first tokens of the pending ones, in list order. With
    one: its node's children. 4.53 extends a beam by each on a copy of its state, but a
    disjunctive constraint's copy shares the list of tokens it has read with the original: the
    first child extends that list, and each later one is read after it (almost always dropping
    the constraint: its bank counts the complete ones alone); the banks of the copies in progress
    are read after all of them, at the list's final length.
    """
    c, k = t.root.shape[0], t.child_token.shape[1]
    rank = jnp.argsort(s.order, -1)  # pending constraints first, in list order
    pending = jnp.take_along_axis(s.order, rank, -1) != DONE
    roots = t.child_token[t.root[rank]]  # [..., C, K]
    idle = (roots.reshape(*roots.shape[:-2], c * k), (pending[..., None] & (roots >= 0)).reshape(*roots.shape[:-2], -1))
    # the constraint in progress: its children, read one after another into the shared list
    kids = t.child_token[s.node]  # [..., K]
    node, steps, finished = s.node, [], []
    for j in range(k):
        ok, child = _child(t, node, kids[..., j])
        ok &= kids[..., j] >= 0
        steps.append(ok)
        finished.append(ok & t.leaf[child])
        node = jnp.where(ok, child, node)
    remaining = t.seqlen[jnp.maximum(s.progress, 0)] - t.depth[node]  # at the list's final length
    steps, finished = jnp.stack(steps, -1), jnp.stack(finished, -1)
    busy_banks = _complete(s)[..., None] * t.max_seqlen + jnp.where(
        finished, t.max_seqlen, jnp.where(steps, t.max_seqlen - remaining[..., None], 0))
    widen = lambda x, fill=0: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, c * k - k)], constant_values=fill)  # noqa: E731
    listed_busy, tokens_busy, busy_banks = widen(kids >= 0), widen(kids, -1), widen(busy_banks)
    # without one: each token starts a fresh copy of its constraint
    copies = State(*(jnp.repeat(jnp.expand_dims(a, s.progress.ndim), c * k, axis=s.progress.ndim) for a in s))
    fresh = add(t, copies, jnp.maximum(idle[0], 0))
    idle_banks = bank(t, fresh)
    in_progress = (s.progress >= 0)[..., None]
    return (jnp.where(in_progress, tokens_busy, idle[0]), jnp.where(in_progress, listed_busy, idle[1]),
            jnp.where(in_progress, busy_banks, idle_banks))
