"""Calls transformers' generate() accepts, each run by jaxgen and by transformers on the same
weights: where transformers warns and proceeds, jaxgen warns (a Python warning) and returns what
transformers returns; where jaxgen cannot honour an argument it raises a ValueError naming it."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxgen
from tests.conftest import EOS, EOS_MODEL, PAD, assert_same_generation, hf_generate, left_padded_batch
from tests.test_sampling import hf_following

V = EOS_MODEL["vocab_size"]


def _ids(seed=0, batch=3, length=6, pads=(0, 2, 1)):
    return left_padded_batch(np.random.default_rng(seed), batch, length, V, list(pads))


class PutRecorder:
    """A streamer that keeps what it is given."""

    def __init__(self):
        self.puts, self.ended = [], False

    def put(self, value):
        self.puts.append(np.asarray(value))

    def end(self):
        self.ended = True


def _quiet(fn, *args, **kwargs):
    """``fn(...)`` failing on any warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn(*args, **kwargs)


@pytest.mark.parametrize("strategy", [dict(), dict(num_beams=3, num_return_sequences=2)])
def test_masks_that_end_in_padding_run_as_in_transformers(eos_model, strategy):
    """transformers' generation tests use a lower-triangular mask (row i masks its last columns)
    and right padding: generation starts from the last column whatever its mask, positions
    continue from its position id, its key stays masked. jaxgen warns about right padding and
    returns what transformers returns."""
    torch_model, model = eos_model
    ids = np.random.default_rng(1).integers(3, V, (4, 7))
    mask = np.tril(np.ones_like(ids), k=3)  # row 0: 4 real tokens, then padding; row 3: all real
    kw = dict(max_new_tokens=6, eos_token_id=EOS, pad_token_id=PAD, **strategy)
    with pytest.warns(UserWarning, match=r"right-padding was detected \(rows \[0, 1, 2\]"):
        out = jaxgen.generate(model, ids, mask, output_scores=True, **kw).trim()
    assert_same_generation(out, hf_generate(torch_model, ids, mask, do_sample=False, **kw), beams=bool(strategy))


def test_right_padding_when_sampling(eos_model, monkeypatch):
    torch_model, model = eos_model
    ids = np.random.default_rng(2).integers(3, V, (3, 5))
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 1, 0]])
    kw = dict(max_new_tokens=6, eos_token_id=EOS, pad_token_id=PAD, top_k=10, num_return_sequences=2)
    with pytest.warns(UserWarning, match="right-padding"):
        ours = jaxgen.sample(model, ids, mask, key=jax.random.key(1), output_scores=True, **kw).trim()
    assert_same_generation(ours, hf_following(torch_model, ids, mask, ours, monkeypatch, **kw))


def test_no_input_ids_starts_from_bos(eos_model):
    """``generate(model, None)``: every row starts from bos_token_id (batch 1), as transformers."""
    torch_model, model = eos_model
    kw = dict(max_new_tokens=5, eos_token_id=EOS, pad_token_id=PAD)
    out = jaxgen.generate(model, None, output_scores=True, **kw).trim()
    with torch.no_grad():
        ref = torch_model.generate(None, return_dict_in_generate=True, output_scores=True, do_sample=False, **kw)
    assert out.sequences[0, 0] == EOS_MODEL["bos_token_id"]
    assert_same_generation(out, ref)
    out = jaxgen.generate(model, inputs=None, bos_token_id=5, **kw).trim()  # transformers' `inputs` name
    assert out.sequences[0, 0] == 5
    with pytest.raises(ValueError, match="input_ids=None is not allowed without a bos_token_id"):
        jaxgen.generate(model.replace(config=model.config.__class__(**{**model.config.__dict__, "bos_token_id": None})),
                        None, **kw)


def test_sampling_defaults_on_a_greedy_call_are_silent_others_warn(eos_model):
    """transformers' global defaults (temperature 1.0, top_k 50, top_p 1.0) on a greedy call are
    taken silently (transformers issue 42762); another value warns and is ignored, as there."""
    torch_model, model = eos_model
    ids, mask = _ids()
    kw = dict(max_new_tokens=5, eos_token_id=EOS, pad_token_id=PAD)
    plain = jaxgen.generate(model, ids, mask, output_scores=True, **kw).trim()
    assert_same_generation(_quiet(jaxgen.generate, model, ids, mask, output_scores=True, temperature=1.0, top_k=50,
                                  top_p=1.0, **kw).trim(), hf_generate(torch_model, ids, mask, do_sample=False, **kw))
    with pytest.warns(UserWarning, match="do_sample is not set to True. However, temperature is set to 0.5"):
        warm = jaxgen.generate(model, ids, mask, output_scores=True, temperature=0.5, **kw).trim()
    np.testing.assert_array_equal(warm.sequences, plain.sequences)


