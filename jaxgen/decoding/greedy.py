"""Greedy search and multinomial sampling: one token per row per step (transformers' ``_sample``),
and DoLa decoding, either of them on contrasted scores (`jaxgen.decoding.dola`), or guided by an
unconditional branch (classifier-free guidance, `jaxgen.decoding.guidance`).

The two differ only in how a token is picked from the processed scores (``argmax`` or a draw
from their softmax), so they share this one ``lax.while_loop``. Rows that produced an EOS keep
emitting ``pad_token_id``; the loop stops when every row is done or after ``max_new_tokens``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxgen.decoding import dola, engine, guidance, select
from jaxgen.decoding.engine import DecodeSpec
from jaxgen.models.cache import KVCache
from jaxgen.models.model import CausalLM
from jaxgen.outputs import GenerateOutput, LayerRecord


@struct.dataclass
class TokenState:
    """Loop carry. ``rows`` = batch x num_return_sequences.

    step: int32[] tokens generated so far; sequences: int32[rows, P + N];
    logits: float32[rows, V] raw logits for token ``step``; cache; positions: int32[rows];
    unfinished: bool[rows]; done: bool[]; scores / raw_logits: float32[N, rows, V] or None;
    layers: attentions and hidden states (`LayerRecord`) or None; premature: float32[C, rows, V],
    DoLa's candidate layers' logits for token ``step``, or None; unconditional: classifier-free
    guidance's branch (`guidance.Unconditional`), or None.
    """

    step: jax.Array
    sequences: jax.Array
    logits: jax.Array
    cache: KVCache
    positions: jax.Array
    unfinished: jax.Array
    done: jax.Array
    scores: jax.Array | None
    raw_logits: jax.Array | None
    layers: LayerRecord | None
    premature: jax.Array | None
    unconditional: guidance.Unconditional | None


def select_token(scores: jax.Array, key: jax.Array | None, step: jax.Array, do_sample: bool) -> jax.Array:
    """int32[rows]: argmax, or one draw per row from ``softmax(scores)`` (key folded with step)."""
    if not do_sample:
        return select.first_argmax(scores)
    return select.categorical(jax.random.fold_in(key, step), scores)


def decode(model: CausalLM, input_ids, attention_mask, prompt_len, processors, key, streamer_id,
           spec: DecodeSpec, guided: guidance.Guidance | None = None) -> GenerateOutput:
    """Greedy / sampling decode of ``input_ids: int32[batch, P]`` (left-padded to the bucket)."""
    pre = engine.prefill(model, input_ids, attention_mask, prompt_len, spec, spec.num_return_sequences)
    outputs, premature = dola.split(model, pre.outputs, spec.dola_layers, spec.asked_layers, spec.row_shards)
    pre = pre.replace(outputs=outputs)
    rows, vocab = pre.logits.shape
    state = TokenState(
        step=jnp.zeros((), jnp.int32),
        sequences=engine.initial_sequences(jnp.repeat(input_ids, spec.num_return_sequences, 0), spec,
                                           spec.pad_token_id if spec.pad_token_id is not None else 0),
        logits=pre.logits,
        cache=pre.cache,
        positions=pre.positions,
        unfinished=jnp.ones((rows,), bool),
        done=jnp.zeros((), bool),
        scores=engine.score_buffer(spec.output_scores, spec, rows, vocab),
        raw_logits=engine.score_buffer(spec.output_logits, spec, rows, vocab),
        layers=engine.layer_record(model, pre, spec),
        premature=premature,
        unconditional=None if guided is None else guidance.start(
            model, guided, jnp.repeat(input_ids[:, -1], spec.num_return_sequences), spec.max_new_tokens),
    )

    def choose(s: TokenState) -> TokenState:
        logits = s.logits if s.premature is None else dola.contrast(s.logits, s.premature)
        if s.unconditional is not None:
            logits = guidance.guide(logits, s.unconditional, guided.scale)
        scores = engine.process(processors, logits, s.sequences, s.step, prompt_len, pre.pad_lengths, spec)
        tokens = select_token(scores, key, s.step, spec.do_sample)
        sequences, unfinished = engine.emit(tokens, s.sequences, s.unfinished, s.step, prompt_len, streamer_id, spec)
        done = ~jnp.any(unfinished) | (s.step + 1 >= spec.max_new_tokens)
        return s.replace(
            step=s.step + 1, sequences=sequences, unfinished=unfinished, done=done,
            scores=engine.record(s.scores, s.step, scores), raw_logits=engine.record(s.raw_logits, s.step, s.logits),
        )

    def advance(s: TokenState) -> TokenState:
        column = spec.bucket_len + s.step - 1
        tokens = jax.lax.dynamic_index_in_dim(s.sequences, column, axis=1, keepdims=False)
        redo = None
        if spec.recompute:
            redo = (engine.recomputes(model, prompt_len, s.step, spec), s.sequences, pre.kv_mask)
        logits, cache, outputs = engine.decode_step(model, tokens, s.positions, pre.kv_mask, s.cache, column, spec,
                                                    redo)
        outputs, premature = dola.split(model, outputs, spec.dola_layers, spec.asked_layers, spec.row_shards)
        unconditional = None if s.unconditional is None else guidance.step(model, s.unconditional, tokens)
        return s.replace(logits=logits, cache=cache, positions=s.positions + 1, premature=premature,
                         unconditional=unconditional, layers=engine.record_layers(s.layers, s.step, outputs))

    final = engine.run_loop(state, choose, advance, spec)
    return GenerateOutput(
        sequences=final.sequences, num_steps=final.step, scores=final.scores, logits=final.raw_logits,
        sequences_scores=None, beam_indices=None, layers=final.layers,
        prompt_len=prompt_len, bucket_len=spec.bucket_len, output_scores=spec.output_scores,
    )
