"""Host-side validation of ``generate`` arguments, before anything is traced.

Every check raises ``ValueError`` naming the argument, its value and what is allowed; where
transformers warns and proceeds, a Python warning says the same and the call proceeds alike.
Checks that need concrete values (token ids in range, right padding) run when the inputs are
concrete and are skipped for tracers (a decoder called inside the user's own ``jax.jit``) and for
global arrays that span several hosts (each host sees only its own rows).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen import generation_config, sharding
from jaxgen.decoding import dola, guidance
from jaxgen.decoding import lookup as lookup_decoder
from jaxgen.decoding.engine import DecodeSpec, loop_phases
from jaxgen.decoding.stop_strings import StopStrings
from jaxgen.models.model import CausalLM
from jaxgen.models.rope import Rope
from jaxgen.processors import build_processors

# Hugging Face's names and defaults (GenerationConfig._get_default_generation_params).
DEFAULTS: dict[str, Any] = {
    "max_new_tokens": None, "max_length": None, "min_new_tokens": None, "min_length": None,
    "num_beams": 1, "num_return_sequences": 1, "length_penalty": 1.0, "early_stopping": False,
    "eos_token_id": None, "pad_token_id": None, "bos_token_id": None, "do_sample": False,
    "temperature": None, "top_h": None, "top_k": None, "top_p": None, "min_p": None, "typical_p": None,
    "epsilon_cutoff": None, "eta_cutoff": None,
    "repetition_penalty": None, "no_repeat_ngram_size": None, "bad_words_ids": None,
    "encoder_repetition_penalty": None, "encoder_no_repeat_ngram_size": None,
    "sequence_bias": None, "suppress_tokens": None, "begin_suppress_tokens": None,
    "forced_bos_token_id": None, "forced_eos_token_id": None,
    "exponential_decay_length_penalty": None, "renormalize_logits": False,
    "remove_invalid_values": False, "logits_processor": (),
    "output_scores": False, "output_logits": False, "output_attentions": False, "output_hidden_states": False,
    "return_dict_in_generate": True,  # jaxgen's default
    "stop_sequences": None, "stop_strings": None, "tokenizer": None, "streamer": None, "prompt_bucket": 32,
    "key": None,
    "prompt_lookup_num_tokens": None, "max_matching_ngram_size": None, "penalty_alpha": None,
    "num_beam_groups": None, "diversity_penalty": None, "force_words_ids": None, "constraints": None,
    "assistant_model": None, "num_assistant_tokens": None, "num_assistant_tokens_schedule": None,
    "assistant_confidence_threshold": None, "assistant_early_exit": None, "dola_layers": None,
    "guidance_scale": None, "negative_prompt_ids": None, "negative_prompt_attention_mask": None,
    "mesh": None, "data_axis": "data", "model_axis": "model",
}
# Flags that transformers tests for truth: None is False there.
FLAGS = ("do_sample", "renormalize_logits", "remove_invalid_values", "output_scores", "output_logits",
         "output_attentions", "return_dict_in_generate")
HF_MAX_NEW_TOKENS = 20  # without a length: max_length = prompt + 20, at most max_position_embeddings
HF_TOP_K = 50
# transformers' global defaults of the sampling settings: on a call that does not sample they
# change nothing, and transformers takes them silently (other values with a warning).
SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": HF_TOP_K, "top_p": 1.0, "typical_p": 1.0, "min_p": None,
                     "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "top_h": None}


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
    penalty_alpha: Any  # float32[], contrastive search's
    assistant: Any = None  # the draft model of assisted decoding (`lookup.Assistant`), or None
    guidance: Any = None  # classifier-free guidance (`guidance.Guidance`), or None
    streamer: Any = None  # host object with put(np.ndarray) and end()
    return_dict: bool = True  # False: the call returns the sequences alone, as transformers
    prompt: Any = None  # int[batch, L], the prompt as passed (bos_token_id where it was None)
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


def _token_ids(name, value, vocab, allow_empty=False, any_id=False) -> tuple[int, ...]:
    """An id or a list of ids (or a numpy / jax / torch array of them) -> tuple of ints in [0, vocab)
    (``any_id``: any int, for the ids transformers takes outside the vocabulary)."""
    if not isinstance(value, (list, tuple)) and hasattr(value, "__array__"):
        value = np.asarray(value).tolist()
    items = [value] if _is_int(value) else value
    if not isinstance(items, (list, tuple)) or not all(_is_int(t) for t in items) or (not items and not allow_empty):
        _fail(name, value, "expected a token id or a list of token ids")
    ids = tuple(int(t) for t in items)
    bad = [t for t in ids if not (0 <= t < vocab or any_id)]
    if bad:
        _fail(name, value, f"token ids must be in [0, {vocab}) (the model's vocab_size); got {bad}")
    return ids


def _host_array(name: str, value) -> np.ndarray:
    """``value`` (nested lists, a numpy / torch array) as a numpy array; ValueError naming
    ``name`` for ragged lists and other values numpy cannot stack."""
    try:
        return np.asarray(value)
    except (ValueError, TypeError) as e:
        _fail(name, f"<{type(value).__name__}>", f"expected a rectangular [batch, length] array or list of lists ({e})")


def _check_vocabulary(name: str, ids: np.ndarray, vocab: int) -> None:
    """ValueError naming ``name`` where a host array of token ids leaves ``[0, vocab)``."""
    if ids.min() < 0 or ids.max() >= vocab:
        bad = ids[(ids < 0) | (ids >= vocab)][:5].tolist()
        _fail(name, f"<contains {bad}>", f"token ids must be in [0, {vocab}) (the model's vocab_size)")


def _ropes(config) -> list[Rope]:
    """The config's rotary embeddings (one per layer type)."""
    return [getattr(config, f.name) for f in dataclasses.fields(config) if isinstance(getattr(config, f.name), Rope)]


