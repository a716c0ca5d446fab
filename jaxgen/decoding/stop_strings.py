"""transformers' ``StopStringCriteria`` inside the compiled loop: ``stop_strings`` with the
``tokenizer`` that spells them.

A row stops when the text its last tokens spell ends with a stop string, wherever the tokens'
boundaries fall. transformers prepares, from the tokenizer's vocabulary, a table of where each
token can sit inside each stop string (its ``embedding_vec``) and checks the last tokens against
it with a few array operations. jaxgen takes the table transformers builds (`StopStrings.build`,
on the host) and runs the same check in the loop (`StopStrings.hits`), so both stop on the same
tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class StopStrings:
    """The stop strings and transformers' table for them (static: part of the compiled program).

    table: int32[T, S * (P + E) + 1]: per token id, where it can end inside each of the ``S``
    strings read backwards (``P`` = positions slots), by how many characters it can overlap each
    string's end (``E`` = ends slots), then its length; lengths: each string's length; window: the
    most tokens a match can span."""

    strings: tuple[str, ...]
    table: np.ndarray
    positions: int
    ends: int
    lengths: tuple[int, ...]
    window: int
    digest: str  # of the table: two tokenizers' tables differ

    def _key(self):
        return self.strings, self.digest, self.positions, self.ends, self.lengths, self.window

    def __eq__(self, other):
        return isinstance(other, StopStrings) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    @staticmethod
    def build(tokenizer, strings: tuple[str, ...]) -> StopStrings:
        """transformers' table for ``strings`` in ``tokenizer``'s vocabulary (transformers builds
        it with torch), kept for the tokenizer at its size: every request of a dataset job asks
        for the same, and a token added to the tokenizer makes another."""
        try:
            return _built(tokenizer, len(tokenizer), strings)
        except TypeError:  # a tokenizer that cannot key a cache
            return _built.__wrapped__(tokenizer, len(tokenizer), strings)

    def hits(self, sequences: jax.Array, column: jax.Array, first_column) -> jax.Array:
        """bool[...]: the tokens of ``sequences: int32[..., L]`` ending at ``column`` (none before
        ``first_column``) spell text that ends with one of the strings (transformers'
        ``StopStringCriteria.__call__``, on the last ``window`` tokens read backwards; an empty
        string, as there, stops every row)."""
        m, s, p, e = self.window, len(self.strings), self.positions, self.ends
        if m == 0:  # every string is empty
            return jnp.ones(sequences.shape[:-1], bool)
        cols = column - jnp.arange(m)  # the most recent token first
        ids = jnp.take(sequences, jnp.maximum(cols, 0), axis=-1)
        table = jnp.asarray(self.table)
        embedded = table[jnp.minimum(ids, table.shape[0] - 1)]  # [..., m, s * (p + e) + 1]
        batch = embedded.shape[:-2]
        positions = embedded[..., 1:, :p * s].reshape(*batch, m - 1, s, p)
        end_lengths = embedded[..., :1, p * s:-1].reshape(*batch, 1, s, e)
        lengths = jnp.broadcast_to(embedded[..., 1:, None, -1:], (*batch, m - 1, s, e))
        spelled = jnp.cumsum(jnp.concatenate([end_lengths, lengths], -3), axis=-3)  # [..., m, s, e]
        later = (spelled[..., :-1, :, None, :] == positions[..., :, :, :, None]).any(-2)
        match = jnp.concatenate([end_lengths > 0, later], -3) & (cols >= first_column)[:, None, None]
        unbroken = jnp.cumsum(~match, axis=-3) == 0
        return (jnp.max(spelled * unbroken, axis=(-3, -1)) >= jnp.asarray(self.lengths)).any(-1)


@functools.lru_cache(maxsize=8)
def _built(tokenizer, size: int, strings: tuple[str, ...]) -> StopStrings:
    """`StopStrings.build` for ``tokenizer`` at ``size`` tokens."""
    from transformers.generation.stopping_criteria import StopStringCriteria

    c = StopStringCriteria(tokenizer, list(strings))
    table = np.ascontiguousarray(c.embedding_vec.numpy().astype(np.int32))
    return StopStrings(tuple(strings), table, int(c.max_valid_positions), int(c.max_valid_end_lens),
                       tuple(int(n) for n in c.target_lens.tolist()), int(c.maximum_token_len),
                       hashlib.sha1(table.tobytes()).hexdigest())