def test_negative_eos_warns_and_never_stops(eos_model):
    torch_model, model = eos_model
    ids, mask = _ids(3)
    kw = dict(max_new_tokens=8, eos_token_id=-1, pad_token_id=PAD)
    with pytest.warns(UserWarning, match=r"eos_token_id should consist of positive integers, but is \[-1\]"):
        out = jaxgen.generate(model, ids, mask, output_scores=True, **kw).trim()
    ref = hf_generate(torch_model, ids, mask, do_sample=False, **kw)
    assert_same_generation(out, ref)
    assert out.sequences.shape[1] == ids.shape[1] + 8 and (out.sequences[:, ids.shape[1]:] == EOS).any()


@pytest.mark.parametrize("strategy", [dict(), dict(num_beams=3)])
def test_missing_pad_token_pads_with_eos(eos_model, strategy):
    """Silently, as transformers 5.x, but for a batch passed without its mask."""
    torch_model, model = eos_model
    ids, mask = _ids(4)
    kw = dict(max_new_tokens=8, eos_token_id=[EOS, 7], **strategy)
    out = _quiet(jaxgen.generate, model, ids, mask, output_scores=True, **kw).trim()
    assert_same_generation(out, hf_generate(torch_model, ids, mask, do_sample=False, **kw), beams=bool(strategy))
    full = np.ones_like(mask)
    with pytest.warns(UserWarning, match="The attention mask and the pad token id were not set, with a batched"):
        out = jaxgen.generate(model, ids, None, output_scores=True, **kw).trim()
    assert_same_generation(out, hf_generate(torch_model, ids, full, do_sample=False, **kw), beams=bool(strategy))


def test_arguments_that_change_nothing_are_accepted(eos_model):
    torch_model, model = eos_model
    ids, mask = _ids(5)
    kw = dict(max_new_tokens=4, eos_token_id=EOS, pad_token_id=PAD)
    plain = jaxgen.generate(model, ids, mask, **kw).trim().sequences
    for extra in (dict(use_cache=True), dict(use_cache=False), dict(output_attentions=False),
                  dict(trust_remote_code=True), dict(output_hidden_states=False), dict(synced_gpus=False),
                  dict(num_beam_groups=1),
                  dict(diversity_penalty=0.0), dict(penalty_alpha=None), dict(guidance_scale=1.0),
                  dict(low_memory=True), dict(cache_implementation="static")):
        np.testing.assert_array_equal(_quiet(jaxgen.generate, model, ids, mask, **kw, **extra).trim().sequences, plain)


def test_both_lengths_warn_and_the_new_tokens_one_wins(eos_model):
    torch_model, model = eos_model
    ids, mask = _ids(6)
    kw = dict(eos_token_id=EOS, pad_token_id=PAD, max_new_tokens=3, max_length=12, min_new_tokens=2, min_length=9)
    with pytest.warns(UserWarning) as caught:
        out = jaxgen.generate(model, ids, mask, output_scores=True, **kw).trim()
    assert {str(w.message).split(" will take")[0] for w in caught} == {
        "Both max_new_tokens (=3) and max_length (=12) seem to have been set. max_new_tokens",
        "Both min_new_tokens (=2) and min_length (=9) seem to have been set. min_new_tokens"}
    assert_same_generation(out, hf_generate(torch_model, ids, mask, do_sample=False, **kw))
    assert out.sequences.shape[1] == ids.shape[1] + 3


def test_return_dict_in_generate_false_returns_the_sequences(eos_model):
    torch_model, model = eos_model
    ids, mask = _ids(7)
    kw = dict(max_new_tokens=5, eos_token_id=EOS, pad_token_id=PAD)
    with torch.no_grad():
        ref = torch_model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False, **kw)
    out = jaxgen.generate(model, ids, mask, return_dict_in_generate=False, **kw)
    assert isinstance(out, np.ndarray)
    np.testing.assert_array_equal(out, ref.numpy())


def test_bad_words_and_biases_longer_than_the_sequence_never_match(eos_model):
    """40 banned ids after a 4-token prompt and 2 new tokens: transformers never matches them."""
    torch_model, model = eos_model
    ids, mask = _ids(8, length=4, pads=(0, 1, 0))
    long_word = list(range(3, 43))
    kw = dict(max_new_tokens=2, eos_token_id=EOS, pad_token_id=PAD, bad_words_ids=[long_word, [5]],
              sequence_bias={tuple(long_word): -3.0, (7,): 2.0})
    out = jaxgen.generate(model, ids, mask, output_scores=True, **kw).trim()
    assert_same_generation(out, hf_generate(torch_model, ids, mask, do_sample=False, **kw))