def _guidance(kw, config, batch: int, nrs: int, max_new_tokens: int, other_mode: str | None):
    """Classifier-free guidance's `guidance.Guidance` where ``guidance_scale`` is set and not 1
    (transformers adds its processor then), else None; ``negative_prompt_ids`` (with its mask;
    without them each row's last prompt token, under the mask where one is given) is the
    unconditional prompt, one row per prompt."""
    scale = _float(kw, "guidance_scale")
    if scale is None or scale == 1:
        return None
    if other_mode:
        _fail("guidance_scale", scale, f"not with {other_mode}: classifier-free guidance is implemented for greedy "
              "search and sampling in jaxgen (not yet beside other modes)")
    if kw["mesh"] is not None:
        _fail("guidance_scale", scale, "not with a mesh: classifier-free guidance on a mesh is not implemented in "
              "jaxgen yet")
    if any(r.dynamic is not None for r in _ropes(config)):
        _fail("guidance_scale", scale, "this model's rotary embedding is dynamic (its frequencies follow the longest "
              "sequence seen), which transformers shares between the two branches of the guidance; classifier-free "
              "guidance with it is not implemented in jaxgen yet")
    ids, mask = kw["negative_prompt_ids"], kw["negative_prompt_attention_mask"]
    if ids is not None:
        ids = _host_array("negative_prompt_ids", ids)
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer) or ids.shape[0] != batch or ids.shape[1] == 0:
            _fail("negative_prompt_ids", f"<{ids.dtype}{list(ids.shape)}>", f"expected integer ids [{batch}, length]: "
                  "one unconditional prompt per prompt")
        _check_vocabulary("negative_prompt_ids", ids, config.vocab_size)
        if config.position_limit is not None and ids.shape[1] + max_new_tokens - 1 > config.position_limit:
            _fail("negative_prompt_ids", f"<shape {list(ids.shape)}>", f"its {ids.shape[1]} tokens and the "
                  f"{max_new_tokens - 1} generated ones that follow them exceed the model's n_positions="
                  f"{config.position_limit} (transformers fails there)")
    expected = (batch, 1) if ids is None else ids.shape
    if (ids is not None or mask is not None) and nrs > 1:
        name = "negative_prompt_ids" if ids is not None else "negative_prompt_attention_mask"
        _fail(name, f"<shape {list(expected)}>", f"not with num_return_sequences={nrs}: transformers does not repeat "
              "the unconditional prompt for each returned sequence (its shapes then disagree)")
    if mask is not None:
        mask = _host_array("negative_prompt_attention_mask", mask)
        if mask.shape != expected or not np.isin(mask, (0, 1)).all():
            _fail("negative_prompt_attention_mask", f"<{mask.dtype}{list(mask.shape)}>",
                  f"expected 0/1 values of shape {list(expected)} (negative_prompt_ids' shape, or [batch, 1] for "
                  "the prompts' last tokens)")
        mask = jnp.asarray(mask, jnp.int32)
    return guidance.Guidance(jnp.float32(scale), None if ids is None else jnp.asarray(ids, jnp.int32), mask)


def _prng_key(value):
    """A single JAX PRNG key (typed ``jax.random.key`` or raw ``jax.random.PRNGKey``), or
    ValueError naming ``key``."""
    if isinstance(value, jax.Array) and jnp.issubdtype(value.dtype, jax.dtypes.prng_key):
        if value.shape == ():
            return value
        _fail("key", f"<{value.shape[0] if value.ndim else ''} keys, shape {list(value.shape)}>",
              "expected one key (jax.random.key(seed)); jaxgen draws every row's tokens from it")
    if isinstance(value, (jax.Array, np.ndarray)) and value.shape == (2,) and value.dtype == np.uint32:
        return value
    shown = f"<{value.dtype}{list(value.shape)}>" if hasattr(value, "shape") else value
    _fail("key", shown, "expected a JAX PRNG key: jax.random.key(seed) (or a raw jax.random.PRNGKey(seed))")


def _sequence_bias(value, vocab) -> dict[tuple[int, ...], float]:
    """transformers' ``sequence_bias`` ({tuple of ids: bias} or [[ids, bias], ...]) -> a dict,
    or ValueError naming it."""
    expected = "expected {tuple_of_ids: float bias} or [[list_of_ids, float bias], ...]"
    items = value.items() if isinstance(value, dict) else value
    if not isinstance(items, (list, tuple, type({}.items()))) or not items:
        _fail("sequence_bias", value, expected)
    out = {}
    for entry in items:
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], (list, tuple))
                and entry[0] and isinstance(entry[1], (int, float, np.number)) and not isinstance(entry[1], bool)):
            _fail("sequence_bias", value, expected)
        out[_token_ids("sequence_bias", list(entry[0]), vocab)] = float(entry[1])
    return out


def _single_id(name, value, vocab, any_id=False) -> int:
    ids = _token_ids(name, value, vocab, any_id=any_id)
    if len(ids) != 1:
        _fail(name, value, "expected a single token id")
    return ids[0]


