"""A checkpoint's generation_config.json supplies the defaults of a call, as in transformers."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax.core import FrozenDict
from transformers import GenerationConfig, GPT2LMHeadModel

import jaxgen
from jaxgen import generation_config
from tests.conftest import EOS, EOS_MODEL, assert_same_generation, build_checkpoint, hf_generate, left_padded_batch

PADS = [0, 2, 1]


def _checkpoint(path, **settings):
    """The EOS model saved with ``settings`` in its generation config; returns (torch model
    re-read from ``path``, jaxgen model)."""
    torch_model = build_checkpoint(path, seed=0, eos_boost=2.0, **EOS_MODEL)
    for name, value in settings.items():
        setattr(torch_model.generation_config, name, value)
    torch_model.save_pretrained(path)
    return GPT2LMHeadModel.from_pretrained(path).eval(), jaxgen.from_pretrained(path)


def _batch(seed=0):
    return left_padded_batch(np.random.default_rng(seed), len(PADS), 5, EOS_MODEL["vocab_size"], PADS)


def test_fields_are_transformers_generation_config_fields():
    fields = {k for k in vars(GenerationConfig()) if not k.startswith("_") and k != "transformers_version"}
    assert generation_config.HF_FIELDS == fields
    for name, value in GenerationConfig._get_default_generation_params().items():
        if name == "max_length":  # a checkpoint's 20 is the whole length, not 20 after the prompt
            assert name not in generation_config.NEUTRAL
            continue
        assert value is None or name in generation_config.INERT or generation_config.NEUTRAL[name] == value, name


def test_only_settings_that_change_the_output_are_kept(tmp_path):
    _, model = _checkpoint(tmp_path, pad_token_id=0, top_k=50, num_beams=1, cache_implementation="static")
    written = json.loads((tmp_path / "generation_config.json").read_text())
    assert {"bos_token_id", "output_attentions", "use_cache", "top_k", "num_beams"} <= set(written)
    assert dict(model.generation_config) == {"eos_token_id": 2, "pad_token_id": 0}


SETTINGS = {
    "beams": dict(num_beams=3, num_return_sequences=2, max_new_tokens=6, length_penalty=0.5,
                  no_repeat_ngram_size=2, early_stopping=True, pad_token_id=0, eos_token_id=[2, 7]),
    "greedy": dict(max_length=12, min_new_tokens=3, repetition_penalty=1.3, bad_words_ids=[[5]],
                   pad_token_id=0),
    # both of each length pair: the *_new_tokens one takes precedence, in transformers too
    "lengths": dict(max_new_tokens=7, max_length=30, min_new_tokens=2, min_length=25, pad_token_id=0),
}


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_call_without_arguments_equals_transformers(tmp_path, name):
    torch_model, model = _checkpoint(tmp_path, **SETTINGS[name])
    ids, mask = _batch()
    ref = hf_generate(torch_model, ids, mask)
    out = jaxgen.generate(model, ids, mask, output_scores=True).trim()
    assert_same_generation(out, ref, beams=name == "beams")
    if name == "beams":  # beam_search takes num_beams from the checkpoint too
        assert_same_generation(jaxgen.beam_search(model, ids, mask, output_scores=True).trim(), ref, beams=True)


def test_callers_arguments_win(tmp_path):
    torch_model, model = _checkpoint(tmp_path, **SETTINGS["beams"])
    ids, mask = _batch(1)
    kwargs = dict(num_beams=2, num_return_sequences=1, max_new_tokens=4, eos_token_id=2, no_repeat_ngram_size=None)
    ref = hf_generate(torch_model, ids, mask, **kwargs)
    out = jaxgen.generate(model, ids, mask, output_scores=True, **kwargs).trim()
    assert_same_generation(out, ref, beams=True)
    # The checkpoint's max_new_tokens beats a caller's max_length, with a warning, as in transformers.
    kwargs = dict(num_beams=1, num_return_sequences=1, max_length=ids.shape[1] + 3)
    with pytest.warns(UserWarning, match=r"Both max_new_tokens \(=6\) and max_length \(=8\) seem to have been set"):
        out = jaxgen.generate(model, ids, mask, output_scores=True, **kwargs).trim()
    assert_same_generation(out, hf_generate(torch_model, ids, mask, **kwargs))
    assert out.sequences.shape[1] == ids.shape[1] + 6


def test_a_checkpoints_max_length_is_the_whole_length(tmp_path):
    """A generation_config.json's max_length, 20 included (transformers' default value), counts the
    prompt: 20 tokens in all, where a call without any length gets 20 after the prompt."""
    torch_model, model = _checkpoint(tmp_path, max_length=20, pad_token_id=0)
    ids, mask = _batch(3)
    out = jaxgen.generate(model, ids, mask, output_scores=True, eos_token_id=None).trim()
    assert_same_generation(out, hf_generate(torch_model, ids, mask, eos_token_id=None))
    assert out.sequences.shape[1] == 20


def test_sampling_settings_apply_only_when_sampling(tmp_path):
    torch_model, model = _checkpoint(tmp_path, do_sample=True, top_k=1, temperature=0.5, pad_token_id=0,
                                     max_new_tokens=5)
    ids, mask = _batch(2)
    greedy = hf_generate(torch_model, ids, mask, do_sample=False)
    with pytest.raises(ValueError, match="sampling needs an explicit PRNG key"):
        jaxgen.generate(model, ids, mask)
    sampled = jaxgen.generate(model, ids, mask, key=jax.random.key(0)).trim()  # top_k=1: the greedy tokens
    np.testing.assert_array_equal(sampled.sequences, greedy.sequences.numpy())
    out = jaxgen.greedy_search(model, ids, mask, output_scores=True).trim()  # no warper, as transformers
    assert_same_generation(out, greedy)


def test_config_json_fields_without_generation_config_json(tmp_path):
    build_checkpoint(tmp_path, seed=0, eos_boost=2.0, **EOS_MODEL)
    (tmp_path / "generation_config.json").unlink()
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(max_length=9, num_beams=2, pad_token_id=0)  # legacy checkpoints keep them here
    (tmp_path / "config.json").write_text(json.dumps(config))
    torch_model, model = GPT2LMHeadModel.from_pretrained(tmp_path).eval(), jaxgen.from_pretrained(tmp_path)
    assert dict(model.generation_config) == {"eos_token_id": 2, "max_length": 9, "num_beams": 2, "pad_token_id": 0}
    ids, mask = _batch(3)
    assert_same_generation(jaxgen.generate(model, ids, mask, output_scores=True).trim(),
                           hf_generate(torch_model, ids, mask), beams=True)


def test_generation_config_json_without_eos_means_no_eos(tmp_path):
    """transformers does not fall back to config.json's EOS then: rows run past EOS."""
    build_checkpoint(tmp_path, seed=0, eos_boost=2.0, **EOS_MODEL)
    (tmp_path / "generation_config.json").write_text(json.dumps({"max_new_tokens": 8, "pad_token_id": 0}))
    torch_model, model = GPT2LMHeadModel.from_pretrained(tmp_path).eval(), jaxgen.from_pretrained(tmp_path)
    ids, mask = _batch(4)
    ref = hf_generate(torch_model, ids, mask)
    assert (ref.sequences[:, ids.shape[1]:-1] == EOS).any()  # an EOS that did not end its row
    assert_same_generation(jaxgen.generate(model, ids, mask, output_scores=True).trim(), ref)


