"""The step machinery every decoder shares: prefill, one cached token step, processors, buffers.

Shapes (``rows`` = batch x beams or batch x return sequences, ``P`` = bucketed prompt length,
``N`` = max_new_tokens, ``V`` = vocab):

- the token buffer ``sequences: int32[rows, P + N]``: prompt in ``[:P]``, step ``i``'s token at
  column ``P + i``;
- the KV cache: slot ``j`` holds the token of buffer column ``j`` (beam search: of the row that
  computed it; see `jaxgen.models.cache.KVCache`); it has ``P + N`` slots in the last phase of
  the loop, fewer before (`DecodeSpec.phase_ends`);
- ``kv_mask: bool[rows, P + N]``: prompt mask, then ones (transformers keeps attending to
  generated tokens, pads of finished rows included);
- position ids continue from the prompt's last real position, one per generated token.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.experimental import io_callback

from jaxgen import sharding
from jaxgen.decoding.stop_strings import StopStrings
from jaxgen.models.cache import KVCache
from jaxgen.models.model import Capture, CausalLM, LayerOutputs, forward, positions_from_mask
from jaxgen.models.model import logits as logits_of
from jaxgen.outputs import LayerRecord
from jaxgen.processors import ProcessorContext, apply


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
    """Everything static about one decode: shapes and strategy flags (part of the jit key).

    The prompt length as passed (``L <= P``) is not in it: it is a traced scalar, so prompts
    of every length in a bucket share one compiled program.
    """

    bucket_len: int  # P: prompt length after left-padding to the bucket
    max_new_tokens: int  # N
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None
    stop_sequences: tuple[tuple[int, ...], ...] = ()
    stop_strings: StopStrings | None = None  # transformers' stop_strings, with their tokenizer's table
    do_sample: bool = False
    num_beams: int = 1
    beam_search: bool = False
    num_beam_groups: int = 1  # group (diverse) beam search when > 1 (`jaxgen.decoding.group_beam`)
    num_return_sequences: int = 1
    early_stopping: bool | str = False
    output_scores: bool = False
    output_logits: bool = False
    output_attentions: bool = False
    output_hidden_states: tuple[int, ...] | None = None  # indices of the n_layers + 1 hidden states (`Capture`)
    stream: bool = False  # call the registered streamer's put() from inside the loop
    mesh: jax.sharding.Mesh | None = None  # rows split along data_axis, heads along model_axis
    data_axis: str | None = None
    model_axis: str | None = None
    phases: int = 1  # of the decode loop, see `loop_phases`
    recompute: bool = False  # the sequence reaches config.recompute_at during this call (`recomputes`)
    contrastive: int = 0  # contrastive search: candidates per step (top_k; `jaxgen.decoding.contrastive`)
    lookup: int = 0  # assisted decoding: the most tokens drafted per forward (`jaxgen.decoding.lookup`)
    lookup_ngram: int = 0  # prompt lookup: the longest n-gram it matches (0: a draft model drafts)
    lookup_schedule: bool = False  # the draft length follows transformers' heuristic schedule
    lookup_confidence: bool = False  # a draft stops after a token below its confidence threshold
    dola_layers: tuple[int, ...] = ()  # DoLa: the hidden states it contrasts (`jaxgen.decoding.dola`)
    # constrained beam search: each constraint's token sequences (`jaxgen.decoding.constraints`)
    constraints: tuple[tuple[tuple[int, ...], ...], ...] = ()

    @property
    def finishes_rows(self) -> bool:
        """Whether rows can finish before ``max_new_tokens`` (EOS ids or stops)."""
        return bool(self.eos_token_ids or self.stop_sequences or self.stop_strings)

    @property
    def total_len(self) -> int:
        return self.bucket_len + self.max_new_tokens

    @property
    def capture(self) -> Capture | None:
        """What each forward pass returns beside its logits, or None: the attentions and hidden
        states asked for, then DoLa's candidate layers' hidden states (`dola.split` parts them)."""
        if not self.output_attentions and self.output_hidden_states is None and not self.dola_layers:
            return None
        hidden = self.output_hidden_states
        if self.dola_layers:
            hidden = (hidden or ()) + self.dola_layers
        return Capture(self.output_attentions, hidden)

    @property
    def asked_layers(self) -> bool:
        """Whether the call asks for attentions or hidden states (`LayerRecord`)."""
        return self.output_attentions or self.output_hidden_states is not None

    @property
    def row_shards(self) -> int:
        """How many devices split the rows (`model.forward`'s ``row_shards``)."""
        return 1 if self.mesh is None else sharding.axis_size(self.mesh, self.data_axis)

    @property
    def phase_ends(self) -> tuple[int, ...]:
        """The decode loop runs in ``phases`` equal phases (`loop_phases`); phase ``i`` ends once
        ``phase_ends[i]`` tokens are generated, and its cache has ``P + phase_ends[i]`` slots."""
        return tuple(self.max_new_tokens * (i + 1) // self.phases for i in range(self.phases))


def loop_phases(model: CausalLM, batch: int, spec: DecodeSpec) -> int:
    """How many phases the decode loop of ``batch`` prompts runs in (`DecodeSpec.phase_ends`).

    A phase's steps attend over the cache slots written by its end, not all ``P + N``. That pays
    when the cache is large next to the weights (the other big read of a step) and each phase has
    steps enough to amortise its cost: one more compiled loop body and a copy of the cache as it
    grows. So: ``round(8 x cache bytes / weight bytes)``, 1 to 4 phases of at least 16 steps.
    GPT-2 124M on 2 CPU cores, 32 + 64 tokens: beam 4 at batch 8 (cache 0.34x the weights) runs 3
    phases, 63.6 -> 60.9 ms a step, first call +1.5 s; greedy at batch 8 (0.11x) runs one.
    On 2 Zen 5 cores, 32 + 256 tokens: greedy at batch 8 (0.34x) 25.3 ms a step in one phase,
    23.6 in three; beam 4 at batch 1 (0.16x) runs one, and four would take 20.1 -> 18.7 ms a step
    for 1.7 s more compile (0.35 s saved a call: a net loss for a script that calls once).
    """
    group = spec.num_beams if spec.beam_search else spec.contrastive  # rows sharing a prompt
    slots = batch * (spec.bucket_len + spec.max_new_tokens * group) if group else (
        batch * spec.num_return_sequences * spec.total_len)
    cache = model.config.kv_bytes_per_slot * slots
    weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(model.params))
    return max(1, min(4, spec.max_new_tokens // 16, round(8 * cache / weights)))


@struct.dataclass
class Prefilled:
    """The prompt after one forward pass, expanded to ``rows = batch * expand``.

    logits: float32[rows, V] for the first generated token; cache: the filled KV cache, either
    ``rows`` rows of one (``share_prompt=False``) or ``batch`` groups of ``expand`` rows that
    share the prompt's ``P`` slots, stored once per group (``share_prompt=True``); kv_mask:
    bool[rows, P + N] (bool[batch, P + N] when shared); positions: int32[rows], position id of
    the next token; pad_lengths: int32[rows], left padding of each prompt as passed (its first
    unmasked column, as transformers' ``padding_lengths``); outputs: the prompt's `LayerOutputs`
    per row when ``spec.capture`` asks for them, else None; hidden: dtype[batch, P, d], the
    prompt's last hidden states (after the final norm, one row a prompt), when asked, else None.
    """

    logits: jax.Array
    cache: KVCache
    kv_mask: jax.Array
    positions: jax.Array
    pad_lengths: jax.Array
    outputs: LayerOutputs | None = None
    hidden: jax.Array | None = None


def prefill(model: CausalLM, input_ids: jax.Array, attention_mask: jax.Array, prompt_len: jax.Array, spec: DecodeSpec,
            expand: int, share_prompt: bool = False, rings: bool = True, keep_hidden: bool = False) -> Prefilled:
    """One forward over ``input_ids: int32[batch, P]``; every row then repeated ``expand`` times
    (consecutive copies, as transformers' ``repeat_interleave``) or, with ``share_prompt``, the
    cache grouped by ``expand`` rows that all read the prompt's slots, stored once per group.
    ``prompt_len``: int32[], L. The prompt's keys and values are written into a cache of the final
    layout, so neither the cache nor its prompt part is copied afterwards. ``rings=False``: no
    sliding layer keeps a ring (for a decoder that writes several slots a step, or one that
    returns attention weights over every slot). ``keep_hidden``: `Prefilled.hidden` too."""
    def rows(x):
        return jnp.repeat(x, expand, axis=0)

    batch = input_ids.shape[0]
    input_ids, attention_mask = pin_rows(input_ids, spec), pin_rows(attention_mask, spec)
    mask = attention_mask.astype(bool)
    kv_mask = jnp.concatenate([mask, jnp.ones((batch, spec.max_new_tokens), bool)], axis=1)
    positions = positions_from_mask(attention_mask)
    absent = spec.bucket_len - prompt_len  # a row with no real token reads its prompt as passed (`view`)
    hidden, prompt, *outputs = forward(model, input_ids, positions, mask, row_shards=spec.row_shards,
                                       capture=spec.capture, absent=absent)  # prompt: its keys, values
    outputs = jax.tree.map(rows, outputs[0]) if outputs else None
    rings = rings and not spec.output_attentions
    first_real = jnp.argmax(attention_mask, axis=-1).astype(jnp.int32) - (spec.bucket_len - prompt_len)
    pad_lengths = jnp.where(attention_mask.any(-1), first_real, 0)  # an empty row: 0, as transformers' argmax
    logits = logits_of(model, hidden[:, -1], spec.row_shards)
    logits, positions, pad_lengths = map(rows, (logits, positions[:, -1] + 1, pad_lengths))
    if share_prompt:
        cache = model.init_cache(batch, spec.bucket_len + spec.phase_ends[0], expand, spec.bucket_len,
                                 spec.total_len if rings else None)
    else:
        prompt, kv_mask = prompt.repeat(expand), rows(kv_mask)
        cache = model.init_cache(batch * expand, spec.bucket_len + spec.phase_ends[0],
                                 ring_below=spec.total_len if rings else None)
    cache = pin_cache(pin_cache(cache, spec).fill_prompt(prompt), spec)
    return Prefilled(pin_rows(logits, spec), cache, pin_rows(kv_mask, spec), positions, pad_lengths, outputs,
                     hidden if keep_hidden else None)


def pin_cache(cache: KVCache, spec: DecodeSpec) -> KVCache:
    """Keeps the cache split by rows (data axis) and heads (model axis) on a mesh."""
    return sharding.constrain_cache(cache, spec.mesh, spec.data_axis, spec.model_axis)


def pin_rows(x: jax.Array, spec: DecodeSpec) -> jax.Array:
    """Keeps a ``[rows, ...]`` array split by rows on a mesh."""
    return sharding.constrain_rows(x, spec.mesh, spec.data_axis)


def decode_step(model: CausalLM, tokens: jax.Array, positions: jax.Array, kv_mask: jax.Array, cache: KVCache,
                slot: jax.Array, spec: DecodeSpec, redo=None) -> tuple[jax.Array, KVCache, LayerOutputs | None]:
    """Feeds ``tokens: int32[rows]`` at cache slot ``slot``; returns float32[rows, V] logits, the
    cache, and the step's `LayerOutputs` where ``spec.capture`` asks for them (else None).

    ``redo``: with ``spec.recompute``, ``(when: bool[], sequences: int32[rows, S], mask:
    bool[rows, S])``: when ``when``, the whole sequence runs again instead and its keys and values
    replace the cache (`recomputes`)."""
    def one():
        hidden, new, *outputs = forward(model, tokens[:, None], positions[:, None], kv_mask, cache, slot,
                                        spec.row_shards, spec.capture)
        return logits_of(model, hidden[:, 0], spec.row_shards), pin_cache(new, spec), *(outputs or [None])

    if redo is None:
        return one()
    when, sequences, mask = redo

    def again():
        length = cache.max_len
        mask_now = mask[:, :length]
        hidden, rows = forward(model, sequences[:, :length], positions_from_mask(mask_now), mask_now,
                               row_shards=spec.row_shards)
        last = jax.lax.dynamic_index_in_dim(hidden, slot, axis=1, keepdims=False)
        rows = rows.regroup(cache.group, cache.shared, cache.rings, slot)
        return logits_of(model, last, spec.row_shards), pin_cache(rows, spec), None

    return jax.lax.cond(when, again, one)


def recomputes(model: CausalLM, prompt_len: jax.Array, step: jax.Array, spec: DecodeSpec) -> jax.Array | bool:
    """Whether the forward pass that yields the logits of token ``step`` runs the whole sequence
    again: transformers' Phi-3 drops its cache when the sequence (prompt as passed + generated)
    reaches ``config.recompute_at``, where its longrope factors switch, so that every key is
    rotated with the long factors."""
    return spec.recompute and prompt_len + step == model.config.recompute_at


def run_loop(state, choose, advance, spec: DecodeSpec):
    """Decodes until ``state.done``: ``choose`` picks the tokens of step ``state.step`` from
    ``state.logits`` (and increments ``step``), ``advance`` feeds them through the model.

    One ``lax.while_loop`` per phase (`DecodeSpec.phase_ends`), the cache grown between them. The
    last step only chooses: its forward pass would compute logits nobody reads (1 of
    ``max_new_tokens`` forwards saved). The cache does not enter that final ``lax.cond``.
    ``advance=None``: ``choose`` runs the forward pass of every step itself (contrastive search
    chooses with one).
    """
    n = spec.max_new_tokens
    last = n if advance is None else n - 1
    for end in spec.phase_ends:
        state = state.replace(cache=pin_cache(state.cache.grow(spec.bucket_len + end), spec))
        state = jax.lax.while_loop(lambda s, end=end: ~s.done & (s.step < min(end, last)),
                                   choose if advance is None else (lambda s: advance(choose(s))), state)
    if advance is None:
        return state
    cache = state.cache
    rest = state.replace(cache=None)
    rest = jax.lax.cond(rest.done, lambda s: s, choose, rest)
    return rest.replace(cache=cache)


def process(processors, scores: jax.Array, sequences, step, prompt_len, pad_lengths, spec: DecodeSpec,
            chosen: jax.Array | None = None) -> jax.Array:
    """Runs the processors on ``scores: float32[rows, V]`` before token ``step`` is chosen
    (``chosen``: see `ProcessorContext`)."""
    ctx = ProcessorContext(sequences, prompt_len + step, pad_lengths, spec.bucket_len - prompt_len, chosen)
    return apply(processors, scores, ctx)


def process_rows(processors, scores: jax.Array, sequences, cur_len, pad_lengths, offset, stacked: bool = False):
    """`process` with every row at its own length: scores float32[rows, V], sequences int32[rows, S],
    cur_len / pad_lengths int32[rows]; ``stacked``: the processors' leaves are [rows, ...], each
    row's own settings (continuous batching)."""
    def one(procs, row_scores, row, length, pad):
        return apply(procs, row_scores[None], ProcessorContext(row[None], length, pad[None], offset))[0]

    return jax.vmap(one, in_axes=(0 if stacked else None, 0, 0, 0, 0))(processors, scores, sequences, cur_len,
                                                                       pad_lengths)


def score_buffer(enabled: bool, spec: DecodeSpec, rows: int, vocab: int) -> jax.Array | None:
    """float32[N, rows, V] zeros, or None when not requested (no allocation at all)."""
    return jnp.zeros((spec.max_new_tokens, rows, vocab), jnp.float32) if enabled else None


def record(buffer: jax.Array | None, step: jax.Array, value: jax.Array) -> jax.Array | None:
    return None if buffer is None else jax.lax.dynamic_update_index_in_dim(buffer, value, step, 0)


def layer_record(model: CausalLM, pre: Prefilled, spec: DecodeSpec) -> LayerRecord | None:
    """The buffers of the attentions and hidden states ``spec`` asks for, holding the prefill's;
    None (nothing allocated) when it asks for none."""
    if pre.outputs is None:
        return None
    c = model.config
    return LayerRecord.start(pre.outputs, spec.max_new_tokens, spec.output_hidden_states, c.n_layers + 1,
                             tuple(c.window(i) for i in range(c.n_layers)))


def record_layers(buffers: LayerRecord | None, step: jax.Array, outputs: LayerOutputs | None) -> LayerRecord | None:
    return None if buffers is None else buffers.record(step, outputs)


def emit(tokens: jax.Array, sequences: jax.Array, unfinished: jax.Array, step, prompt_len, streamer_id,
         spec: DecodeSpec) -> tuple[jax.Array, jax.Array]:
    """Writes step ``step``'s ``tokens: int32[rows]`` (``pad_token_id`` in rows already finished,
    where an EOS id or a stop sequence can finish them: transformers pads only with an EOS
    criterion, so a row that a stop string ended goes on) into ``sequences: int32[rows, S]``,
    streams them, and returns (sequences, unfinished)."""
    if spec.eos_token_ids or spec.stop_sequences:  # stop strings alone leave them running, as transformers
        tokens = jnp.where(unfinished, tokens, spec.pad_token_id)
    column = spec.bucket_len + step
    if spec.stream:
        stream(streamer_id, tokens)
    sequences = jax.lax.dynamic_update_index_in_dim(sequences, tokens, column, 1)
    return sequences, unfinished & ~hits_stop(sequences, column, spec.bucket_len - prompt_len, spec)


def hits_stop(sequences: jax.Array, column: jax.Array, first_column: jax.Array, spec: DecodeSpec) -> jax.Array:
    """bool[...]: the token just written at ``column`` ends the row: it is an EOS id, the tokens
    ending there match one of ``spec.stop_sequences`` (a token-level ``StopStringCriteria``), or
    the text they spell ends with one of ``spec.stop_strings`` (transformers' EOS and stop-string
    criteria). ``sequences: int32[..., S]``; matches may not reach before ``first_column``
    (bucket padding)."""
    tokens = jax.lax.dynamic_index_in_dim(sequences, column, axis=-1, keepdims=False)
    hit = jnp.zeros(tokens.shape, bool)
    if spec.eos_token_ids:
        hit = jnp.isin(tokens, jnp.asarray(spec.eos_token_ids, tokens.dtype))
    for stop in spec.stop_sequences:
        if len(stop) > sequences.shape[-1]:  # longer than any history this call holds: never matches
            continue
        start = column + 1 - len(stop)
        tail = jax.lax.dynamic_slice_in_dim(sequences, jnp.maximum(start, 0), len(stop), axis=-1)
        hit |= (tail == jnp.asarray(stop, tail.dtype)).all(-1) & (start >= first_column)
    if spec.stop_strings is not None:
        hit |= spec.stop_strings.hits(sequences, column, first_column)
    return hit


def initial_sequences(input_ids: jax.Array, spec: DecodeSpec, fill: int) -> jax.Array:
    """int32[rows, P + N]: the prompt followed by ``fill``."""
    rows = input_ids.shape[0]
    tail = jnp.full((rows, spec.max_new_tokens), fill, jnp.int32)
    return jnp.concatenate([input_ids.astype(jnp.int32), tail], axis=1)


# Streamers live on the host; the compiled loop only carries an int32 id, so a new streamer
# object does not recompile the program.
_STREAMERS: dict[int, object] = {}
_streamer_ids = itertools.count(1)


@contextlib.contextmanager
def registered(streamer):
    streamer_id = next(_streamer_ids)
    _STREAMERS[streamer_id] = streamer
    try:
        yield np.int32(streamer_id)
    finally:
        del _STREAMERS[streamer_id]


def _put(streamer_id, tokens):
    _STREAMERS[int(streamer_id)].put(np.asarray(tokens))


def stream(streamer_id: jax.Array, tokens: jax.Array) -> None:
    """Hands ``tokens: int32[rows]`` to the registered streamer, in step order."""
    io_callback(_put, None, streamer_id, tokens, ordered=True)


def _put_steps(streamer_id, generated, start, stop):
    for step in range(int(start), int(stop)):
        _put(streamer_id, generated[:, step])


def stream_steps(streamer_id: jax.Array, generated: jax.Array, start: jax.Array, stop: jax.Array) -> None:
    """Hands steps ``[start, stop)`` of ``generated: int32[rows, N]`` to the registered streamer,
    one ``int32[rows]`` a step, as `stream` does (decoders that finish several steps at once)."""
    io_callback(_put_steps, None, streamer_id, generated, start, stop, ordered=True)
