"""Continuous batching: many requests through a fixed set of decode rows (transformers'
``generate_batch``, greedy and sampling; beam search requests as groups of ``num_beams`` rows,
`jaxgen.decoding.batch_beam`).

``rows`` decode rows share one KV cache of ``slots`` slots a row, without padding: a request's
prompt fills its row's slots ``[0, L)``, its ``i``-th token slot ``L + i``, so its positions are
its slots and every row stands at its own length (the cache's per-row write slots). Two compiled
programs do the work: `_insert` runs one prompt's forward and writes it into a free row (one
program per prompt bucket), `_decode` runs up to ``steps_per_sync`` steps of every row and stops
early when a row finishes, so that the host can hand that row the next request. Each row runs
its request's own processors (the batch's processor list, its float knobs per row: temperature,
top-p, min-p, repetition penalty, ...; `jax.vmap` over rows) and, when sampling, draws from its
own key, so a request's tokens are those `jaxgen.generate` gives it alone.

Shapes: ``R`` rows, ``S`` slots, ``N`` the largest ``max_new_tokens``, ``V`` vocab.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import time
import warnings
from typing import Any, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxgen.decoding import args, batch_beam, engine, select
from jaxgen.decoding.stop_strings import StopStrings
from jaxgen.models.cache import KVCache
from jaxgen.models.model import CausalLM, forward, logits as logits_of

# generate() arguments that make no sense per request here: outputs and placement are the batch's.
_NOT_HERE = ("streamer", "mesh", "data_axis", "model_axis", "output_scores", "output_logits", "output_attentions",
             "output_hidden_states", "return_dict_in_generate", "num_return_sequences", "prompt_bucket",
             "prompt_lookup_num_tokens")
FINISH_REASONS = ("", "stop", "length")  # index 0: still running


@dataclasses.dataclass
class Completion:
    """One request's result.

    id: the request's id (its index where it gave none); prompt: its token ids; tokens: the
    generated ids, an EOS or stop sequence that ended it included (``generate``'s ``sequences``
    after the prompt, for this request alone); logprobs: each token's log-probability under the
    processed scores it was chosen from (``compute_transition_scores(..., normalize_logits=True)``);
    finish_reason: ``"stop"`` (EOS or a stop sequence) or ``"length"`` (its ``max_new_tokens``);
    text: the decoded tokens when a tokenizer was given; queued_s / decode_s: seconds from the
    call's start to its first step, and from there to its end; index: its place in ``prompts``;
    sequence_score: beam search's length-penalised score of the returned beam (``generate``'s
    ``sequences_scores``), None without beams.
    """

    id: Any
    index: int
    prompt: list[int]
    tokens: list[int]
    logprobs: list[float]
    finish_reason: str
    queued_s: float
    decode_s: float
    text: str | None = None
    sequence_score: float | None = None


@dataclasses.dataclass(frozen=True)
class BatchSpec:
    """The static part of both programs (what every request shares)."""

    rows: int
    slots: int
    max_new_tokens: int  # N, the most tokens a request may generate (the logprob buffer's length)
    eos_token_ids: tuple[int, ...]
    stop_sequences: tuple[tuple[int, ...], ...]
    pad_token_id: int
    do_sample: bool
    steps_per_sync: int
    num_beams: int = 1  # K: a request takes a group of K rows (beam search)
    early_stopping: bool | str = False
    stop_strings: StopStrings | None = None


@struct.dataclass
class Rows:
    """The decode rows (loop carry). tokens: int32[R, S], each row's prompt then its tokens;
    length: int32[R], tokens in the row (the next token's slot and position); generated /
    budget: int32[R], tokens generated and the request's ``max_new_tokens``; logits: float32[R, V]
    raw logits for the next token; active: bool[R], the row holds an unfinished request;
    finished: bool[R], it finished in the last `_decode`; reason: int32[R] (`FINISH_REASONS`);
    logprobs: float32[R, N]; processors: the batch's processors, every leaf [R, ...]; keys: [R];
    beams: beam search's `batch_beam.BeamGroups` (None without beams). A beam request's rows are
    its running beams."""

    tokens: jax.Array
    length: jax.Array
    generated: jax.Array
    budget: jax.Array
    logits: jax.Array
    cache: KVCache
    active: jax.Array
    finished: jax.Array
    reason: jax.Array
    logprobs: jax.Array
    processors: Any
    keys: jax.Array
    beams: batch_beam.BeamGroups | None = None


@functools.partial(jax.jit, static_argnames=("spec",), donate_argnames=("rows",))
def _insert(model: CausalLM, rows: Rows, unit, ids, length, budget, processors, key, length_penalty, *,
            spec: BatchSpec) -> Rows:
    """Unit ``unit`` (a row, or with beams the group of rows ``[unit * K, (unit + 1) * K)``)
    takes a request: ``ids: int32[P]`` (its prompt, then padding), ``length`` its prompt's
    length; the prompt's forward fills the first ``P`` slots of each of its rows."""
    mask = jnp.arange(ids.shape[0]) < length
    hidden, prompt = forward(model, ids[None], jnp.arange(ids.shape[0])[None], mask[None])
    last = jax.lax.dynamic_index_in_dim(hidden[0], length - 1, keepdims=False)
    tokens = jnp.full((spec.slots,), spec.pad_token_id, jnp.int32).at[:ids.shape[0]].set(jnp.where(mask, ids, 0))
    k, first = spec.num_beams, unit * spec.num_beams

    def at(all_, one):  # rows [first, first + k) of ``all_`` set to ``one``
        return jax.lax.dynamic_update_slice_in_dim(all_, jnp.broadcast_to(one, (k, *all_.shape[1:])), first, 0)

    return rows.replace(
        tokens=at(rows.tokens, tokens), length=at(rows.length, length), generated=at(rows.generated, 0),
        budget=at(rows.budget, budget), logits=at(rows.logits, logits_of(model, last[None])[0]),
        cache=rows.cache.fill_row(first, prompt, copies=k), active=at(rows.active, True),
        finished=at(rows.finished, False), reason=at(rows.reason, 0), logprobs=at(rows.logprobs, 0.0),
        processors=jax.tree.map(at, rows.processors, processors), keys=at(rows.keys, key),
        beams=None if rows.beams is None else rows.beams.start(unit, length_penalty))


@functools.partial(jax.jit, static_argnames=("spec",), donate_argnames=("rows",))
def _decode(model: CausalLM, rows: Rows, *, spec: BatchSpec) -> Rows:
    """Up to ``spec.steps_per_sync`` steps of every active row (with beams, a beam search step of
    every active group); stops after a step in which a request finished (`Rows.finished`)."""
    r, s = spec.rows, spec.slots
    every_slot = jnp.ones((r, s), bool)  # the causal limit of each row's own slot does the rest

    def beam_step(carry):
        i, x = carry
        log_probs = engine.process_rows(x.processors, jax.nn.log_softmax(x.logits), x.tokens, x.length,
                                        jnp.zeros((r,), jnp.int32), jnp.int32(0), stacked=True)
        tokens, logprobs, fed, origin, beams, ended = batch_beam.step(x, log_probs, spec)
        ended, stopped = (jnp.repeat(a, spec.num_beams) for a in (ended, beams.best()[4]))
        column = jnp.minimum(x.length, s - 1)
        cache = x.cache.map_arrays(lambda a: jnp.take(a, origin, axis=0))  # the beams' rows in their new order
        hidden, cache = forward(model, fed[:, None], column[:, None], every_slot, cache, column)
        x = x.replace(
            tokens=tokens, logprobs=logprobs, length=x.length + x.active, generated=x.generated + x.active,
            logits=logits_of(model, hidden[:, 0]), cache=cache, active=x.active & ~ended,
            finished=x.finished | ended, reason=jnp.where(ended, jnp.where(stopped, 1, 2), x.reason), beams=beams)
        return i + 1, x

    def step(carry):
        i, x = carry
        scores = engine.process_rows(x.processors, x.logits, x.tokens, x.length, jnp.zeros((r,), jnp.int32),
                                     jnp.int32(0), stacked=True)
        if spec.do_sample:
            draw = lambda key, n, row: select.categorical(jax.random.fold_in(key, n), row[None])[0]  # noqa: E731
            chosen = jax.vmap(draw)(x.keys, x.generated, scores)
        else:
            chosen = select.first_argmax(scores)
        logprob = jnp.take_along_axis(jax.nn.log_softmax(scores), chosen[:, None], axis=1)[:, 0]
        column = jnp.minimum(x.length, s - 1)
        write = x.active[:, None] & (jnp.arange(s) == column[:, None])
        tokens = jnp.where(write, chosen[:, None], x.tokens)
        stop = x.active & jax.vmap(lambda seq, c: engine.hits_stop(seq, c, 0, spec))(tokens, column)
        generated = x.generated + x.active
        out_of_budget = x.active & ~stop & (generated >= x.budget)
        ended = stop | out_of_budget
        record = x.active[:, None] & (jnp.arange(spec.max_new_tokens) == x.generated[:, None])
        hidden, cache = forward(model, chosen[:, None], column[:, None], every_slot, x.cache, column)
        logits = logits_of(model, hidden[:, 0])
        x = x.replace(
            tokens=tokens, length=x.length + x.active, generated=generated, logits=logits, cache=cache,
            active=x.active & ~ended, finished=x.finished | ended,
            reason=jnp.where(stop, 1, jnp.where(out_of_budget, 2, x.reason)),
            logprobs=jnp.where(record, logprob[:, None], x.logprobs))
        return i + 1, x

    def more(carry):
        i, x = carry
        return (i < spec.steps_per_sync) & ~x.finished.any() & x.active.any()

    body = beam_step if spec.num_beams > 1 else step
    return jax.lax.while_loop(more, body, (jnp.int32(0), rows.replace(finished=jnp.zeros((r,), bool))))[1]


@dataclasses.dataclass
class _Request:
    id: Any
    index: int
    prompt: np.ndarray  # int32[L]
    parsed: args.Request
    budget: int


def generate_batch(model: CausalLM, prompts: Iterable, *, max_rows: int = 8, max_length: int | None = None,
                   tokenizer=None, progress: bool = True, steps_per_sync: int = 16, **kwargs) -> list[Completion]:
    """Generates for every request of ``prompts`` through ``max_rows`` decode rows, a finished
    request's row taken by the next one (continuous batching); the results in input order.

    A request is a list of token ids, a string (with ``tokenizer``), or a dict with ``"id"``,
    one of ``"input_ids"`` / ``"prompt"`` (a string) / ``"messages"`` (chat messages, through the
    tokenizer's chat template), and generate() arguments of its own (``max_new_tokens``,
    ``temperature``, ``top_p``, ``min_p``, ``repetition_penalty``, ..., and ``seed``: its sampling
    key is ``jax.random.key(seed)``; or a ``key`` of its own; without either, ``kwargs``' ``key``
    folded with its index in ``prompts``).
    ``kwargs``: generate() arguments every request shares. A request's own arguments may change
    only the processors' values, not which processors run or their sizes (``top_k``,
    ``no_repeat_ngram_size``, EOS ids, ``num_beams``, ...): those belong in ``kwargs``. Greedy
    search, sampling, and beam search (``num_beams=K`` in ``kwargs``: a request takes K of the
    ``max_rows`` rows and returns its best beam, with ``Completion.sequence_score``; its own
    ``length_penalty`` allowed); each request's tokens equal `jaxgen.generate`'s for it alone
    (sampling: for its key).

    ``prompts`` may be any iterable, read as rows free up (a generator can add requests while
    others decode); then ``max_length`` (prompt plus new tokens, the most any request needs)
    sizes the cache, which a list's requests size themselves. ``progress``: a progress bar on
    stderr (tqdm). Raises ValueError naming the request for a bad request, before it is run.
    """
    results = completions(model, prompts, max_rows=max_rows, max_length=max_length, tokenizer=tokenizer,
                          progress=progress, steps_per_sync=steps_per_sync, **kwargs)
    return sorted(results, key=lambda c: c.index)


def completions(model: CausalLM, prompts: Iterable, *, max_rows: int = 8, max_length: int | None = None,
                tokenizer=None, progress: bool = False, steps_per_sync: int = 16, total: int | None = None,
                labels=None, **kwargs) -> Iterator[Completion]:
    """`generate_batch`'s results as each request finishes (a command writes them as they come).
    ``labels(index, id)``: how an error names a request (default: ``request <id>``)."""
    for name in _NOT_HERE:
        if name in kwargs:
            raise ValueError(f"{name}= is not allowed in generate_batch (each request returns its tokens and "
                             f"log-probabilities, one row per request, on one device)")
    if not isinstance(max_rows, int) or isinstance(max_rows, bool) or max_rows < 1:
        raise ValueError(f"max_rows={max_rows!r} is not allowed: expected an int >= 1")
    if not isinstance(steps_per_sync, int) or steps_per_sync < 1:
        raise ValueError(f"steps_per_sync={steps_per_sync!r} is not allowed: expected an int >= 1")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
        raise ValueError(f"max_length={max_length!r} is not allowed: expected None or an int >= 1 (the cache's "
                         "slots: the most prompt plus new tokens any request needs)")
    if isinstance(prompts, (list, tuple)):
        requests = [_request(model, p, i, tokenizer, kwargs, labels) for i, p in enumerate(prompts)]
        for r in requests:
            _check_shared(r, _shared(requests[0]), max_length, labels)
        total = len(requests)
        max_length = max_length or max((len(r.prompt) + r.budget for r in requests), default=0)
        source: Iterator = iter(requests)
    else:
        if max_length is None:
            raise ValueError("max_length=None is not allowed when prompts is not a list: give the most slots (prompt "
                             "plus new tokens) any request will need")
        source = (_request(model, p, i, tokenizer, kwargs, labels) for i, p in enumerate(prompts))
    if not max_length:
        return
    yield from _serve(model, source, max_rows, max_length, steps_per_sync, tokenizer, progress, total, labels)


def _label(labels, index: int, rid) -> str:
    return f"request {rid!r}" if labels is None else labels(index, rid)


def _check_text(texts) -> None:
    """ValueError for a string that is not text: lone surrogates (``"\\ud800"`` in JSON), which
    no tokenizer takes."""
    for text in texts:
        if isinstance(text, str):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"{text!r:.80} is not valid text (it holds a lone surrogate)") from None