def test_unsupported_setting_raises_with_a_way_out(tmp_path):
    build_checkpoint(tmp_path, seed=0, **EOS_MODEL)
    settings = json.loads((tmp_path / "generation_config.json").read_text())
    settings.update(token_healing=True, pad_token_id=0)
    (tmp_path / "generation_config.json").write_text(json.dumps(settings))
    model = jaxgen.from_pretrained(tmp_path)
    ids, mask = _batch()
    with pytest.raises(ValueError, match=r"sets token_healing=True, which jaxgen does not support \(token healing"):
        jaxgen.generate(model, ids, mask, max_new_tokens=3)
    model = model.replace(generation_config=model.generation_config.copy({"token_healing": None}))
    with pytest.raises(ValueError, match="stop strings, either in the arguments to `generate` or in the model's"):
        jaxgen.generate(model.replace(generation_config=model.generation_config.copy({"stop_strings": (".",)})),
                        ids, mask, max_new_tokens=3)
    assert jaxgen.generate(model, ids, mask, max_new_tokens=3).trim().sequences.shape == (3, 8)


def test_generation_config_survives_tree_operations_and_must_be_hashable(tmp_path):
    _, model = _checkpoint(tmp_path, num_beams=2, pad_token_id=0)
    assert jax.tree.map(lambda x: x, model).generation_config == model.generation_config
    assert jax.jit(lambda m: m)(model).generation_config == model.generation_config
    ids, mask = _batch()
    with pytest.raises(ValueError, match="model.generation_config must be a flax FrozenDict of hashable values"):
        jaxgen.generate(model.replace(generation_config=FrozenDict({"bad_words_ids": [[5]]})), ids, mask)