BAD = [
    (dict(do_sample=True, key=123), r"key=123 is not allowed: expected a JAX PRNG key"),
    (dict(do_sample=True, key="seed"), r"key='seed' is not allowed"),
    (dict(do_sample=True, key=np.zeros(2, np.float32)), r"key='<float32\[2\]>' is not allowed"),
    (dict(do_sample=True, key=jax.random.split(jax.random.key(0), 3)), r"key='<3 keys, shape \[3\]>'.*one key"),
    (dict(sequence_bias={(1,): "a"}), r"sequence_bias=\{\(1,\): 'a'\} is not allowed: expected \{tuple_of_ids"),
    (dict(sequence_bias={1: 1.0}), r"sequence_bias=\{1: 1.0\} is not allowed"),
    (dict(sequence_bias=[[[1, 2]]]), "sequence_bias=.* is not allowed"),
    (dict(penalty_alpha=0.6), r"top_k=50 is not allowed: contrastive search .* vocabulary of 48"),
    (dict(watermarking_config={"bias": 2.0}), r"watermarking_config=\{'bias': 2.0\}, .*watermarking is not"),
    (dict(force_words_ids=[[5]]), r"force_words_ids triggers constrained beam search, which needs beams"),
    (dict(dola_layers="middle"), r"dola_layers='middle' is not allowed: expected 'low', 'high' or a list"),
    (dict(dola_layers=[2, 5]), r"dola_layers=\[2, 5\] is not allowed: it leaves no layer below the final one \(2\)"),
    (dict(token_type_ids=np.zeros((3, 6))), r"token_type_ids=<array \[3, 6\]>, .*not implemented"),
    (dict(mesh=jax.make_mesh((1, 1), ("a", "b")), data_axis="a", model_axis="a"), "name the same mesh axis"),
    (dict(streamer=PutRecorder(), do_sample=True, num_beams=2, key=jax.random.key(0)), "not beam search or beam sam"),
]


@pytest.mark.parametrize("kwargs, message", BAD, ids=[m[:20] for _, m in BAD])
def test_what_jaxgen_cannot_honour_raises_naming_it(eos_model, kwargs, message):
    _, model = eos_model
    ids, mask = _ids()
    with pytest.raises(ValueError, match=message):
        jaxgen.generate(model, ids, mask, max_new_tokens=3, eos_token_id=EOS, pad_token_id=PAD, **kwargs)


def test_ragged_inputs_raise_naming_them(eos_model):
    _, model = eos_model
    kw = dict(max_new_tokens=3, min_new_tokens=3, eos_token_id=EOS, pad_token_id=PAD)
    with pytest.raises(ValueError, match=r"input_ids='<list>' is not allowed: expected a rectangular"):
        jaxgen.generate(model, [[1, 2], [3]], **kw)
    with pytest.raises(ValueError, match=r"attention_mask='<list>' is not allowed: expected a rectangular"):
        jaxgen.generate(model, [[4, 5], [6, 7]], [[1, 1], [1]], **kw)
    assert jaxgen.generate(model, [[4, 5], [6, 7]], [[1, 1], [1, 1]], **kw).trim().sequences.shape == (2, 5)
    assert jaxgen.sample(model, jnp.asarray([[4, 5]]), key=jax.random.PRNGKey(0), **kw).trim().sequences.shape == (1, 5)


def test_an_explicit_eos_token_id_none_turns_eos_off(eos_model):
    """Passing eos_token_id=None replaces the model's EOS with none, as in transformers: rows run to
    max_new_tokens (here through EOS tokens)."""
    torch_model, model = eos_model
    ids, mask = _ids(9)
    kw = dict(max_new_tokens=10, eos_token_id=None, pad_token_id=PAD)
    out = jaxgen.generate(model, ids, mask, output_scores=True, **kw).trim()
    assert_same_generation(out, hf_generate(torch_model, ids, mask, do_sample=False, **kw))
    assert out.sequences.shape[1] == ids.shape[1] + 10 and (out.sequences[:, ids.shape[1]:-1] == EOS).any()