def _request(model, prompt, index: int, tokenizer, shared: dict, labels=None) -> _Request:
    """A validated request (ValueError naming it otherwise)."""
    own = dict(prompt) if isinstance(prompt, dict) else {}
    rid = own.pop("id", index)
    name = _label(labels, index, rid)
    try:
        if isinstance(prompt, dict):
            sources = [k for k in ("input_ids", "prompt", "messages") if k in own]
            if len(sources) != 1:
                raise ValueError("give exactly one of input_ids, prompt or messages")
            prompt = own.pop(sources[0])
            if sources[0] == "input_ids" and isinstance(prompt, str):
                raise ValueError("input_ids must be a list of token ids; text goes in prompt")
            if sources[0] == "messages":
                _check_text([m.get("content") for m in prompt if isinstance(m, dict)])
                if tokenizer is None or not getattr(tokenizer, "chat_template", None):
                    raise ValueError("messages need a tokenizer with a chat template")
                prompt = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
                prompt = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if isinstance(prompt, str):
            if tokenizer is None:
                raise ValueError("a text prompt needs tokenizer=")
            _check_text([prompt])
            prompt = tokenizer(prompt)["input_ids"]
        ids = np.asarray(prompt)
        if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"a prompt must be a non-empty list of token ids, got {prompt!r:.80}")
        call = {"tokenizer": tokenizer, **shared, **own}  # the tokenizer also spells stop_strings
        for argument in _NOT_HERE:
            if argument in own:
                raise ValueError(f"{argument}= is not allowed in generate_batch")
        call.pop("seed", None)
        if "seed" in own:
            seed = own.pop("seed")
            if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
                raise ValueError(f"seed={seed!r} is not allowed: expected an int in [0, 2**32)")
            call["key"] = jax.random.key(seed)
        elif "key" not in own and call.get("key") is not None:
            call["key"] = jax.random.fold_in(args._prng_key(call["key"]), index)
        with warnings.catch_warnings(record=True) as caught:  # each said again, naming the request
            warnings.simplefilter("always")
            parsed = args.parse(model, ids[None], np.ones((1, ids.size), np.int32), call, neutral_processors=True)
        for w in caught:
            warnings.warn(f"{name}: {w.message}", w.category, stacklevel=4)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    spec = parsed.spec
    if spec.beam_search and (spec.do_sample or spec.num_beam_groups > 1):
        what = "beam sampling" if spec.do_sample else "group beam search"
        raise ValueError(f"{name}: num_beams={spec.num_beams} is not allowed with "
                         f"{'do_sample=True' if spec.do_sample else f'num_beam_groups={spec.num_beam_groups}'}: "
                         f"{what} in generate_batch is not implemented yet (beam search is; or use generate)")
    if spec.constraints:
        given = "force_words_ids" if call.get("force_words_ids") is not None else "constraints"
        raise ValueError(f"{name}: {given}={call.get(given)!r} is constrained beam search, which generate_batch does "
                         "not run (use generate)")
    if spec.contrastive:
        raise ValueError(f"{name}: penalty_alpha={call.get('penalty_alpha')} with top_k={spec.contrastive} is "
                         "contrastive search, which generate_batch does not run (use generate)")
    if parsed.guidance is not None:
        raise ValueError(f"{name}: guidance_scale={call.get('guidance_scale')} is classifier-free guidance, which "
                         "generate_batch does not run (use generate)")
    if spec.dola_layers:
        raise ValueError(f"{name}: dola_layers={call.get('dola_layers')!r} is DoLa decoding, which generate_batch "
                         "does not run (use generate)")
    if spec.lookup:
        drafter = "assistant_model" if call.get("assistant_model") is not None else "assistant_early_exit"
        raise ValueError(f"{name}: {drafter}= is not allowed: assisted decoding in generate_batch is not implemented "
                         "yet (transformers' continuous batching refuses it too); use generate")
    if spec.recompute:
        raise ValueError(f"{name}: this model runs the whole sequence again at {model.config.recompute_at} "
                         "tokens (Phi-3's longrope), which generate_batch does not; use generate")
    if parsed.key is not None and not jnp.issubdtype(parsed.key.dtype, jax.dtypes.prng_key):
        parsed.key = jax.random.wrap_key_data(parsed.key)  # a raw PRNGKey: the same draws, typed as the others
    return _Request(rid, index, ids.astype(np.int32), parsed, spec.max_new_tokens)


