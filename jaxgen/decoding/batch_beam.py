"""Beam search in continuous batching: a request of ``K = num_beams`` beams takes a group of K
decode rows of `jaxgen.decoding.batch` and runs transformers' beam search (`beam.decode`'s
step, the same constants and order of operations) at its own length, while other groups decode
other requests; a group whose search ends takes the next request.

Each beam is a row of the batch's cache at the group's length. When beams reorder, the rows of
the cache are gathered into their new order (as transformers' ``reorder_cache``): a copy of the
cache a step, which `beam.decode`'s grouped cache avoids by pointing each beam at its history,
a layout whose write slot is shared by the whole batch.

Shapes: ``G`` groups of ``K`` rows (``R = G * K``), ``S`` slots, ``N`` the most new tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxgen.decoding import beam, engine
from jaxgen.decoding.beam import BIG, _gather


@struct.dataclass
class BeamGroups:
    """The beam search state of every group beside its running beams (the rows' tokens and
    log-probs). running_scores: float32[G, K] summed log-probs of the running beams; the
    finished hypotheses: tokens int32[G, K, S], logprobs float32[G, K, N] (each token's processed
    log-prob), scores float32[G, K] (length-penalised), generated int32[G, K] (their new tokens),
    stopped bool[G, K] (ended on EOS or a stop sequence), finished bool[G, K] (transformers'
    ``is_sent_finished``); improvable: bool[G, 1] (its early-stop heuristic); length_penalty:
    float32[G], the request's."""

    running_scores: jax.Array
    tokens: jax.Array
    logprobs: jax.Array
    scores: jax.Array
    generated: jax.Array
    stopped: jax.Array
    finished: jax.Array
    improvable: jax.Array
    length_penalty: jax.Array

    @classmethod
    def empty(cls, groups: int, beams: int, slots: int, n: int) -> "BeamGroups":
        return cls(running_scores=jnp.zeros((groups, beams), jnp.float32),
                   tokens=jnp.zeros((groups, beams, slots), jnp.int32),
                   logprobs=jnp.zeros((groups, beams, n), jnp.float32),
                   scores=jnp.full((groups, beams), BIG, jnp.float32),
                   generated=jnp.zeros((groups, beams), jnp.int32), stopped=jnp.zeros((groups, beams), bool),
                   finished=jnp.zeros((groups, beams), bool), improvable=jnp.ones((groups, 1), bool),
                   length_penalty=jnp.ones((groups,), jnp.float32))

    def start(self, group, length_penalty) -> "BeamGroups":
        """Group ``group`` begins a request: only its first beam runs, nothing has finished."""
        _, beams, slots = self.tokens.shape
        fresh = BeamGroups.empty(1, beams, slots, self.logprobs.shape[2])
        fresh = fresh.replace(running_scores=fresh.running_scores.at[:, 1:].set(BIG),
                              length_penalty=jnp.reshape(length_penalty, (1,)).astype(jnp.float32))
        return jax.tree.map(lambda all_, one: jax.lax.dynamic_update_index_in_dim(all_, one[0], group, 0),
                            self, fresh)

    def best(self):
        """The best hypothesis of every group: (tokens int32[G, S], logprobs float32[G, N], score
        float32[G], generated int32[G], stopped bool[G])."""
        return self.tokens[:, 0], self.logprobs[:, 0], self.scores[:, 0], self.generated[:, 0], self.stopped[:, 0]