def test_none_flags_are_false_as_in_transformers(eos_model):
    """transformers tests flags for truth: an explicit None (wrapper code that forwards optional
    settings) is False there, and a length_penalty of None is unused outside beam search."""
    torch_model, model = eos_model
    ids, mask = _ids(10)
    kw = dict(max_new_tokens=5, eos_token_id=EOS, pad_token_id=PAD)
    ref = hf_generate(torch_model, ids, mask, do_sample=None, length_penalty=None, **kw)
    nones = dict(do_sample=None, length_penalty=None, renormalize_logits=None, remove_invalid_values=None,
                 output_attentions=None, output_logits=None)
    assert_same_generation(_quiet(jaxgen.generate, model, ids, mask, output_scores=True, **nones, **kw).trim(), ref)
    sequences = _quiet(jaxgen.generate, model, ids, mask, return_dict_in_generate=None, output_scores=None, **kw)
    np.testing.assert_array_equal(sequences, ref.sequences.numpy())
    beams = dict(num_beams=2, **kw)
    assert_same_generation(_quiet(jaxgen.generate, model, ids, mask, output_scores=True, early_stopping=None,
                                  **beams).trim(), hf_generate(torch_model, ids, mask, early_stopping=None, **beams),
                           beams=True)
    with pytest.raises(ValueError, match="length_penalty=None is not allowed"):  # transformers' beam search fails
        jaxgen.generate(model, ids, mask, length_penalty=None, **beams)


def test_sampling_values_that_build_no_warper_in_transformers(eos_model):
    """top_p or typical_p of 1 or more and cutoffs outside (0, 1) build no warper in transformers;
    top_p=0 keeps the best token only. Values its warpers refuse raise."""
    torch_model, model = eos_model
    ids, mask = _ids(11)
    kw = dict(max_new_tokens=5, eos_token_id=EOS, pad_token_id=PAD, key=jax.random.key(3), top_k=0)
    plain = jaxgen.sample(model, ids, mask, **kw).trim().sequences
    for off in (dict(top_p=1.5), dict(typical_p=1.5), dict(epsilon_cutoff=0.0), dict(epsilon_cutoff=1.0),
                dict(eta_cutoff=0.0), dict(eta_cutoff=-0.5)):
        np.testing.assert_array_equal(_quiet(jaxgen.sample, model, ids, mask, **off, **kw).trim().sequences, plain)
    greedy = hf_generate(torch_model, ids, mask, do_sample=False, max_new_tokens=5, eos_token_id=EOS, pad_token_id=PAD)
    np.testing.assert_array_equal(jaxgen.sample(model, ids, mask, top_p=0.0, **kw).trim().sequences,
                                  greedy.sequences.numpy())
    for bad in (dict(top_p=-0.1), dict(typical_p=0.0)):
        with pytest.raises(ValueError, match=f"{next(iter(bad))}=.* is not allowed"):
            jaxgen.sample(model, ids, mask, **bad, **kw)


def test_special_token_ids_outside_the_vocabulary(eos_model):
    """transformers takes them: an EOS id the model cannot emit never matches, and a pad id outside
    the vocabulary (a tokenizer's added [PAD]) fills finished rows; a negative one warns there."""
    torch_model, model = eos_model
    ids, mask = _ids(12)
    kw = dict(max_new_tokens=8, eos_token_id=[EOS, V + 3], pad_token_id=PAD)
    out = _quiet(jaxgen.generate, model, ids, mask, output_scores=True, **kw).trim()
    assert_same_generation(out, hf_generate(torch_model, ids, mask, do_sample=False, **kw))
    finished = out.sequences == PAD
    finished[:, :ids.shape[1]] = False
    assert finished.any()
    for pad in (V + 5, -1):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            other = jaxgen.generate(model, ids, mask, **{**kw, "pad_token_id": pad}).trim().sequences
        negative = ["pad_token_id should be positive but got -1"] if pad < 0 else []
        assert [str(w.message)[:len("pad_token_id should be positive but got -1")] for w in caught] == negative
        np.testing.assert_array_equal(other, np.where(finished, pad, out.sequences))


def test_processor_forms_transformers_takes(eos_model):
    """Empty or out-of-vocabulary suppress lists, a -inf sequence bias, non-positive minimum
    lengths and n-gram sizes: each as transformers runs it."""
    torch_model, model = eos_model
    ids, mask = _ids(13)
    kw = dict(max_new_tokens=6, eos_token_id=EOS, pad_token_id=PAD)
    plain = hf_generate(torch_model, ids, mask, do_sample=False, **kw)
    for same in (dict(suppress_tokens=[]), dict(begin_suppress_tokens=[]), dict(min_new_tokens=-1),
                 dict(min_length=-1), dict(no_repeat_ngram_size=-1)):
        assert_same_generation(_quiet(jaxgen.generate, model, ids, mask, output_scores=True, **same, **kw).trim(),
                               plain)
    for extra in (dict(suppress_tokens=[V + 1, 5, -2]), dict(sequence_bias={(9,): float("-inf"), (4, 5): 2.0})):
        assert_same_generation(_quiet(jaxgen.generate, model, ids, mask, output_scores=True, **extra, **kw).trim(),
                               hf_generate(torch_model, ids, mask, do_sample=False, **extra, **kw))


