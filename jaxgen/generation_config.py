"""A checkpoint's generation settings: what transformers' ``generate()`` uses when the caller does not.

transformers 5.x resolves every generate argument as: the caller's value, else the model's
``generation_config`` (the checkpoint's ``generation_config.json``, or, when the checkpoint has
none, the generation fields of its ``config.json``), else a global default. `from_checkpoint`
reads the model's part when a checkpoint is loaded (it becomes ``GPT2.generation_config``);
`with_call` merges it under a call's arguments, among which `with_argument` puts those of a
``generation_config=`` argument.

Only settings that change what is generated are kept: metadata, values equal to transformers'
global defaults and settings that cannot change jaxgen's output (cache and compile knobs,
``bos_token_id``, ...) are dropped on load. A kept setting that jaxgen cannot honour
(``watermarking_config``, say) raises when a call would use it, never silently.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax.core import FrozenDict

# Every field of transformers' GenerationConfig (5.24; tests/test_generation_config.py checks).
HF_FIELDS = frozenset({
    "assistant_confidence_threshold", "assistant_early_exit", "assistant_ensemble_weight",
    "assistant_lookbehind", "bad_words_ids", "begin_suppress_tokens", "bos_token_id", "cache_config",
    "cache_implementation", "compile_config", "constraints", "continuous_batching_config",
    "decoder_start_token_id", "disable_compile", "diversity_penalty", "do_sample", "dola_layers",
    "early_stopping", "encoder_no_repeat_ngram_size", "encoder_repetition_penalty", "eos_token_id",
    "epsilon_cutoff", "eta_cutoff", "exponential_decay_length_penalty", "force_words_ids",
    "forced_bos_token_id", "forced_eos_token_id", "guidance_scale", "is_assistant", "length_penalty",
    "low_memory", "max_cache_len", "max_length", "max_matching_ngram_size", "max_new_tokens", "max_time",
    "min_length", "min_new_tokens", "min_p", "no_repeat_ngram_size", "num_assistant_tokens",
    "num_assistant_tokens_schedule", "num_beam_groups", "num_beams", "num_return_sequences",
    "output_attentions", "output_hidden_states", "output_logits", "output_scores", "pad_token_id",
    "penalty_alpha", "prefill_chunk_size", "prompt_lookup_num_tokens", "remove_invalid_values",
    "renormalize_logits", "repetition_penalty", "return_dict_in_generate", "sequence_bias",
    "speculation_type", "stop_strings", "suppress_tokens", "target_lookbehind", "temperature",
    "token_healing", "top_h", "top_k", "top_p", "typical_p", "use_cache", "use_mtp",
    "watermarking_config",
})

# Fields that cannot change what jaxgen generates, whatever their value: the prompt is always
# given (bos_token_id), GPT-2 has no decoder start, jaxgen always keeps a KV cache and returns
# its output object, and the look-behinds act only in assisted decoding across tokenizers (which
# jaxgen refuses: the draft must share the vocabulary).
INERT = frozenset({
    "bos_token_id", "decoder_start_token_id", "use_cache", "cache_implementation", "cache_config",
    "max_cache_len", "compile_config", "disable_compile", "prefill_chunk_size",
    "continuous_batching_config", "return_dict_in_generate", "is_assistant", "assistant_lookbehind",
    "target_lookbehind",
})

# transformers' global defaults (GenerationConfig._get_default_generation_params), and the "off"
# value of flags: a checkpoint field with this value changes nothing. Not max_length=20: set by a
# checkpoint it is the whole length, prompt included; by default 20 tokens follow the prompt.
NEUTRAL = {
    "min_length": 0, "do_sample": False, "early_stopping": False, "num_beams": 1,
    "temperature": 1.0, "top_k": 50, "top_p": 1.0, "typical_p": 1.0, "repetition_penalty": 1.0,
    "length_penalty": 1.0, "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0,
    "num_return_sequences": 1, "output_scores": False, "remove_invalid_values": False,
    "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "encoder_repetition_penalty": 1.0, "num_beam_groups": 1,
    "diversity_penalty": 0.0, "output_attentions": False, "output_hidden_states": False,
    "output_logits": False, "renormalize_logits": False, "low_memory": False, "token_healing": False,
    "use_mtp": False, "penalty_alpha": 0.0, "guidance_scale": 1.0,
    "num_assistant_tokens": 20, "num_assistant_tokens_schedule": "constant", "assistant_confidence_threshold": 0.4,
}

# Arguments transformers' generate() takes that jaxgen cannot honour (when set to anything but
# their off value), and why: strategies not implemented yet, host-side callbacks, model inputs.
UNSUPPORTED = {
    "max_time": "max_time is a wall-clock criterion checked on the host between steps; a compiled "
                "while_loop cannot stop on time. Bound the work with max_new_tokens instead",
    "stopping_criteria": "custom stopping criteria are host-side Python; use eos_token_id or stop_sequences",
    "prefix_allowed_tokens_fn": "a host-side Python function called at every step; pass a JAX function as "
                                "logits_processor=[fn] instead",
    "assistant_ensemble_weight": "speculative sampling with an ensemble of the draft's and the model's "
                                 "probabilities is not implemented in jaxgen yet",
    "watermarking_config": "watermarking is not implemented in jaxgen yet",
    "token_healing": "token healing needs the tokenizer; not implemented in jaxgen",
    "use_mtp": "multi-token prediction is not implemented in jaxgen yet",
    "custom_generate": "custom_generate loads generation code from the hub; jaxgen runs its own decoders",
    "position_ids": "jaxgen derives position ids from attention_mask, as transformers' generate does",
    "token_type_ids": "token_type_ids are not implemented in jaxgen",
    "inputs_embeds": "jaxgen starts from input_ids, not embeddings",
    "assistant_tokenizer": "assisted decoding across tokenizers (universal assisted decoding) is not implemented "
                           "in jaxgen; the assistant_model must share the model's vocabulary",
}
# Arguments that cannot change what jaxgen generates, whatever their value (beside `INERT`):
# trust_remote_code lets transformers 5.x load the strategies it moved to the hub (contrastive
# search), which jaxgen runs from its own code; logits_to_keep trims the forward's logits, of which
# generate reads the last.
IGNORED_ARGUMENTS = frozenset({"use_cache", "synced_gpus", "low_memory", "use_model_defaults", "trust_remote_code",
                               "logits_to_keep"})

LENGTHS = (("max_new_tokens", "max_length"), ("min_new_tokens", "min_length"))
SAMPLING_ONLY = ("temperature", "top_h", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff")


def _changes_nothing(name: str, value: Any) -> bool:
    """Whether a setting cannot change what jaxgen generates: an `INERT` field, or a field at its
    `NEUTRAL` value."""
    return name in INERT or (name in NEUTRAL and value == NEUTRAL[name])


def unsupported(name: str, value: Any, supported, where: str) -> str | None:
    """Why jaxgen cannot honour ``name=value`` (set by ``where``), or None where it can: a name
    in ``supported``, an argument that changes nothing (`IGNORED_ARGUMENTS`, `INERT`, an off value
    of `NEUTRAL`, or None). The reason names the argument and, for `UNSUPPORTED` ones, what is
    missing; for any other name it says that the name is unknown."""
    if name in supported or value is None or name in IGNORED_ARGUMENTS or _changes_nothing(name, value):
        return None
    shown = f"<array {list(value.shape)}>" if hasattr(value, "shape") and getattr(value, "ndim", 0) else repr(value)
    if name in UNSUPPORTED:
        return f"{where} {name}={shown}, which jaxgen does not support ({UNSUPPORTED[name]})"
    return f"{where} {name}={shown}, which jaxgen does not support"


def _freeze(value: Any) -> Any:
    """JSON value -> hashable: lists become tuples, objects `FrozenDict`s."""
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, Mapping):
        return FrozenDict({k: _freeze(v) for k, v in value.items()})
    return value


def from_checkpoint(generation_json: dict[str, Any] | None, config_json: dict[str, Any]) -> FrozenDict:
    """The settings of ``generation_config.json`` (or, without that file, the generation fields
    of ``config.json``, as ``GenerationConfig.from_model_config``) that can change the output.

    A ``generation_config.json`` without ``eos_token_id`` gives ``eos_token_id=()``: no EOS, as
    transformers, which then does not fall back to ``config.json``'s. Both lengths of a pair stay
    (``max_new_tokens`` and ``max_length``): a call warns and the ``*_new_tokens`` one wins, as there.
    """
    raw = generation_json if generation_json is not None else config_json
    settings = {
        name: _freeze(value) for name, value in sorted(raw.items())
        if name in HF_FIELDS and value is not None and not _changes_nothing(name, value)
    }
    if generation_json is not None:
        settings.setdefault("eos_token_id", ())
    return FrozenDict(settings)


def with_argument(kwargs: dict[str, Any], supported) -> dict[str, Any]:
    """A call's ``kwargs`` with its ``generation_config=`` (a transformers ``GenerationConfig``,
    or a mapping of its fields) expanded under the others. transformers 5.x ranks the fields it
    sets (not None) with the call's own arguments, above the model's; so does jaxgen, under the
    arguments passed by name (a config's ``max_new_tokens`` and a call's ``max_length`` are both
    set: the first wins, with a warning, as there). Passing both warns, as transformers (deprecated).

    Dropped: metadata (``transformers_version``, ``_...``), and settings jaxgen has no argument
    for that cannot change its output: `INERT` ones, and the off value (`NEUTRAL`) of others
    (``output_attentions=False``). Any other setting outside ``supported`` raises ``ValueError``
    (`unsupported`).
    """
    kwargs = dict(kwargs)
    value = kwargs.pop("generation_config", None)
    if value is None:
        return kwargs
    settings = {}
    for name, v in set_fields(value).items():
        if name == "transformers_version" or name.startswith("_"):
            continue
        if name not in supported:
            reason = unsupported(name, v, supported, "generation_config sets")
            if reason:
                raise ValueError(reason)
            continue
        settings[name] = v
    also = sorted(set(kwargs) & HF_FIELDS)
    if also:
        warnings.warn(f"Passing generation_config together with generation-related arguments=({also}) is deprecated "
                      "and will be removed in future versions. Please pass either a generation_config object OR all "
                      "generation parameters explicitly, but not both.", stacklevel=4)
    return {**settings, **kwargs}


def set_fields(value: Any) -> dict[str, Any]:
    """The fields a transformers ``GenerationConfig`` (or a mapping of its fields) sets, those not
    None; ValueError naming ``generation_config`` for anything else."""
    if callable(getattr(value, "to_dict", None)) and not isinstance(value, Mapping):
        value = value.to_dict()
    if not isinstance(value, Mapping):
        raise ValueError(f"generation_config={value!r} is not allowed: expected a transformers GenerationConfig "
                         "or a dict of its fields")
    return {name: v for name, v in value.items() if v is not None}


def with_call(generation_config: Any, kwargs: dict[str, Any], supported) -> dict[str, Any]:
    """The model's settings that a call with ``kwargs`` uses, merged under ``kwargs``.

    As transformers: the caller's arguments win, one by one (so a model's ``max_new_tokens`` and a
    caller's ``max_length`` are both set, and the first wins with a warning); the sampling settings
    apply only when the call samples. A ``None`` value unsets a setting. Raises ``ValueError`` for a
    setting outside ``supported`` (jaxgen's argument names) that could change the output
    (`unsupported`).
    """
    try:
        hash(generation_config)
    except TypeError:
        generation_config = None
    if not isinstance(generation_config, Mapping):
        raise ValueError("model.generation_config must be a flax FrozenDict of hashable values (tuples, "
                         "not lists), e.g. FrozenDict({'num_beams': 4, 'bad_words_ids': ((13,),)})")
    defaults = {k: v for k, v in generation_config.items() if v is not None}
    do_sample = kwargs.get("do_sample", defaults.get("do_sample", False))
    if not (isinstance(do_sample, (bool, np.bool_)) and do_sample):  # transformers builds no warpers
        for name in SAMPLING_ONLY:
            defaults.pop(name, None)
    for name, value in list(defaults.items()):
        if name not in supported:
            reason = unsupported(name, value, supported, "model.generation_config (the checkpoint's generation "
                                 "config) sets")
            if reason:
                raise ValueError(f"{reason}; decode without it: model = model.replace(generation_config="
                                 f"model.generation_config.copy({{{name!r}: None}}))")
            del defaults[name]
    return {**defaults, **kwargs}