def _id_lists(name, value, vocab, allow_empty=False) -> tuple[tuple[int, ...], ...] | None:
    """A non-empty list of non-empty lists of token ids -> tuple of tuples. ``allow_empty``: empty
    inner lists are dropped (they match nothing in transformers' bad_words_ids), None if none is left."""
    if (not isinstance(value, (list, tuple)) or not value
            or not all(isinstance(ids, (list, tuple)) and (ids or allow_empty) for ids in value)):
        _fail(name, value, "expected a non-empty list of non-empty lists of token ids")
    return tuple(_token_ids(name, list(ids), vocab) for ids in value if ids) or None


def _stop_strings(strings, tokenizer) -> StopStrings | None:
    """``stop_strings`` (a string or a list of them) with the tokenizer that spells them, as
    transformers' ``StopStringCriteria`` takes them."""
    if strings is None:
        return None
    strings = (strings,) if isinstance(strings, str) else strings
    if not isinstance(strings, (list, tuple)) or not strings or not all(isinstance(s, str) for s in strings):
        _fail("stop_strings", strings, "expected a string or a non-empty list of strings")
    if tokenizer is None:  # transformers' error
        raise ValueError("There are one or more stop strings, either in the arguments to `generate` or in the model's "
                         "generation config, but we could not locate a tokenizer. When generating with stop strings, "
                         "you must pass the model's tokenizer to the `tokenizer` argument of `generate`.")
    try:
        return StopStrings.build(tokenizer, tuple(strings))
    except ImportError as e:
        _fail("stop_strings", list(strings), f"transformers builds the stop strings' table with torch, which is "
              f"missing ({e}); install torch, or pass the stop texts' token ids as stop_sequences=[[ids...], ...]")


def _constraints(kw, vocab) -> tuple[tuple[tuple[int, ...], ...], ...]:
    """``constraints`` then ``force_words_ids`` (4.53's order) -> each constraint's token
    sequences: one for a phrase (a ``PhrasalConstraint``, a ``list[int]``), several for a
    disjunction (a ``DisjunctiveConstraint``, a ``list[list[int]]``), checked as 4.53 checks them."""
    found = []
    given = kw["constraints"]
    if given is not None:
        if not isinstance(given, (list, tuple)) or not given:  # an empty list: transformers' max() fails
            _fail("constraints", given, "expected a non-empty list of PhrasalConstraint and DisjunctiveConstraint "
                  "objects")
        for c in given:
            kind = type(c).__name__
            if kind == "PhrasalConstraint":
                found.append((_token_ids("constraints", list(c.token_ids), vocab),))
            elif kind == "DisjunctiveConstraint":
                found.append(_alternatives("constraints", c.token_ids, vocab))
            else:
                _fail("constraints", f"<{kind}>", "jaxgen runs transformers' PhrasalConstraint and "
                      "DisjunctiveConstraint (or force_words_ids); a Constraint class of your own is host-side Python")
    words = kw["force_words_ids"]
    if words is not None:
        if not isinstance(words, (list, tuple)) or not words or not all(isinstance(w, (list, tuple)) and w
                                                                        for w in words):
            _fail("force_words_ids", words, "expected a list[list[int]] or list[list[list[int]]] of token ids")
        for w in words:
            found.append(_alternatives("force_words_ids", w, vocab) if isinstance(w[0], (list, tuple))
                         else (_token_ids("force_words_ids", list(w), vocab),))
    return tuple(found)


def _alternatives(name, value, vocab) -> tuple[tuple[int, ...], ...]:
    """A disjunction's token sequences, none a prefix of another (4.53's ``DisjunctiveTrie``)."""
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, (list, tuple)) for v in value):
        _fail(name, value, "a disjunction is a non-empty list of lists of token ids")
    seqs = tuple(_token_ids(name, list(v), vocab) for v in value)
    for i, a in enumerate(seqs):
        if any(j != i and b[:len(a)] == a for j, b in enumerate(seqs)):
            _fail(name, [list(v) for v in seqs], f"{list(a)} is a prefix of another sequence of the disjunction "
                  "(transformers raises too: each list can't be a complete subset of another)")
    return seqs


def _bool(kw, name):
    """A flag: True, False, or None, which transformers takes as False (it tests flags for truth)."""
    if kw[name] is not None and not isinstance(kw[name], (bool, np.bool_)):
        _fail(name, kw[name], "expected True or False")
    return bool(kw[name])


def _warn_beam_only(kw, kwargs, settings) -> None:
    """transformers' warning (GenerationConfig.validate) for each beam-only setting of ``settings``
    ((name, its off values)) that a one-beam call passes set."""
    for name, off in settings:
        if name in kwargs and kw[name] not in off:
            warnings.warn(f"num_beams is set to 1. However, {name} is set to {kw[name]} -- this flag is only used "
                          f"in beam-based generation modes. You should set num_beams>1 or unset {name}.", stacklevel=5)


def _warn_unfeasible_minimum(prompt_len: int, max_length: int, min_length: int | None,
                             min_new_tokens: int | None, default_length: bool):
    """transformers' warnings for a minimum length above the maximum (`_validate_generated_length`);
    generation stops at the maximum."""
    suffix = (" Generation will stop at the defined maximum length. You should decrease the minimum length and/or "
              "increase the maximum length.")
    if default_length:
        suffix += f" Note that max_length is set to {max_length}, its default value."
    if min_new_tokens is not None:
        min_length = min_new_tokens + prompt_len
    if min_length is not None and min_length > max_length:
        warnings.warn(f"Unfeasible length constraints: min_length ({min_length}) is larger than the maximum possible "
                      f"length ({max_length})." + suffix, stacklevel=5)
    if min_new_tokens is not None and min_length > max_length:
        warnings.warn(f"Unfeasible length constraints: min_new_tokens ({min_new_tokens}), when added to the prompt "
                      f"length ({prompt_len}), is larger than the maximum possible length ({max_length})." + suffix,
                      stacklevel=5)