def test_transformers_warnings_that_proceed(eos_model):
    _, model = eos_model
    ids, mask = _ids(14)
    kw = dict(eos_token_id=EOS, pad_token_id=PAD)
    expected = {
        "default length": (dict(), r"Using the model-agnostic default max_length \(20 tokens after the prompt"),
        "min_new_tokens": (dict(max_new_tokens=2, min_new_tokens=4),
                           r"Unfeasible length constraints: min_new_tokens \(4\), when added to the prompt length "
                           r"\(6\), is larger than the maximum possible length \(8\)"),
        "min_length": (dict(max_new_tokens=2, min_length=9), r"Unfeasible length constraints: min_length \(9\)"),
        "no dict": (dict(max_new_tokens=2, return_dict_in_generate=False, output_scores=True),
                    "return_dict_in_generate is NOT set to True, but output_scores is"),
        "one beam": (dict(max_new_tokens=2, num_beams=1, early_stopping=True),
                     "num_beams is set to 1. However, early_stopping is set to True"),
    }
    for name, (extra, message) in expected.items():
        with pytest.warns(UserWarning, match=message):
            jaxgen.generate(model, ids, mask, **extra, **kw)
    _quiet(jaxgen.generate, model, ids, mask, max_new_tokens=2, tokenizer=object(), logits_to_keep=1, **kw)
    with pytest.raises(ValueError, match="assistant_tokenizer=.*universal assisted decoding"):
        jaxgen.generate(model, ids, mask, max_new_tokens=2, assistant_tokenizer=object(), **kw)


def test_a_row_without_any_real_token_reads_as_eager_attention(eos_model):
    """Its first token comes from a position that may read nothing: even weights over the prompt as
    passed, transformers' eager attention, whatever jaxgen's prompt bucket (SDPA reads zeros)."""
    torch_model, model = eos_model
    ids, mask = _ids(15)
    mask[1] = 0
    kw = dict(max_new_tokens=4, eos_token_id=EOS, pad_token_id=PAD)
    implementation = torch_model.config._attn_implementation
    torch_model.set_attn_implementation("eager")
    try:
        ref = hf_generate(torch_model, ids, mask, **kw)
    finally:
        torch_model.set_attn_implementation(implementation)
    for bucket in (32, None):
        with pytest.warns(UserWarning, match="right-padding was detected"):
            out = jaxgen.generate(model, ids, mask, output_scores=True, prompt_bucket=bucket, **kw).trim()
        assert_same_generation(out, ref)


def test_streamer_puts_the_prompt_once_per_returned_sequence(eos_model):
    """As transformers, which expands the prompt before putting it: a streamer of two sampled
    sequences gets a [2, L] prompt, then [2] tokens a step (TextStreamer refuses more than one row)."""
    _, model = eos_model
    ids, mask = _ids(16, batch=1, pads=(0,))
    streamer = PutRecorder()
    jaxgen.sample(model, ids, mask, max_new_tokens=3, num_return_sequences=2, eos_token_id=EOS, pad_token_id=PAD,
                  key=jax.random.key(0), streamer=streamer)
    assert [p.shape for p in streamer.puts] == [(2, ids.shape[1]), (2,), (2,), (2,)] and streamer.ended
    np.testing.assert_array_equal(streamer.puts[0], np.repeat(ids, 2, axis=0))


def test_transition_scores_of_transformers_outputs_and_empty_bad_words(eos_model):
    """jaxgen.compute_transition_scores takes transformers' own (torch) outputs; bad_words_ids
    holding an empty list bans nothing, as there."""
    torch_model, model = eos_model
    ids, mask = _ids(17)
    kw = dict(max_new_tokens=5, eos_token_id=EOS, pad_token_id=PAD, num_beams=2, length_penalty=0.5)
    ref = hf_generate(torch_model, ids, mask, **kw)
    np.testing.assert_allclose(
        np.asarray(jaxgen.compute_transition_scores(ref.sequences, ref.scores, ref.beam_indices)),
        torch_model.compute_transition_scores(ref.sequences, ref.scores, ref.beam_indices).numpy(), atol=1e-5)
    assert_same_generation(_quiet(jaxgen.generate, model, ids, mask, output_scores=True, bad_words_ids=[[]], **kw)
                           .trim(), hf_generate(torch_model, ids, mask, bad_words_ids=[[]], **kw), beams=True)