def step(x, log_probs: jax.Array, spec) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, BeamGroups, jax.Array]:
    """One beam search step of every active group (`beam.decode`'s ``choose``, per group at its
    own step). ``x``: the batch's `Rows` (its ``beams`` a `BeamGroups`); log_probs:
    float32[R, V], the rows' processed log-softmax. Returns the running beams' (tokens int32[R,
    S], logprobs float32[R, N]), the token each row feeds next int32[R], the row each row's beam
    comes from int32[R] (the cache's new order), the `BeamGroups`, and which groups ended:
    bool[G]."""
    k, n_rows, slots = spec.num_beams, spec.rows, spec.slots
    g, vocab, n = n_rows // k, log_probs.shape[-1], spec.max_new_tokens
    keep = beam.candidates_kept(spec.eos_token_ids, k)
    b = x.beams
    per_group = lambda a: a.reshape(g, k)[:, 0]  # noqa: E731  (every row of a group alike)
    length, generated, budget, active = map(per_group, (x.length, x.generated, x.budget, x.active))
    seqs, lps = x.tokens.reshape(g, k, slots), x.logprobs.reshape(g, k, n)
    flat = log_probs.reshape(g, k * vocab)
    acc = (log_probs.reshape(g, k, vocab) + b.running_scores[:, :, None]).reshape(g, -1)

    topk_log_probs, topk_idx = beam._top_candidates(acc, keep, None, None, False, k)
    src, tokens = (topk_idx // vocab).astype(jnp.int32), (topk_idx % vocab).astype(jnp.int32)
    column = jnp.minimum(length, slots - 1)
    put = jax.vmap(lambda a, at, v: jax.lax.dynamic_update_index_in_dim(a, v, at, axis=1))  # a[:, at] = v
    topk_seqs = put(_gather(seqs, src), column, tokens)
    topk_lps = put(_gather(lps, src), jnp.minimum(generated, n - 1), jnp.take_along_axis(flat, topk_idx, 1))
    stops = jax.vmap(jax.vmap(lambda row, c: engine.hits_stop(row, c, 0, spec), (0, None)))(topk_seqs, column)
    hits = stops | (generated + 1 >= budget)[:, None]

    # Beams that keep running.
    running_log_probs = topk_log_probs + hits.astype(jnp.float32) * BIG
    next_idx = jax.lax.top_k(running_log_probs, k)[1]
    running_seqs, running_scores = _gather(topk_seqs, next_idx), _gather(running_log_probs, next_idx)
    running_lps = _gather(topk_lps, next_idx)

    # Beams that finish now, merged with those finished before.
    steps, lp = (generated + 1)[:, None], b.length_penalty[:, None]  # [G, 1]
    finished_scores, did_finish = beam.finishing(topk_log_probs, hits, b.finished, b.improvable, steps, lp,
                                                 spec.early_stopping, k)
    merged = jnp.concatenate([b.scores, finished_scores], axis=1)
    best = jax.lax.top_k(merged, k)[1]
    pick = lambda old, new: _gather(jnp.concatenate([old, new], 1), best)  # noqa: E731
    new_generated = jnp.broadcast_to(steps, (g, keep))
    hyps = b.replace(tokens=pick(b.tokens, topk_seqs), logprobs=pick(b.logprobs, topk_lps),
                     scores=_gather(merged, best), generated=pick(b.generated, new_generated),
                     stopped=pick(b.stopped, stops), finished=pick(b.finished, did_finish))

    improvable = beam.still_improvable(running_scores, hyps.scores, hyps.finished, b.improvable, steps, lp,
                                       spec.early_stopping, budget[:, None])
    open_beam = ~(jnp.all(hyps.finished, axis=1) & (spec.early_stopping is True))
    ended = active & ~(improvable[:, 0] & open_beam & ~jnp.all(hits, axis=1))

    # Inactive groups keep everything.
    keep_old = lambda new, old: jnp.where(active.reshape((g,) + (1,) * (new.ndim - 1)), new, old)  # noqa: E731
    beams = jax.tree.map(keep_old, hyps.replace(running_scores=running_scores, improvable=improvable), b)
    running_seqs, running_lps = keep_old(running_seqs, seqs), keep_old(running_lps, lps)
    origin = _gather(src, next_idx) + jnp.arange(g, dtype=jnp.int32)[:, None] * k  # [G, K] rows
    origin = jnp.where(active[:, None], origin, jnp.arange(n_rows, dtype=jnp.int32).reshape(g, k))
    fed = jnp.take_along_axis(running_seqs, column[:, None, None], 2)[..., 0]
    return (running_seqs.reshape(n_rows, slots), running_lps.reshape(n_rows, n), fed.reshape(-1), origin.reshape(-1),
            beams, ended)