def _shared(request: _Request) -> tuple:
    """What every request of a batch must share (static in the programs)."""
    spec = request.parsed.spec
    return (spec.eos_token_ids, spec.stop_sequences, spec.pad_token_id, spec.do_sample, spec.num_beams,
            spec.early_stopping if spec.beam_search else False, spec.stop_strings,
            jax.tree.structure(request.parsed.processors))


def _serve(model, source: Iterator[_Request], max_rows: int, max_length: int, steps_per_sync: int, tokenizer,
           progress: bool, total: int | None, labels) -> Iterator[Completion]:
    start = time.perf_counter()
    first = next(source, None)
    if first is None:
        return
    shared = _shared(first)
    eos, stops, pad, do_sample, beams, early_stopping, stop_strings, _ = shared
    if max_rows < beams:
        raise ValueError(f"max_rows={max_rows} is not allowed: a beam search request takes num_beams={beams} rows")
    units = max_rows // beams  # requests decoding at once: rows, or groups of `beams` rows
    if total is not None:  # no more rows than requests
        units = max(1, min(units, total))
    rows_n = max(2, units * beams)  # a one-row cache drops its batch dim; a spare row costs one row of compute
    slots = max_length
    spec = BatchSpec(rows_n, slots, max_length, eos, stops, 0 if pad is None else pad, do_sample, steps_per_sync,
                     beams, early_stopping, stop_strings)
    vocab = model.config.vocab_size
    key = first.parsed.key if first.parsed.key is not None else jax.random.key(0)
    rows = Rows(
        tokens=jnp.zeros((rows_n, slots), jnp.int32), length=jnp.zeros((rows_n,), jnp.int32),
        generated=jnp.zeros((rows_n,), jnp.int32), budget=jnp.zeros((rows_n,), jnp.int32),
        logits=jnp.zeros((rows_n, vocab), jnp.float32), cache=model.init_cache(rows_n, slots),
        active=jnp.zeros((rows_n,), bool), finished=jnp.zeros((rows_n,), bool), reason=jnp.zeros((rows_n,), jnp.int32),
        logprobs=jnp.zeros((rows_n, max_length), jnp.float32),
        processors=jax.tree.map(lambda x: jnp.stack([x] * rows_n), first.parsed.processors),
        keys=jnp.stack([key] * rows_n),
        beams=batch_beam.BeamGroups.empty(units, beams, slots, max_length) if beams > 1 else None)
    bar = _progress_bar(progress, total)
    pending: Iterator[_Request] = itertools.chain([first], source)
    running: dict[int, tuple[_Request, float]] = {}
    free = list(range(units))
    exhausted = False
    tokens_done = 0
    while True:
        while free and not exhausted:
            request = next(pending, None)
            if request is None:
                exhausted = True
                break
            _check_shared(request, shared, slots, labels)
            unit = free.pop(0)
            length = len(request.prompt)
            bucket = min(-(-length // 32) * 32, slots)
            ids = np.zeros((bucket,), np.int32)
            ids[:length] = request.prompt
            rows = _insert(model, rows, np.int32(unit), ids, np.int32(length), np.int32(request.budget),
                           request.parsed.processors, request.parsed.key if request.parsed.key is not None else key,
                           request.parsed.length_penalty, spec=spec)
            running[unit] = (request, time.perf_counter())
        if not running:
            break
        rows = _decode(model, rows, spec=spec)
        finished = np.unique(np.flatnonzero(np.asarray(rows.finished)) // beams)
        if finished.size:  # one copy to the host per sync: each unit's tokens, log-probs, length, reason, score
            if beams > 1:
                best_tokens, best_logprobs, best_scores, best_generated, _ = rows.beams.best()
                host = jax.device_get((best_tokens, best_logprobs, best_generated, rows.reason[::beams], best_scores))
            else:
                host = jax.device_get((rows.tokens, rows.logprobs, rows.generated, rows.reason))
        for unit in finished:
            request, began = running.pop(int(unit))
            all_tokens, logprobs, generated, reason, *score = (x[unit] for x in host)
            n, length = int(generated), len(request.prompt)
            tokens = all_tokens[length:length + n].tolist()
            done = Completion(
                id=request.id, index=request.index, prompt=request.prompt.tolist(), tokens=tokens,
                logprobs=logprobs[:n].tolist(),
                finish_reason=FINISH_REASONS[int(reason)], queued_s=began - start,
                decode_s=time.perf_counter() - began,
                text=None if tokenizer is None else tokenizer.decode(tokens, skip_special_tokens=True),
                sequence_score=float(score[0]) if score else None)
            free.append(int(unit))
            tokens_done += n
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"{tokens_done / (time.perf_counter() - start):.0f} tokens/s")
            yield done
    if bar is not None:
        bar.close()


def _check_shared(request: _Request, shared: tuple, slots: int | None, labels) -> None:
    name = _label(labels, request.index, request.id)
    if _shared(request) != shared:
        raise ValueError(f"{name}: its arguments change what every request of the batch shares (EOS "
                         "ids, stop sequences, pad id, do_sample, which processors run and their sizes, e.g. top_k); "
                         "pass those to generate_batch for all requests")
    need = len(request.prompt) + request.budget
    if slots is not None and need > slots:
        raise ValueError(f"{name}: needs {need} slots (prompt plus max_new_tokens), above "
                         f"max_length={slots}")


def _progress_bar(enabled: bool, total: int | None):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="request", desc="jaxgen", dynamic_ncols=True)
