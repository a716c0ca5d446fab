"""Host-side validation of ``generate`` arguments, before anything is traced.

Every check raises ``ValueError`` naming the argument, its value and what is allowed. Checks that
need concrete values (token ids in range, rows that end in a real token) run when the inputs are
concrete and are skipped for tracers (a decoder called inside the user's own ``jax.jit``) and for
global arrays that span several hosts (each host sees only its own rows).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen import generation_config, sharding
from jaxgen.decoding.engine import DecodeSpec, loop_phases
from jaxgen.models.model import CausalLM
from jaxgen.processors import build_processors

# Hugging Face's names and defaults (GenerationConfig._get_default_generation_params).
DEFAULTS: dict[str, Any] = {
    "max_new_tokens": None, "max_length": None, "min_new_tokens": None, "min_length": None,
    "num_beams": 1, "num_return_sequences": 1, "length_penalty": 1.0, "early_stopping": False,
    "eos_token_id": None, "pad_token_id": None, "do_sample": False,
    "temperature": None, "top_h": None, "top_k": None, "top_p": None, "min_p": None, "typical_p": None,
    "epsilon_cutoff": None, "eta_cutoff": None,
    "repetition_penalty": None, "no_repeat_ngram_size": None, "bad_words_ids": None,
    "sequence_bias": None, "suppress_tokens": None, "begin_suppress_tokens": None,
    "forced_bos_token_id": None, "forced_eos_token_id": None,
    "exponential_decay_length_penalty": None, "renormalize_logits": False,
    "remove_invalid_values": False, "logits_processor": (),
    "output_scores": False, "output_logits": False, "return_dict_in_generate": True,
    "stop_sequences": None, "streamer": None, "prompt_bucket": 32, "key": None,
    "mesh": None, "data_axis": "data", "model_axis": "model",
}
HF_MAX_NEW_TOKENS = 20  # without a length: max_length = prompt + 20, at most max_position_embeddings
HF_TOP_K = 50
HOST_SIDE = {
    "max_time": "max_time is a wall-clock criterion checked on the host between steps; a compiled "
                "while_loop cannot stop on time. Bound the work with max_new_tokens instead",
    "stop_strings": "stop_strings needs the tokenizer at every step; pass the token ids of the stop "
                    "texts as stop_sequences=[[ids...], ...] instead (matched on token ids)",
    "stopping_criteria": "custom stopping criteria are host-side Python; use eos_token_id",
}


@dataclasses.dataclass
class Request:
    """A validated call: static spec, traced operands (already bucket-padded)."""

    spec: DecodeSpec
    input_ids: Any  # int32[batch, P]
    attention_mask: Any  # int32[batch, P]
    prompt_len: Any  # int32[], L <= P
    processors: tuple
    key: Any
    length_penalty: Any
    streamer: Any = None  # host object with put(np.ndarray) and end()
    streamer_id: Any = np.int32(0)  # int32[], its id while registered


def _is_concrete(x) -> bool:
    """Values readable on this host: not a tracer, not a multi-host global array."""
    return not isinstance(x, jax.core.Tracer) and getattr(x, "is_fully_addressable", True)


def _fail(name: str, value: Any, allowed: str):
    raise ValueError(f"{name}={value!r} is not allowed: {allowed}")


def _int(kw, name, minimum=None, allow_none=True):
    v = kw[name]
    if v is None and allow_none:
        return None
    if not _is_int(v):
        _fail(name, v, "expected an int" + ("" if minimum is None else f" >= {minimum}"))
    if minimum is not None and v < minimum:
        _fail(name, v, f"expected an int >= {minimum}")
    return int(v)


def _float(kw, name, low=None, high=None, low_open=True, high_open=False):
    v = kw[name]
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) or not math.isfinite(v):
        _fail(name, v, "expected a finite number")
    ok_low = low is None or (v > low if low_open else v >= low)
    ok_high = high is None or (v < high if high_open else v <= high)
    if not (ok_low and ok_high):
        lo = "-inf" if low is None else str(low)
        hi = "inf" if high is None else str(high)
        interval = ("(" if low_open else "[") + f"{lo}, {hi}" + (")" if high_open else "]")
        _fail(name, v, f"expected a number in {interval}")
    return float(v)


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _token_ids(name, value, vocab, allow_empty=False) -> tuple[int, ...]:
    """An id or a list of ids (or a numpy / jax / torch array of them) -> tuple of ints in [0, vocab)."""
    if not isinstance(value, (list, tuple)) and hasattr(value, "__array__"):
        value = np.asarray(value).tolist()
    items = [value] if _is_int(value) else value
    if not isinstance(items, (list, tuple)) or not all(_is_int(t) for t in items) or (not items and not allow_empty):
        _fail(name, value, "expected a token id or a list of token ids")
    ids = tuple(int(t) for t in items)
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        _fail(name, value, f"token ids must be in [0, {vocab}) (the model's vocab_size); got {bad}")
    return ids


def _single_id(name, value, vocab) -> int:
    ids = _token_ids(name, value, vocab)
    if len(ids) != 1:
        _fail(name, value, "expected a single token id")
    return ids[0]


def _id_lists(name, value, vocab) -> tuple[tuple[int, ...], ...]:
    """A non-empty list of non-empty lists of token ids -> tuple of tuples."""
    if (not isinstance(value, (list, tuple)) or not value
            or not all(isinstance(ids, (list, tuple)) and ids for ids in value)):
        _fail(name, value, "expected a non-empty list of non-empty lists of token ids")
    return tuple(_token_ids(name, list(ids), vocab) for ids in value)


def _bool(kw, name):
    if not isinstance(kw[name], (bool, np.bool_)):
        _fail(name, kw[name], "expected True or False")
    return bool(kw[name])


def parse(model: CausalLM, input_ids, attention_mask, kwargs: dict[str, Any],
          beam_search: bool | None = None) -> Request:
    """Validates a ``generate`` call and resolves its defaults as transformers: the caller's
    arguments, else the model's ``generation_config``, else Hugging Face's defaults.

    ``beam_search``: run the beam decoder (True), the one-token-per-row decoder (False), or
    dispatch as transformers does (None: beams iff ``num_beams > 1``).
    """
    unknown = sorted(set(kwargs) - set(DEFAULTS))
    for name in unknown:
        if name in HOST_SIDE:
            raise ValueError(f"{name} is not supported: {HOST_SIDE[name]}")
        close = difflib.get_close_matches(name, DEFAULTS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown generate argument {name!r}{hint}; supported: {', '.join(sorted(DEFAULTS))}")
    if not isinstance(model, CausalLM):
        raise ValueError(f"model must be a jaxgen CausalLM (from jaxgen.from_pretrained), got {type(model).__name__}")
    kw = {**DEFAULTS, **generation_config.with_call(model.generation_config, kwargs, DEFAULTS, HOST_SIDE)}
    config = model.config
    vocab = config.vocab_size

    # --- inputs ---------------------------------------------------------------------------
    ids = input_ids if isinstance(input_ids, jax.Array) else np.asarray(input_ids)
    if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
        _fail("input_ids", f"<{ids.dtype}{list(ids.shape)}>", "expected an integer array [batch, prompt_len]")
    batch, prompt_len = ids.shape
    if batch == 0 or prompt_len == 0:
        _fail("input_ids", f"<shape {list(ids.shape)}>", "expected at least one row and one token")
    if _is_concrete(ids):
        host_ids = np.asarray(ids)
        if host_ids.min() < 0 or host_ids.max() >= vocab:
            bad = host_ids[(host_ids < 0) | (host_ids >= vocab)][:5].tolist()
            _fail("input_ids", f"<contains {bad}>", f"token ids must be in [0, {vocab}) (the model's vocab_size)")
        unsupported = sorted(set(config.unsupported_token_ids) & set(np.unique(host_ids).tolist()))
        if unsupported:
            _fail("input_ids", f"<contains {unsupported}>", "these ids stand for images, which jaxgen does not run "
                  "(it runs this checkpoint's language model); pass text tokens only")

    # --- special tokens ---------------------------------------------------------------------
    eos = kw["eos_token_id"] if kw["eos_token_id"] is not None else config.eos_token_id
    eos_ids = () if eos is None else _token_ids("eos_token_id", eos, vocab, allow_empty=True)
    pad = None if kw["pad_token_id"] is None else _single_id("pad_token_id", kw["pad_token_id"], vocab)
    stops = None if kw["stop_sequences"] is None else _id_lists("stop_sequences", kw["stop_sequences"], vocab)
    if pad is None and (eos_ids or stops):
        raise ValueError(
            f"pad_token_id is missing, but rows can finish early (eos_token_id={list(eos_ids)}, "
            f"stop_sequences={[list(s) for s in stops or ()]}); pass "
            "pad_token_id (for GPT-2, pad_token_id=eos_token_id, which transformers would pick with a warning)"
        )

    # --- attention mask ---------------------------------------------------------------------
    inferred = attention_mask is None
    if inferred:
        mask = _default_mask(ids, pad, eos_ids)
    else:
        mask = attention_mask if isinstance(attention_mask, jax.Array) else np.asarray(attention_mask)
        if mask.shape != ids.shape:
            _fail("attention_mask", f"<shape {list(mask.shape)}>", f"expected the shape of input_ids {list(ids.shape)}")
    if _is_concrete(mask):
        host_mask = np.asarray(mask)
        if not np.isin(host_mask, (0, 1)).all():
            _fail("attention_mask", "<values>", "expected only 0 and 1")
        ends_in_padding = host_mask[:, -1] == 0
        if ends_in_padding.any():
            rows = np.nonzero(ends_in_padding)[0][:5].tolist()
            source = (f"attention_mask (not passed; inferred as transformers does: input_ids != pad_token_id={pad}, "
                      "since that id occurs in input_ids and is no EOS id)" if inferred else "attention_mask")
            raise ValueError(
                f"{source}: rows {rows} end in padding (right-padded, or empty); jaxgen, like decoder-only "
                "generation in transformers, needs left padding: tokenize with padding_side='left'"
                + (", or pass attention_mask" if inferred else "")
            )

    # --- lengths ----------------------------------------------------------------------------
    max_new_tokens, max_length = _int(kw, "max_new_tokens", 1), _int(kw, "max_length", 1)
    min_new_tokens, min_length = _int(kw, "min_new_tokens", 0), _int(kw, "min_length", 0)
    for new_tokens, length in generation_config.LENGTHS:  # transformers warns and ignores `length`
        if kw[new_tokens] is not None and kw[length] is not None:
            raise ValueError(f"pass either {new_tokens} ({kw[new_tokens]}) or {length} ({kw[length]}), not both")
    limit_name = "n_positions" if config.position_limit is not None else "max_position_embeddings"
    if max_new_tokens is None and max_length is None:  # transformers 5.x: 20 tokens after the prompt
        cap = config.max_position_embeddings or prompt_len + HF_MAX_NEW_TOKENS
        max_new_tokens = min(prompt_len + HF_MAX_NEW_TOKENS, cap) - prompt_len
        if max_new_tokens < 1:
            _fail("input_ids", f"<prompt length {prompt_len}>",
                  f"no room for a new token within the model's {limit_name}={cap}; pass max_new_tokens")
    elif max_new_tokens is None:
        if max_length <= prompt_len:
            _fail("max_length", max_length, f"must exceed the prompt length {prompt_len}; or pass max_new_tokens")
        max_new_tokens = max_length - prompt_len
    if config.position_limit is not None and prompt_len + max_new_tokens > config.position_limit:
        raise ValueError(
            f"prompt length {prompt_len} + max_new_tokens {max_new_tokens} = {prompt_len + max_new_tokens} "
            f"exceeds the model's n_positions={config.position_limit}"
        )

    # --- strategy ---------------------------------------------------------------------------
    num_beams = _int(kw, "num_beams", 1, allow_none=False)
    nrs = _int(kw, "num_return_sequences", 1, allow_none=False)
    do_sample = _bool(kw, "do_sample")
    if num_beams > 1 and nrs > num_beams:
        _fail("num_return_sequences", nrs, f"must be <= num_beams={num_beams}")
    if num_beams == 1 and not do_sample and nrs != 1:
        _fail("num_return_sequences", nrs, "greedy search returns one sequence per prompt; use beams or sampling")
    early_stopping = kw["early_stopping"]
    if not (early_stopping is True or early_stopping is False or early_stopping == "never"):
        _fail("early_stopping", early_stopping, 'expected True, False or "never"')
    length_penalty = _float(kw, "length_penalty")
    if length_penalty is None:
        _fail("length_penalty", None, "expected a number")
    beam_search = num_beams > 1 if beam_search is None else beam_search

    sampling = {}
    if do_sample:
        sampling["temperature"] = _float(kw, "temperature", 0.0)
        sampling["top_h"] = _float(kw, "top_h", 0.0, 1.0)
        top_k = _int(kw, "top_k", 0)
        sampling["top_k"] = HF_TOP_K if top_k is None else top_k
        sampling["top_p"] = _float(kw, "top_p", 0.0, 1.0)
        sampling["min_p"] = _float(kw, "min_p", 0.0, 1.0, low_open=False)
        sampling["typical_p"] = _float(kw, "typical_p", 0.0, 1.0)
        sampling["epsilon_cutoff"] = _float(kw, "epsilon_cutoff", 0.0, 1.0, high_open=True)
        sampling["eta_cutoff"] = _float(kw, "eta_cutoff", 0.0, 1.0, high_open=True)
        key = kw["key"]
        if key is None:
            raise ValueError("sampling needs an explicit PRNG key: pass key=jax.random.key(seed)")
    else:
        given = [n for n in generation_config.SAMPLING_ONLY if kw[n] is not None]
        if given:
            raise ValueError(
                f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} only when sampling; pass "
                "do_sample=True (or use jaxgen.sample)"
            )
        key = None

    # --- processors -------------------------------------------------------------------------
    rep = _float(kw, "repetition_penalty", 0.0)
    ngram = _int(kw, "no_repeat_ngram_size", 0)
    bad_words = None if kw["bad_words_ids"] is None else _id_lists("bad_words_ids", kw["bad_words_ids"], vocab)
    sequence_bias = kw["sequence_bias"]
    if sequence_bias is not None:
        if isinstance(sequence_bias, (list, tuple)):
            try:
                sequence_bias = {tuple(s): b for s, b in sequence_bias}
            except (TypeError, ValueError):
                _fail("sequence_bias", kw["sequence_bias"], "expected {tuple_of_ids: bias} or [[ids, bias], ...]")
        if not isinstance(sequence_bias, dict) or not sequence_bias:
            _fail("sequence_bias", kw["sequence_bias"], "expected a non-empty {tuple_of_ids: float bias}")
        sequence_bias = {_token_ids("sequence_bias", list(s), vocab): float(b) for s, b in sequence_bias.items()}
    suppress = None if kw["suppress_tokens"] is None else _token_ids("suppress_tokens", kw["suppress_tokens"], vocab)
    begin_suppress = (None if kw["begin_suppress_tokens"] is None
                      else _token_ids("begin_suppress_tokens", kw["begin_suppress_tokens"], vocab))
    forced_bos, forced_eos = kw["forced_bos_token_id"], kw["forced_eos_token_id"]
    if forced_bos is not None:
        forced_bos = _single_id("forced_bos_token_id", forced_bos, vocab)
    if forced_eos is not None:
        forced_eos = _token_ids("forced_eos_token_id", forced_eos, vocab)
    decay = kw["exponential_decay_length_penalty"]
    if decay is not None:
        if (not isinstance(decay, (tuple, list)) or len(decay) != 2 or not isinstance(decay[0], (int, np.integer))
                or not isinstance(decay[1], (int, float)) or decay[1] <= 0):
            _fail("exponential_decay_length_penalty", decay, "expected (start_index: int, decay_factor: float > 0)")
        if not eos_ids:
            _fail("exponential_decay_length_penalty", decay, "needs eos_token_id")
        decay = (int(decay[0]), float(decay[1]))
    user_procs = kw["logits_processor"] or ()
    if not isinstance(user_procs, (list, tuple)) or not all(callable(p) for p in user_procs):
        _fail("logits_processor", user_procs, "expected a list of callables fn(scores, ctx) -> scores")
    torch_procs = [type(p).__name__ for p in user_procs
                   if any(c.__module__.startswith("transformers.") for c in type(p).__mro__)]
    if torch_procs:
        _fail("logits_processor", f"<{', '.join(torch_procs)}>",
              "transformers' processors run on torch tensors; pass the matching generate argument "
              "(temperature=..., top_p=..., ...) or a JAX function fn(scores, ctx) -> scores")
    for name in ("renormalize_logits", "remove_invalid_values", "output_scores", "output_logits"):
        _bool(kw, name)
    if kw["return_dict_in_generate"] is not True:
        _fail("return_dict_in_generate", kw["return_dict_in_generate"],
              "jaxgen always returns the output object; use out.sequences")

    suppressed = set(suppress or ())
    banned = suppressed | {w[0] for w in bad_words or () if len(w) == 1 and w[0] not in eos_ids}
    if (min_new_tokens or 0) > 0 or (min_length or 0) > prompt_len:
        banned |= set(eos_ids)  # EOS is banned at the first step too
    if len(banned) >= vocab:
        raise ValueError(
            "suppress_tokens / bad_words_ids (with min_new_tokens / min_length banning EOS) ban every token "
            "of the vocabulary; nothing can be generated"
        )
    # A forced step whose forced tokens are all suppressed leaves every score -inf (transformers:
    # a token of probability 0, or NaN probabilities when sampling). suppress_tokens apply at
    # every step (transformers' GenerationConfig.validate raises alike); begin_suppress_tokens at
    # the first step, which forces EOS when max_new_tokens == 1 (a forced BOS moves them on).
    first_step_forces_eos = max_new_tokens == 1 and not (prompt_len == 1 and forced_bos is not None)
    banned_at_eos = suppressed | (set(begin_suppress or ()) if first_step_forces_eos else set())
    for name, forced, banned_there, by in (
            ("forced_bos_token_id", {forced_bos} - {None}, suppressed, "by suppress_tokens"),
            ("forced_eos_token_id", set(forced_eos or ()), banned_at_eos,
             "by suppress_tokens, or by begin_suppress_tokens when max_new_tokens=1 forces it at the first step")):
        if forced and forced <= banned_there:
            _fail(name, kw[name], f"every forced token is also banned at the step that forces it ({by}), "
                  "which leaves no token at all")

    streamer = kw["streamer"]
    if streamer is not None:
        if not (callable(getattr(streamer, "put", None)) and callable(getattr(streamer, "end", None))):
            _fail("streamer", streamer,
                  "expected an object with put(token_ids) and end() (e.g. transformers.TextStreamer)")
        if beam_search:
            _fail("streamer", streamer,
                  "streaming is for greedy search and sampling, not beam search (as transformers)")

    mesh, data_axis, model_axis = kw["mesh"], kw["data_axis"], kw["model_axis"]
    if mesh is not None:
        sharding.check_mesh(mesh, data_axis, model_axis)
        sharding.check_context()
        mesh = sharding.auto_axes(mesh)
        d = sharding.axis_size(mesh, data_axis)
        if batch % d:
            _fail("input_ids", f"<batch {batch}>",
                  f"the batch must be divisible by the {d} devices of data_axis={data_axis!r}; pad it with "
                  "extra prompts (and drop their outputs)")
    else:
        data_axis = model_axis = None

    bucket = kw["prompt_bucket"]
    if bucket is not None and (isinstance(bucket, bool) or not isinstance(bucket, int) or bucket < 1):
        _fail("prompt_bucket", bucket, "expected None or an int >= 1 (prompts are left-padded to a multiple of it)")
    bucket_len = prompt_len if not bucket else -(-prompt_len // bucket) * bucket

    processors = build_processors(
        prompt_len=prompt_len, max_length=prompt_len + max_new_tokens, eos_token_ids=eos_ids,
        num_beams=num_beams, do_sample=do_sample, repetition_penalty=rep, no_repeat_ngram_size=ngram,
        bad_words_ids=bad_words, sequence_bias=sequence_bias, min_length=min_length,
        min_new_tokens=min_new_tokens, forced_bos_token_id=forced_bos, forced_eos_token_id=forced_eos,
        remove_invalid_values=kw["remove_invalid_values"], exponential_decay_length_penalty=decay,
        suppress_tokens=suppress, begin_suppress_tokens=begin_suppress,
        logits_processor=tuple(UserProcessor(p) for p in user_procs),
        renormalize_logits=kw["renormalize_logits"], **sampling,
    )
    spec = DecodeSpec(
        bucket_len=bucket_len, max_new_tokens=max_new_tokens,
        eos_token_ids=eos_ids, pad_token_id=pad, stop_sequences=stops or (), do_sample=do_sample, num_beams=num_beams,
        beam_search=beam_search, num_return_sequences=nrs, early_stopping=early_stopping,
        output_scores=kw["output_scores"], output_logits=kw["output_logits"], stream=streamer is not None,
        mesh=mesh, data_axis=data_axis, model_axis=model_axis,
        recompute=config.recompute_at is not None and 1 <= config.recompute_at - prompt_len < max_new_tokens,
    )
    spec = dataclasses.replace(spec, phases=loop_phases(model, ids.shape[0], spec))
    ids, mask = _left_pad(ids, mask, bucket_len, pad if pad is not None else 0)
    return Request(spec, ids, mask, jnp.int32(prompt_len), processors, key, jnp.float32(length_penalty), streamer)


def _default_mask(ids, pad: int | None, eos_ids: tuple[int, ...]):
    """The mask transformers builds when none is passed (``_prepare_attention_mask_for_generation``):
    ``input_ids != pad_token_id`` where the pad id occurs anywhere in the batch and is not an EOS
    id, else all ones. int32[batch, prompt_len]; numpy for concrete ids, jnp for tracers."""
    xp = np if _is_concrete(ids) else jnp
    if pad is None or pad in eos_ids:
        return xp.ones(ids.shape, xp.int32)
    is_pad = xp.asarray(ids) == pad
    return xp.where(is_pad.any(), ~is_pad, True).astype(xp.int32)


def _left_pad(ids, mask, length: int, pad: int):
    """Left-pads ``[batch, L]`` to ``[batch, length]`` (numpy on the host, jnp for tracers)."""
    xp = np if _is_concrete(ids) and _is_concrete(mask) else jnp
    width = length - ids.shape[1]
    ids = xp.pad(xp.asarray(ids).astype(xp.int32), ((0, 0), (width, 0)), constant_values=pad)
    mask = xp.pad(xp.asarray(mask).astype(xp.int32), ((0, 0), (width, 0)), constant_values=0)
    return ids, mask


class UserProcessor:
    """Wraps a user's ``fn(scores, ctx) -> scores`` as a static (hashable) pipeline entry."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, scores, ctx):
        return self.fn(scores, ctx)

    def __hash__(self):
        return hash(self.fn)

    def __eq__(self, other):
        return isinstance(other, UserProcessor) and other.fn == self.fn


jax.tree_util.register_static(UserProcessor)