def parse(model: CausalLM, input_ids, attention_mask, kwargs: dict[str, Any],
          beam_search: bool | None = None, neutral_processors: bool = False) -> Request:
    """Validates a ``generate`` call and resolves its defaults as transformers: the caller's
    arguments, else the model's ``generation_config``, else Hugging Face's defaults.

    ``beam_search``: run the beam decoder (True), the one-token-per-row decoder (False), or
    dispatch as transformers does (None: beams iff ``num_beams > 1``). ``neutral_processors``:
    see `processors.build_processors`'s ``neutral``.
    """
    for name in sorted(set(kwargs) - set(DEFAULTS)):
        reason = generation_config.unsupported(name, kwargs[name], DEFAULTS, "generate got")
        if reason and name not in generation_config.UNSUPPORTED and name not in generation_config.HF_FIELDS:
            close = difflib.get_close_matches(name, DEFAULTS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown generate argument {name!r}{hint}; supported: {', '.join(sorted(DEFAULTS))}")
        if reason:
            raise ValueError(reason)
    if not isinstance(model, CausalLM):
        raise ValueError(f"model must be a jaxgen CausalLM (from jaxgen.from_pretrained), got {type(model).__name__}")
    kw = {**DEFAULTS, **generation_config.with_call(model.generation_config, kwargs, DEFAULTS)}
    for name in FLAGS:
        kw[name] = _bool(kw, name)
    config = model.config
    vocab = config.vocab_size

    # --- special tokens ---------------------------------------------------------------------
    # An explicit eos_token_id=None turns EOS off, as in transformers; the model's own otherwise.
    # Ids outside the vocabulary pass, as there: an EOS or pad id the model cannot emit (a tokenizer's
    # added [PAD], say) only fills finished rows.
    eos = kw["eos_token_id"] if kw["eos_token_id"] is not None or "eos_token_id" in kwargs else config.eos_token_id
    eos_ids = () if eos is None else _token_ids("eos_token_id", eos, vocab, allow_empty=True, any_id=True)
    if any(t < 0 for t in eos_ids):
        warnings.warn(f"eos_token_id should consist of positive integers, but is {list(eos_ids)}; the negative ids "
                      "never match, as in transformers (generation does not stop on them)", stacklevel=4)
        eos_ids = tuple(t for t in eos_ids if t >= 0)
    pad = None if kw["pad_token_id"] is None else _single_id("pad_token_id", kw["pad_token_id"], vocab, any_id=True)
    if pad is not None and pad < 0:
        warnings.warn(f"pad_token_id should be positive but got {pad}. This will cause errors when batch generating, "
                      "if there is padding (transformers' warning; jaxgen fills finished rows with it)", stacklevel=4)
    stops = None if kw["stop_sequences"] is None else _id_lists("stop_sequences", kw["stop_sequences"], vocab)
    stop_strings = _stop_strings(kw["stop_strings"], kw["tokenizer"])
    stopper = (("stop_sequences", [list(x) for x in stops]) if stops else  # the stop argument, for refusals
               ("stop_strings", kw["stop_strings"]) if stop_strings else None)
    if pad is None and eos_ids:  # silently, as transformers 5.x (but for a batch without a mask, below)
        if attention_mask is None and np.ndim(input_ids) == 2 and np.shape(input_ids)[0] > 1:
            warnings.warn("The attention mask and the pad token id were not set, with a batched input. As a "
                          "consequence, you may observe unexpected behavior. Please pass your input's attention_mask "
                          f"to obtain reliable results (padding with eos_token_id {eos_ids[0]}, as transformers)",
                          stacklevel=4)
        pad = eos_ids[0]
    if pad is None and stops:
        raise ValueError(f"pad_token_id is missing, but rows can finish early (stop_sequences="
                         f"{[list(s) for s in stops]}) and there is no eos_token_id to pad with; pass pad_token_id")

    # --- inputs ---------------------------------------------------------------------------
    if input_ids is None:  # transformers starts every row from bos_token_id
        bos = kw["bos_token_id"] if kw["bos_token_id"] is not None else config.bos_token_id
        if bos is None:
            raise ValueError("input_ids=None is not allowed without a bos_token_id: generation starts every row from "
                             "it (as transformers), and neither the call nor the model gives one")
        rows = 1 if attention_mask is None else np.shape(attention_mask)[0]
        input_ids, attention_mask = np.full((rows, 1), _single_id("bos_token_id", bos, vocab)), None
    ids = input_ids if isinstance(input_ids, jax.Array) else _host_array("input_ids", input_ids)
    if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
        _fail("input_ids", f"<{ids.dtype}{list(ids.shape)}>", "expected an integer array [batch, prompt_len]")
    batch, prompt_len = ids.shape
    if batch == 0 or prompt_len == 0:
        _fail("input_ids", f"<shape {list(ids.shape)}>", "expected at least one row and one token")
    if _is_concrete(ids):
        host_ids = np.asarray(ids)
        _check_vocabulary("input_ids", host_ids, vocab)
        unsupported = sorted(set(config.unsupported_token_ids) & set(np.unique(host_ids).tolist()))
        if unsupported:
            _fail("input_ids", f"<contains {unsupported}>", "these ids stand for images, which jaxgen does not run "
                  "(it runs this checkpoint's language model); pass text tokens only")

    # --- attention mask ---------------------------------------------------------------------
    if attention_mask is None:
        mask = _default_mask(ids, pad, eos_ids)
    else:
        mask = attention_mask if isinstance(attention_mask, jax.Array) else _host_array("attention_mask",
                                                                                           attention_mask)
        if mask.shape != ids.shape:
            _fail("attention_mask", f"<shape {list(mask.shape)}>", f"expected the shape of input_ids {list(ids.shape)}")
    if _is_concrete(mask):
        host_mask = np.asarray(mask)
        if not np.isin(host_mask, (0, 1)).all():
            _fail("attention_mask", "<values>", "expected only 0 and 1")
        if batch > 1 and (host_mask[:, -1] == 0).any():
            warnings.warn("A decoder-only architecture is being used, but right-padding was detected (rows "
                          f"{np.nonzero(host_mask[:, -1] == 0)[0][:5].tolist()} of attention_mask end in padding); "
                          "for correct generation results, tokenize with padding_side='left' (generating as "
                          "transformers does: from the last column, whatever its mask)", stacklevel=4)

    # --- lengths ----------------------------------------------------------------------------
    max_new_tokens, max_length = _int(kw, "max_new_tokens", 1), _int(kw, "max_length", 1)
    min_new_tokens, min_length = _int(kw, "min_new_tokens"), _int(kw, "min_length")  # <= 0: none, as there
    for new_tokens, length in generation_config.LENGTHS:  # transformers warns and ignores `length`
        if kw[new_tokens] is not None and kw[length] is not None:
            warnings.warn(f"Both {new_tokens} (={kw[new_tokens]}) and {length} (={kw[length]}) seem to have been "
                          f"set. {new_tokens} will take precedence (as in transformers).", stacklevel=4)
    if max_new_tokens is not None:
        max_length = None
    if min_new_tokens is not None:
        min_length = None
    limit_name = "n_positions" if config.position_limit is not None else "max_position_embeddings"
    default_length = max_new_tokens is None and max_length is None
    if default_length:  # transformers 5.x: 20 tokens after the prompt
        cap = config.max_position_embeddings or prompt_len + HF_MAX_NEW_TOKENS
        max_new_tokens = min(prompt_len + HF_MAX_NEW_TOKENS, cap) - prompt_len
        if max_new_tokens < 1:
            _fail("input_ids", f"<prompt length {prompt_len}>",
                  f"no room for a new token within the model's {limit_name}={cap}; pass max_new_tokens")
        warnings.warn(f"Using the model-agnostic default max_length ({HF_MAX_NEW_TOKENS} tokens after the prompt, "
                      f"within the model's {limit_name}) to control the generation length. We recommend setting "
                      "max_new_tokens to control the maximum length of the generation.", stacklevel=4)
    elif max_new_tokens is None:
        if max_length <= prompt_len:
            _fail("max_length", max_length, f"must exceed the prompt length {prompt_len}; or pass max_new_tokens")
        max_new_tokens = max_length - prompt_len
    _warn_unfeasible_minimum(prompt_len, prompt_len + max_new_tokens, min_length, min_new_tokens, default_length)
    min_length = min_length if (min_length or 0) > 0 else None
    min_new_tokens = min_new_tokens if (min_new_tokens or 0) > 0 else None
    if config.position_limit is not None and prompt_len + max_new_tokens > config.position_limit:
        raise ValueError(
            f"prompt length {prompt_len} + max_new_tokens {max_new_tokens} = {prompt_len + max_new_tokens} "
            f"exceeds the model's n_positions={config.position_limit}"
        )

    # --- strategy ---------------------------------------------------------------------------
    num_beams = _int(kw, "num_beams", 1, allow_none=False)
    nrs = _int(kw, "num_return_sequences", 1, allow_none=False)
    do_sample = kw["do_sample"]
    if num_beams > 1 and nrs > num_beams:
        _fail("num_return_sequences", nrs, f"must be <= num_beams={num_beams}")
    if num_beams == 1 and not do_sample and nrs != 1:
        _fail("num_return_sequences", nrs, "greedy methods (do_sample=False without beams: greedy and contrastive "
              "search) return one sequence per prompt, as in transformers; use beams or sampling")
    early_stopping = False if kw["early_stopping"] is None else kw["early_stopping"]
    if not (early_stopping is True or early_stopping is False or early_stopping == "never"):
        _fail("early_stopping", early_stopping, 'expected True, False or "never"')
    beam_search = num_beams > 1 if beam_search is None else beam_search
    length_penalty = _float(kw, "length_penalty")
    if length_penalty is None and beam_search:  # transformers' beam search fails on it
        _fail("length_penalty", None, "expected a number")
    length_penalty = 1.0 if length_penalty is None else length_penalty
    if num_beams == 1:
        _warn_beam_only(kw, kwargs, (("early_stopping", (None, False)), ("length_penalty", (None, 1.0))))
    groups = _int(kw, "num_beam_groups", 1) or 1
    diversity = _float(kw, "diversity_penalty") or 0.0
    constraints = _constraints(kw, vocab)
    if constraints:  # transformers 4.53's checks of constrained beam search
        name = "force_words_ids" if kw["force_words_ids"] is not None else "constraints"
        why = f"{name} triggers constrained beam search, which needs "
        if do_sample:
            _fail("do_sample", True, why + "do_sample=False")
        if not beam_search:
            _fail("num_beams", num_beams, why + "beams (num_beams > 1)")
        if groups != 1:
            _fail("num_beam_groups", groups, why + "num_beam_groups=1")
        if stopper:
            _fail(*stopper, f"not with constrained beam search ({name}): not implemented in jaxgen yet")
    if beam_search and (groups != 1 or diversity != 0.0):  # transformers 4.53's checks of group beam search
        why = "diversity_penalty is not 0.0 or num_beam_groups is not 1, which is group beam search; it needs "
        if do_sample:
            _fail("do_sample", True, why + "do_sample=False")
        if num_beams % groups:
            _fail("num_beam_groups", groups, why + f"num_beams={num_beams} divisible by num_beam_groups")
        if diversity == 0.0:
            _fail("diversity_penalty", kw["diversity_penalty"], why + "diversity_penalty > 0.0 (otherwise the groups "
                  "are identical)")
        if groups == 1:
            _fail("diversity_penalty", diversity, "needs num_beam_groups > 1: it penalises a group's tokens that "
                  "earlier groups chose at the same step")
        if stopper:
            _fail(*stopper, f"not with group beam search (num_beam_groups={groups}): not implemented in jaxgen yet")
    elif groups != 1 or diversity != 0.0:
        _warn_beam_only(kw, kwargs, (("num_beam_groups", (None, 1, 0.0)), ("diversity_penalty", (None, 1, 0.0))))
        groups, diversity = 1, 0.0
    penalty_alpha = _float(kw, "penalty_alpha")
    # transformers' dispatch (GenerationConfig.get_generation_mode); top_k counts only when used
    contrastive = not beam_search and not do_sample and (penalty_alpha or 0) > 0
    top_k = _int(kw, "top_k", 0) if do_sample or contrastive else None
    top_k = HF_TOP_K if top_k is None else top_k
    contrastive = top_k if contrastive and top_k > 1 else 0
    lookup = _int(kw, "prompt_lookup_num_tokens", 1)
    lookup_ngram = _int(kw, "max_matching_ngram_size", 1)
    assistant = kw["assistant_model"]
    early_exit = _int(kw, "assistant_early_exit", 1)
    if assistant is not None:
        if not isinstance(assistant, CausalLM):
            _fail("assistant_model", f"<{type(assistant).__name__}>", "expected a jaxgen CausalLM (from "
                  "jaxgen.from_pretrained) sharing the model's tokenizer")
        if assistant.config.vocab_size != vocab:
            _fail("assistant_model", f"<{assistant.config.model_type}, vocab_size {assistant.config.vocab_size}>",
                  f"the draft model must share the model's vocabulary (vocab_size {vocab})")
    # transformers' order (`_get_candidate_generator`): the model's own first layers, then prompt
    # lookup, then the assistant model draft; the others are not used
    drafters = [(name, value) for name, value in (("assistant_early_exit", early_exit),
                ("prompt_lookup_num_tokens", lookup), ("assistant_model", assistant)) if value is not None]
    for name, value in drafters[1:]:
        shown = "<model>" if name == "assistant_model" else value
        warnings.warn(f"{drafters[0][0]}={drafters[0][1]} drafts the tokens of assisted generation; {name}={shown} "
                      "is not used (as in transformers)", stacklevel=4)
    drafter = drafters[0][0] if drafters else None
    with_what = {"assistant_model": "an assistant_model", "assistant_early_exit": f"assistant_early_exit={early_exit}",
                 "prompt_lookup_num_tokens": f"prompt_lookup_num_tokens={lookup}"}.get(drafter)
    if contrastive:
        if contrastive > vocab:
            _fail("top_k", top_k, f"contrastive search (penalty_alpha={penalty_alpha}) takes the top_k most probable "
                  f"tokens as candidates, at most the model's vocabulary of {vocab} (transformers' topk fails too)")
        if kwargs.get("use_cache") is False:
            _fail("use_cache", False, "contrastive search (penalty_alpha > 0, top_k > 1) needs the cache (as in "
                  "transformers)")
    if drafter and (beam_search or contrastive):  # transformers logs this and runs the base mode
        mode = "contrastive search" if contrastive else "group beam search" if groups > 1 else "beam search"
        warnings.warn(f"{with_what} triggers assisted generation, which runs with greedy search and sampling only; "
                      f"this call's decoding mode is {mode}, so it is ignored (as in transformers)", stacklevel=4)
        drafter = None
    dola_layers = ()
    if kw["dola_layers"] is not None:
        if beam_search or contrastive or drafter:  # transformers logs this and runs the call's own mode
            mode = ("assisted generation" if drafter else "contrastive search" if contrastive
                    else "group beam search" if groups > 1 else "beam search")
            warnings.warn(f"dola_layers={kw['dola_layers']!r} triggers DoLa decoding, which runs with greedy search "
                          f"and sampling only; this call's decoding mode is {mode}, so it is ignored (as in "
                          "transformers)", stacklevel=4)
        else:
            dola_layers = dola.candidate_layers(kw["dola_layers"], config.n_layers, config.tie_word_embeddings)
    guided = _guidance(kw, config, batch, nrs, max_new_tokens, "assisted decoding" if drafter else "contrastive search"
                       if contrastive else "beam search" if beam_search else "DoLa decoding" if dola_layers else None)
    draft_model, schedule, confidence = None, None, 0.0
    if drafter:
        if nrs > 1:
            _fail("num_return_sequences", nrs, f"not with {with_what}: it has to be 1 when doing assisted generate "
                  "(as in transformers)")
        if kwargs.get("use_cache") is False:
            _fail("use_cache", False, f"not with {with_what}: assisted decoding verifies drafts on the KV cache (as "
                  "in transformers, which raises too)")
        if kw["mesh"] is not None:
            _fail("mesh", kw["mesh"], f"not with {with_what}: assisted decoding on a mesh is not implemented in "
                  "jaxgen yet")
    if drafter in ("assistant_model", "assistant_early_exit"):
        # The draft settings: the call's (or the model's generation config), else the draft's
        # generation config, where transformers reads them, else transformers' defaults.
        draft_model = assistant if drafter == "assistant_model" else model.early_exit(early_exit)
        draft_kw = {name: kw[name] if kw[name] is not None else draft_model.generation_config.get(name, default)
                    for name, default in (("num_assistant_tokens", 20), ("num_assistant_tokens_schedule", "constant"),
                                          ("assistant_confidence_threshold", 0.4))}
        lookup, lookup_ngram = _int(draft_kw, "num_assistant_tokens", 1), 0
        schedule = draft_kw["num_assistant_tokens_schedule"]
        if schedule not in ("constant", "heuristic", "heuristic_transient"):
            warnings.warn(f"num_assistant_tokens_schedule={schedule!r} is none of 'constant', 'heuristic' and "
                          "'heuristic_transient': the draft length stays constant (as in transformers)", stacklevel=4)
        confidence = _float(draft_kw, "assistant_confidence_threshold") or 0.0
    elif drafter == "prompt_lookup_num_tokens":
        lookup_ngram = lookup_ngram or 2
    else:
        lookup = None

    sampling = {}
    if do_sample:
        sampling["temperature"] = _float(kw, "temperature", 0.0)
        if sampling["temperature"] is not None and np.float32(sampling["temperature"]) == 0:
            _fail("temperature", kw["temperature"], "expected a number > 0 that float32 holds (this one rounds to 0, "
                  "which divides the scores to inf and NaN)")
        sampling["top_h"] = _float(kw, "top_h", 0.0, 1.0)
        sampling["top_k"] = top_k
        # transformers' ranges: top_p and typical_p of 1 or more, and cutoffs outside (0, 1), build no
        # warper (`build_processors`); the rest its warpers refuse
        sampling["top_p"] = _float(kw, "top_p", 0.0, low_open=False)
        sampling["min_p"] = _float(kw, "min_p", 0.0, 1.0, low_open=False)
        sampling["typical_p"] = _float(kw, "typical_p", 0.0)
        sampling["epsilon_cutoff"] = _float(kw, "epsilon_cutoff")
        sampling["eta_cutoff"] = _float(kw, "eta_cutoff")
        key = kw["key"]
        if key is None:
            raise ValueError("sampling needs an explicit PRNG key: pass key=jax.random.key(seed)")
        key = _prng_key(key)
    else:
        for name in generation_config.SAMPLING_ONLY:  # transformers ignores them, warning where not defaults
            if name == "top_k" and penalty_alpha is not None:  # contrastive search's, or meant for it
                continue
            if kw[name] is not None and kw[name] != SAMPLING_DEFAULTS[name] and name in kwargs:
                warnings.warn(f"do_sample is not set to True. However, {name} is set to {kw[name]} -- this flag is "
                              f"only used in sample-based generation modes. You should set do_sample=True or unset "
                              f"{name}.", stacklevel=4)
        key = None

    # --- processors -------------------------------------------------------------------------
    rep = _float(kw, "repetition_penalty", 0.0)
    if dola_layers and (rep is None or rep < 1.2):
        warnings.warn(f"dola_layers is set to trigger DoLa decoding, but repetition_penalty is set to a value of "
                      f"{1.0 if rep is None else rep}, which could induce unwanted repetition. The recommended value "
                      "for DoLa decoding is repetition_penalty>=1.2 (as transformers 4.53)", stacklevel=4)
    ngram = max(_int(kw, "no_repeat_ngram_size") or 0, 0)  # <= 0: none, as transformers
    # the "encoder" ones read the prompt as passed (transformers' encoder_input_ids of a decoder-only model)
    encoder_rep = _float(kw, "encoder_repetition_penalty", 0.0)
    encoder_ngram = max(_int(kw, "encoder_no_repeat_ngram_size") or 0, 0)
    bad_words = (None if kw["bad_words_ids"] is None
                 else _id_lists("bad_words_ids", kw["bad_words_ids"], vocab, allow_empty=True))
    sequence_bias = None if kw["sequence_bias"] is None else _sequence_bias(kw["sequence_bias"], vocab)
    suppress, begin_suppress = (_suppressed(name, kw[name], vocab) for name in ("suppress_tokens",
                                                                                 "begin_suppress_tokens"))
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
    return_dict = kw["return_dict_in_generate"]
    hidden_states = _hidden_state_indices(kw["output_hidden_states"], config.n_layers + 1)
    attentions = kw["output_attentions"]
    if not return_dict:  # transformers returns the sequences alone and keeps nothing else
        for name in ("output_attentions", "output_hidden_states", "output_scores", "output_logits"):
            if kw[name] is True:
                warnings.warn(f"return_dict_in_generate is NOT set to True, but {name} is. When "
                              f"return_dict_in_generate is not True, {name} is ignored.", stacklevel=4)
        attentions, hidden_states = False, None

    suppressed = set(suppress or ())
    banned = suppressed | {w[0] for w in bad_words or () if len(w) == 1 and w[0] not in eos_ids}
    if (min_new_tokens or 0) > 0 or (min_length or 0) > prompt_len:
        banned |= {t for t in eos_ids if t < vocab}  # EOS is banned at the first step too
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
        if beam_search:  # transformers raises for beam search; beam sampling there never ends the streamer
            _fail("streamer", streamer, "streaming is for greedy search and sampling, not beam search or beam "
                  "sampling (transformers raises for the first and never ends the streamer in the second)")

    mesh, data_axis, model_axis = kw["mesh"], kw["data_axis"], kw["model_axis"]
    sharding.check_inputs(input_ids=ids, attention_mask=mask)
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
        encoder_repetition_penalty=encoder_rep, encoder_no_repeat_ngram_size=encoder_ngram,
        bad_words_ids=bad_words, sequence_bias=sequence_bias, min_length=min_length,
        min_new_tokens=min_new_tokens, forced_bos_token_id=forced_bos, forced_eos_token_id=forced_eos,
        remove_invalid_values=kw["remove_invalid_values"], exponential_decay_length_penalty=decay,
        suppress_tokens=suppress, begin_suppress_tokens=begin_suppress,
        logits_processor=tuple(UserProcessor(p) for p in user_procs),
        renormalize_logits=kw["renormalize_logits"], diversity_penalty=diversity, neutral=neutral_processors,
        **sampling,
    )
    # transformers' Phi-3 runs the whole sequence again where its longrope factors switch (`engine.recomputes`)
    recompute = config.recompute_at is not None and 1 <= config.recompute_at - prompt_len < max_new_tokens
    if attentions or hidden_states is not None or dola_layers:
        asked = "output_attentions" if attentions else "output_hidden_states" if hidden_states is not None else \
            "dola_layers"
        if recompute:
            _fail(asked, kw[asked], f"this call crosses the sequence length {config.recompute_at} at which "
                  "transformers' Phi-3 recomputes the whole sequence (its longrope factors switch); that step's "
                  "layer outputs (attentions, hidden states, DoLa's layers) are not implemented in jaxgen yet: keep "
                  "prompt + max_new_tokens on one side")
    spec = DecodeSpec(
        bucket_len=bucket_len, max_new_tokens=max_new_tokens,
        eos_token_ids=eos_ids, pad_token_id=pad, stop_sequences=stops or (), stop_strings=stop_strings,
        do_sample=do_sample, num_beams=num_beams,
        beam_search=beam_search, num_beam_groups=groups, num_return_sequences=nrs, early_stopping=early_stopping,
        output_scores=kw["output_scores"], output_logits=kw["output_logits"], output_attentions=attentions,
        output_hidden_states=hidden_states, stream=streamer is not None,
        mesh=mesh, data_axis=data_axis, model_axis=model_axis,
        recompute=recompute, contrastive=contrastive, lookup=lookup or 0, lookup_ngram=lookup_ngram or 0,
        lookup_schedule=schedule in ("heuristic", "heuristic_transient"), lookup_confidence=confidence > 0,
        dola_layers=dola_layers, constraints=constraints,
    )
    if spec.contrastive and spec.recompute:
        _fail("penalty_alpha", penalty_alpha, f"this call crosses the sequence length {config.recompute_at} at which "
              "transformers' Phi-3 recomputes the whole sequence; contrastive search across it is not implemented "
              "in jaxgen yet: keep prompt + max_new_tokens on one side")
    if spec.lookup and any(r.dynamic is not None or r.long_inv_freq is not None for r in _ropes(config)):
        _fail(drafter, "<model>" if drafter == "assistant_model" else dict(drafters)[drafter],
              "this model's rotary embedding depends on the "
              "sequence length (dynamic or longrope scaling), which a forward over drafted tokens would change; "
              "assisted decoding with it is not implemented in jaxgen yet")
    spec = dataclasses.replace(spec, phases=1 if spec.lookup else loop_phases(model, ids.shape[0], spec))
    padded_ids, padded_mask = _left_pad(ids, mask, bucket_len, pad if pad is not None else 0)
    return Request(spec, padded_ids, padded_mask, jnp.int32(prompt_len), processors, key, jnp.float32(length_penalty),
                   jnp.float32(penalty_alpha or 0.0),
                   None if draft_model is None else lookup_decoder.Assistant(draft_model, jnp.float32(confidence)),
                   guided, streamer, return_dict, ids)