def test_generation_config_argument_equals_transformers(tmp_path):
    """generate(..., generation_config=GenerationConfig(...)): its set fields rank above the
    checkpoint's and below the call's own arguments, as in transformers."""
    torch_model, model = _checkpoint(tmp_path, **SETTINGS["beams"])
    ids, mask = _batch(5)
    passed = GenerationConfig(num_beams=4, length_penalty=2.0, max_new_tokens=5, output_attentions=False)
    for kwargs in (dict(), dict(num_return_sequences=1, no_repeat_ngram_size=None, max_new_tokens=3)):
        ref = hf_generate(torch_model, ids, mask, generation_config=passed, **kwargs)
        for config in (passed, passed.to_dict()):
            out = jaxgen.generate(model, ids, mask, generation_config=config, output_scores=True, **kwargs).trim()
            assert_same_generation(out, ref, beams=True)
    # The config's max_new_tokens and a max_length passed by name: both set, the first wins (transformers).
    short = GenerationConfig(max_new_tokens=2)
    with pytest.warns(UserWarning, match=r"Passing generation_config together with generation-related arguments="
                                          r"\(\['max_length', 'output_scores'\]\) is deprecated"):
        out = jaxgen.generate(model, ids, mask, generation_config=short, max_length=30, output_scores=True)
    assert_same_generation(out.trim(), hf_generate(torch_model, ids, mask, generation_config=short, max_length=30),
                           beams=True)
    assert out.trim().sequences.shape[1] == ids.shape[1] + 2
    with pytest.raises(ValueError, match="greedy_search runs with num_beams=1; got num_beams=4"):
        jaxgen.greedy_search(model, ids, mask, generation_config=passed)
    with pytest.raises(ValueError, match="generation_config sets watermarking_config=.*which jaxgen does not support"):
        jaxgen.generate(model, ids, mask, generation_config=GenerationConfig(watermarking_config={"bias": 2.0}))
    with pytest.raises(ValueError, match="generation_config sets token_healing=True"):
        jaxgen.generate(model, ids, mask, generation_config=GenerationConfig(token_healing=True))
    with pytest.raises(ValueError, match="could not locate a tokenizer"):
        jaxgen.generate(model, ids, mask, generation_config=GenerationConfig(stop_strings=["."]))
    sequences = jaxgen.generate(model, ids, mask, generation_config=GenerationConfig(return_dict_in_generate=False))
    assert isinstance(sequences, np.ndarray)  # transformers' tensor of sequences, as numpy
    np.testing.assert_array_equal(sequences, jaxgen.generate(model, ids, mask).trim().sequences)
    with pytest.raises(ValueError, match="generation_config=4 is not allowed"):
        jaxgen.generate(model, ids, mask, generation_config=4)
