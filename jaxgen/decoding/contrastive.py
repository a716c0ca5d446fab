"""Contrastive search (``penalty_alpha > 0`` with ``top_k > 1``, as transformers 4.53's
``_contrastive_search``, which transformers 5.x moved to the hub).

Each step takes the ``K = top_k`` most probable tokens of the processed scores as candidates,
feeds all of them in one forward pass, and keeps the one with the best ``(1 - alpha) *
probability - alpha * degeneration penalty``: the penalty is the largest cosine similarity
between the candidate's last hidden state (after the final norm) and those of its context, the
prompt's unmasked positions and the tokens chosen so far. The chosen candidate's logits score the
next step, and its keys and values stay in the cache (a finished row keeps feeding its candidates
while it emits ``pad_token_id``, as transformers).

The ``K`` candidates of a prompt are a group of the beam search cache (`KVCache`): they share the
prompt's slots and each writes its candidate into its own row; ``history`` says which row of the
group holds each chosen token, so keeping a candidate moves nothing. Only the chosen candidate's
hidden state goes through the LM head; its attentions and hidden states, when asked, are the
step's (4.53's: the forward pass that gives the next token's logits, as greedy search's).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxgen.decoding import beam, engine, select
from jaxgen.decoding.engine import DecodeSpec
from jaxgen.models.cache import KVCache
from jaxgen.models.model import CausalLM, forward
from jaxgen.models.model import logits as logits_of
from jaxgen.outputs import GenerateOutput, LayerRecord


@struct.dataclass
class ContrastiveState:
    """Loop carry. ``B`` prompts, ``K`` candidates, ``S = P + N`` slots.

    sequences: int32[B, S]; logits: float32[B, V], the raw logits of token ``step``; cache: ``B``
    groups of ``K`` rows; history: int32[B, S], the row of its group that holds each chosen slot
    (prompt slots are shared); context: dtype[B, S, d], the last hidden state of the prompt's
    positions and of each chosen token; positions: int32[B]; unfinished: bool[B]; done: bool[];
    scores / raw_logits: float32[N, B, V] or None; layers: the chosen candidates' attentions and
    hidden states (`LayerRecord`), or None.
    """

    step: jax.Array
    sequences: jax.Array
    logits: jax.Array
    cache: KVCache
    history: jax.Array
    context: jax.Array
    positions: jax.Array
    unfinished: jax.Array
    done: jax.Array
    scores: jax.Array | None
    raw_logits: jax.Array | None
    layers: LayerRecord | None


def degeneration_penalty(context: jax.Array, candidates: jax.Array, valid: jax.Array) -> jax.Array:
    """float32[B, K]: each candidate's largest cosine similarity to a valid context position.
    context: [B, S, d]; candidates: [B, K, d]; valid: bool[B, S]."""
    def unit(x):
        x = x.astype(jnp.float32)
        return x / jnp.linalg.norm(x, axis=-1, keepdims=True)

    cosine = jnp.einsum("bsd,bkd->bks", unit(context), unit(candidates))
    return jnp.where(valid[:, None, :], cosine, jnp.finfo(jnp.float32).min).max(-1)


def decode(model: CausalLM, input_ids, attention_mask, prompt_len, processors, penalty_alpha, streamer_id,
           spec: DecodeSpec) -> GenerateOutput:
    """Contrastive search over ``input_ids: int32[batch, P]`` (left-padded to the bucket)."""
    batch, k, n = input_ids.shape[0], spec.contrastive, spec.max_new_tokens
    pre = engine.prefill(model, input_ids, attention_mask, prompt_len, spec, k, share_prompt=True, keep_hidden=True)
    logits, positions, pad_lengths = pre.logits[::k], pre.positions[::k], pre.pad_lengths[::k]  # one row a prompt
    vocab, total = logits.shape[-1], spec.total_len
    own = jnp.arange(k, dtype=jnp.int32)
    state = ContrastiveState(
        step=jnp.zeros((), jnp.int32),
        sequences=engine.initial_sequences(input_ids, spec, spec.pad_token_id if spec.pad_token_id is not None else 0),
        logits=logits,
        cache=pre.cache,
        history=jnp.zeros((batch, total), jnp.int32),
        context=jnp.pad(pre.hidden, ((0, 0), (0, n), (0, 0))),
        positions=positions,
        unfinished=jnp.ones((batch,), bool),
        done=jnp.zeros((), bool),
        scores=engine.score_buffer(spec.output_scores, spec, batch, vocab),
        raw_logits=engine.score_buffer(spec.output_logits, spec, batch, vocab),
        layers=engine.layer_record(model, pre.replace(outputs=jax.tree.map(lambda x: x[::k], pre.outputs)), spec),
    )

    def step(s: ContrastiveState) -> ContrastiveState:
        column = spec.bucket_len + s.step
        scores = engine.process(processors, s.logits, s.sequences, s.step, prompt_len, pad_lengths, spec)
        top_probs, top_ids = select.top_k(jax.nn.softmax(scores, axis=-1), k)  # [B, K]

        # Every candidate in one pass: row r of a group feeds candidate r at `column` and reads
        # the chosen tokens before it from the rows that hold them.
        holder = jnp.where(jnp.arange(total) == column, own[:, None], s.history[:, None, :])  # [B, K, S]
        hidden, cache, *outputs = forward(model, top_ids.reshape(-1, 1), jnp.repeat(s.positions, k)[:, None],
                                          beam.group_reads(pre.kv_mask, holder), s.cache, column, spec.row_shards,
                                          spec.capture)
        hidden = hidden.reshape(batch, k, -1)
        valid = pre.kv_mask & (jnp.arange(total) < column)
        ranking = (1.0 - penalty_alpha) * top_probs - penalty_alpha * degeneration_penalty(s.context, hidden, valid)
        chosen = select.first_argmax(ranking)
        chosen_hidden = jnp.take_along_axis(hidden, chosen[:, None, None], axis=1)[:, 0]  # [B, d]

        tokens = jnp.take_along_axis(top_ids, chosen[:, None], axis=1)[:, 0]
        layers = s.layers
        if layers is not None:  # the chosen candidate's pass gives token step + 1's logits (none after the last)
            picked = jax.tree.map(lambda x: x.reshape(batch, k, *x.shape[1:])[jnp.arange(batch), chosen], outputs[0])
            layers = jax.lax.cond(s.step + 1 < n, lambda r: r.record(s.step + 1, picked), lambda r: r, layers)
        sequences, unfinished = engine.emit(tokens, s.sequences, s.unfinished, s.step, prompt_len, streamer_id, spec)
        return s.replace(
            step=s.step + 1, sequences=sequences, logits=logits_of(model, chosen_hidden, spec.row_shards),
            cache=engine.pin_cache(cache, spec),
            history=jax.lax.dynamic_update_index_in_dim(s.history, chosen, column, 1),
            context=jax.lax.dynamic_update_index_in_dim(s.context, chosen_hidden, column, 1),
            positions=s.positions + 1, unfinished=unfinished, done=~jnp.any(unfinished) | (s.step + 1 >= n),
            scores=engine.record(s.scores, s.step, scores), raw_logits=engine.record(s.raw_logits, s.step, s.logits),
            layers=layers,
        )

    final = engine.run_loop(state, step, None, spec)
    return GenerateOutput(
        sequences=final.sequences, num_steps=final.step, scores=final.scores, logits=final.raw_logits,
        layers=final.layers, prompt_len=prompt_len, bucket_len=spec.bucket_len, output_scores=spec.output_scores,
    )