def _suppressed(name, value, vocab) -> tuple[int, ...] | None:
    """``suppress_tokens`` / ``begin_suppress_tokens``: the ids of the vocabulary among them, or None
    for none (transformers tests each vocabulary id for membership: other ids suppress nothing)."""
    if value is None:
        return None
    return tuple(t for t in _token_ids(name, value, vocab, allow_empty=True, any_id=True) if 0 <= t < vocab) or None


def _hidden_state_indices(value, n_hidden: int) -> tuple[int, ...] | None:
    """transformers' ``output_hidden_states`` -> the sorted indices it selects of the model's
    ``n_hidden`` hidden states: True all of them; an int or a list of ints those (negative ones
    from the end; out of range ones select nothing, as there, which still returns a None per
    hidden state); a falsy value (False, 0, []) None: none asked, as transformers' generate takes it."""
    if isinstance(value, (bool, np.bool_)) or value is None:
        return tuple(range(n_hidden)) if value else None
    items = [value] if _is_int(value) else value
    if not isinstance(items, (list, tuple)) or not all(_is_int(i) for i in items):
        _fail("output_hidden_states", value, "expected True / False, or a layer index or a list of them (indices "
              f"into the model's {n_hidden} hidden states: the embeddings, then one per layer)")
    if not value:
        return None
    return tuple(sorted({int(i) % n_hidden for i in items if -n_hidden <= i < n_hidden}))


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
