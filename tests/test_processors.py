"""Each processor against the transformers processor of the same name, and inside generate."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation import logits_process as hf

import jaxgen
from jaxgen.processors import ProcessorContext, TopH, Typical, _kth_largest, apply, build_processors
from tests.conftest import EOS, EOS_MODEL, PAD, assert_same_generation, hf_generate, left_padded_batch

VOCAB = 40
ROWS = 5
OFFSET = 3  # bucket-padding columns in front of the prompt
TAIL = 4  # unwritten slots after the history


def _history(cur_len, seed):
    """HF's input_ids [ROWS, cur_len] (left-padded, repeated tokens) and our static buffer view."""
    rng = np.random.default_rng(seed)
    pads = rng.integers(0, cur_len, size=ROWS) if cur_len > 1 else np.zeros(ROWS, int)
    ids = rng.integers(0, 8, size=(ROWS, cur_len))  # few distinct tokens: n-grams repeat
    ids[:, -1] = rng.integers(0, VOCAB, size=ROWS)
    mask = np.ones_like(ids)
    for r, p in enumerate(pads):
        ids[r, :p] = 6  # a pad id that also occurs as a real token
        mask[r, :p] = 0
    garbage = rng.integers(0, VOCAB, size=(ROWS, OFFSET)), rng.integers(0, VOCAB, size=(ROWS, TAIL))
    buffer = np.concatenate([garbage[0], ids, garbage[1]], axis=1)
    ctx = ProcessorContext(jnp.asarray(buffer, jnp.int32), jnp.int32(cur_len), jnp.asarray(pads, jnp.int32),
                           jnp.int32(OFFSET))
    return torch.tensor(ids), torch.tensor(pads), ctx


def _scores(seed):
    rng = np.random.default_rng(100 + seed)
    return (rng.standard_normal((ROWS, VOCAB)) * 3).astype(np.float32)


# (jaxgen build_processors kwargs, factory of the transformers processor given prompt_len / pads)
PROMPT_LEN = 4
MAX_LENGTH = 9
CASES = {
    "temperature": (dict(do_sample=True, temperature=0.7), lambda p: hf.TemperatureLogitsWarper(0.7)),
    "top_k": (dict(do_sample=True, top_k=7), lambda p: hf.TopKLogitsWarper(7)),
    "top_k_most_of_vocab": (dict(do_sample=True, top_k=30), lambda p: hf.TopKLogitsWarper(30)),
    "top_h": (dict(do_sample=True, top_h=0.4), lambda p: hf.TopHLogitsWarper(0.4)),
    "top_h_high": (dict(do_sample=True, top_h=0.95), lambda p: hf.TopHLogitsWarper(0.95)),
    "top_p_low": (dict(do_sample=True, top_p=0.3), lambda p: hf.TopPLogitsWarper(0.3)),
    "top_p_beams_keep_2": (dict(do_sample=True, top_p=0.05, num_beams=2),
                           lambda p: hf.TopPLogitsWarper(0.05, min_tokens_to_keep=2)),
    "top_p": (dict(do_sample=True, top_p=0.8), lambda p: hf.TopPLogitsWarper(0.8)),
    "min_p": (dict(do_sample=True, min_p=0.1), lambda p: hf.MinPLogitsWarper(0.1)),
    "typical_p": (dict(do_sample=True, typical_p=0.6), lambda p: hf.TypicalLogitsWarper(0.6)),
    "epsilon_cutoff": (dict(do_sample=True, epsilon_cutoff=0.02), lambda p: hf.EpsilonLogitsWarper(0.02)),
    "eta_cutoff": (dict(do_sample=True, eta_cutoff=0.05), lambda p: hf.EtaLogitsWarper(0.05)),
    "beam_top_k_keeps_eos_plus_one": (dict(do_sample=True, top_k=1, num_beams=3),
                                      lambda p: hf.TopKLogitsWarper(1, min_tokens_to_keep=2)),
    "repetition_penalty": (dict(repetition_penalty=1.8),
                           lambda p: hf.RepetitionPenaltyLogitsProcessor(1.8, prompt_ignore_length=p)),
    "no_repeat_ngram_size_2": (dict(no_repeat_ngram_size=2), lambda p: hf.NoRepeatNGramLogitsProcessor(2)),
    "no_repeat_ngram_size_3": (dict(no_repeat_ngram_size=3), lambda p: hf.NoRepeatNGramLogitsProcessor(3)),
    "bad_words_ids": (dict(bad_words_ids=[[3], [1, 2], [6, 6, 5], [EOS]]),
                      lambda p: hf.NoBadWordsLogitsProcessor([[3], [1, 2], [6, 6, 5], [EOS]], eos_token_id=EOS)),
    "sequence_bias": (dict(sequence_bias={(4,): 2.5, (1, 7): -3.0, (6, 2): 1.5}),
                      lambda p: hf.SequenceBiasLogitsProcessor({(4,): 2.5, (1, 7): -3.0, (6, 2): 1.5})),
    "suppress_tokens": (dict(suppress_tokens=[0, 5, 39]), lambda p: hf.SuppressTokensLogitsProcessor([0, 5, 39])),
    "begin_suppress_tokens": (dict(begin_suppress_tokens=[1, 9]),
                              lambda p: hf.SuppressTokensAtBeginLogitsProcessor([1, 9], PROMPT_LEN)),
    "forced_bos_token_id": (dict(forced_bos_token_id=11), lambda p: hf.ForcedBOSTokenLogitsProcessor(11)),
    "forced_eos_token_id": (dict(forced_eos_token_id=[EOS, 13]),
                            lambda p: hf.ForcedEOSTokenLogitsProcessor(MAX_LENGTH, [EOS, 13])),
    "min_length": (dict(min_length=6), lambda p: hf.MinLengthLogitsProcessor(6, EOS)),
    "min_new_tokens": (dict(min_new_tokens=3), lambda p: hf.MinNewTokensLengthLogitsProcessor(PROMPT_LEN, 3, EOS)),
    "exponential_decay_length_penalty": (
        dict(exponential_decay_length_penalty=(1, 1.6)),
        lambda p: hf.ExponentialDecayLengthPenalty((1, 1.6), EOS, PROMPT_LEN)),
    "renormalize_logits": (dict(renormalize_logits=True), lambda p: hf.LogitNormalization()),
}


@pytest.mark.parametrize("cur_len", [1, PROMPT_LEN, 6, MAX_LENGTH - 1])
@pytest.mark.parametrize("name", sorted(CASES))
def test_processor_equals_transformers(name, cur_len):
    kwargs, make_hf = CASES[name]
    kwargs = {"num_beams": 1, "do_sample": False, **kwargs}
    procs = build_processors(prompt_len=PROMPT_LEN, max_length=MAX_LENGTH, eos_token_ids=(EOS,), **kwargs)
    assert len(procs) == 1, procs
    for seed in range(3):
        input_ids, pads, ctx = _history(cur_len, seed)
        scores = _scores(seed)
        ours = np.asarray(procs[0](jnp.asarray(scores), ctx))
        ref = make_hf(pads)(input_ids, torch.tensor(scores)).numpy()
        assert (np.isneginf(ours) == np.isneginf(ref)).all(), f"-inf pattern differs (seed {seed})"
        finite = np.isfinite(ref)
        np.testing.assert_allclose(ours[finite], ref[finite], atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("k", [1, 5, 50, 256, 257, 400])
def test_kth_largest_with_ties_and_infinities(k):
    """Every path agrees with numpy, ties counted: the maximum (k=1), `select.top_k` (k <= 256:
    over 9000 scores its two-pass route for k=5 and 50, one ``lax.top_k`` for 256) and the
    bisection (k > 256)."""
    rng = np.random.default_rng(k)
    scores = np.round(rng.standard_normal((6, 9000)) * 2).astype(np.float32)  # many ties
    scores[1, :5] = -np.inf
    scores[2, 3] = np.inf
    scores[3] = -np.inf
    scores[4, 100:] = -np.inf  # fewer finite scores than k for the larger k
    expected = -np.sort(-scores, axis=-1)[:, k - 1]
    np.testing.assert_array_equal(np.asarray(_kth_largest(jnp.asarray(scores), k))[:, 0], expected)


@pytest.mark.parametrize("mass, keep", [(0.05, 1), (0.3, 3), (0.6, 1), (0.95, 2), (0.999, 1)])
def test_typical_with_ties_and_masked_tokens(mass, keep):
    """The bisection finds transformers' sorted cut: tied distances (scores rounded to few values),
    tokens already at -inf (an earlier top-k), a row with a single finite score, and the
    ``min_tokens_to_keep`` tokens of smallest distance kept by the lowest id among ties."""
    rng = np.random.default_rng(int(mass * 1000) + keep)
    scores = np.round(rng.standard_normal((6, 300)) * 2).astype(np.float32)  # many equal distances
    scores[1, ::3] = -np.inf
    scores[2, 1:] = -np.inf
    _, _, ctx = _history(2, 0)
    ours = np.asarray(Typical(jnp.float32(mass), keep)(jnp.asarray(scores), ctx))
    ref = hf.TypicalLogitsWarper(mass, min_tokens_to_keep=keep)(torch.zeros((6, 2), dtype=torch.long),
                                                                 torch.tensor(scores)).numpy()
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(ref))
    np.testing.assert_array_equal(ours[np.isfinite(ours)], ref[np.isfinite(ref)])


@pytest.mark.parametrize("top_h", [0.2, 0.6, 0.9])
def test_top_h_over_a_vocabulary(top_h):
    """Top-H's 100 best tokens from `select.top_k`'s chunked path over GPT-2's vocabulary: plain
    rows, masked tokens, a row whose probabilities underflow to zero among the 100 and a row
    with fewer than 100 finite scores (both: NaN entropies from there on, as torch)."""
    rng = np.random.default_rng(int(top_h * 10))
    scores = (rng.standard_normal((5, 50257)) * 4).astype(np.float32)
    scores[1, ::2] = -np.inf
    scores[2] *= 40
    scores[3, 60:] = -np.inf
    _, _, ctx = _history(2, 0)
    ours = np.asarray(TopH(jnp.float32(top_h))(jnp.asarray(scores), ctx))
    ref = hf.TopHLogitsWarper(top_h)(torch.zeros((5, 2), dtype=torch.long), torch.tensor(scores)).numpy()
    np.testing.assert_array_equal(ours, ref)
    assert (np.isfinite(ours).sum(-1) < np.minimum(np.isfinite(scores).sum(-1), 100)).all()


@pytest.mark.parametrize("top_k, top_p, num_beams", [(50, 0.9, 1), (50, 0.3, 2), (8, 0.99, 1), (256, 0.6, 1)])
def test_top_p_after_top_k_over_a_vocabulary(top_k, top_p, num_beams):
    """After top-k, top-p looks for its cut among the ``top_k`` candidates only; over GPT-2's
    vocabulary: plain rows, masked tokens, a row of 20 finite scores, one of a single finite
    score. Equal to transformers (no ties here) and, with scores rounded to a few values, to the
    cut over the whole vocabulary: ties with the k-th score outside the candidates count (the
    last row: all tied, none cut)."""
    rng = np.random.default_rng(top_k + num_beams)
    scores = (rng.standard_normal((6, 50257)) * 4).astype(np.float32)
    scores[1, ::2] = -np.inf
    scores[2, 20:] = -np.inf
    scores[3, 1:] = -np.inf
    _, _, ctx = _history(2, 0)
    procs = build_processors(prompt_len=2, max_length=9, eos_token_ids=(EOS,), num_beams=num_beams,
                             do_sample=True, top_k=top_k, top_p=top_p)
    assert [type(p).__name__ for p in procs] == ["TopK", "TopP"] and procs[1].candidates == max(top_k, num_beams)
    ours = np.asarray(apply(procs, jnp.asarray(scores), ctx))
    keep = 2 if num_beams > 1 else 1
    t, z = torch.tensor(scores), torch.zeros((6, 2), dtype=torch.long)
    ref = hf.TopPLogitsWarper(top_p, min_tokens_to_keep=keep)(z, hf.TopKLogitsWarper(top_k)(z, t)).numpy()
    np.testing.assert_array_equal(ours, ref)

    tied = np.round(scores)
    tied[5] = 1.0  # every score tied with the k-th
    whole_vocab = procs[:1] + (procs[1].replace(candidates=None),)
    ours = np.asarray(apply(procs, jnp.asarray(tied), ctx))
    np.testing.assert_array_equal(ours, np.asarray(apply(whole_vocab, jnp.asarray(tied), ctx)))
    assert np.isfinite(ours[5]).all()


@pytest.mark.parametrize("cur_len", [6, 2])
def test_sequence_bias_in_groups_of_prefix_length(cur_len):
    """Sequences of four prefix lengths, last tokens shared between them, tokens biased alone and
    after a prefix; every row ends with one or more prefixes. At ``cur_len=2`` the longer
    prefixes reach before the history, into columns of 6s (bucket padding) that must not match."""
    bias = {(6, 7): 0.5, (4,): 2.5, (1, 7): -3.0, (2, 6, 7): 2.0, (9,): -1.0, (6, 6, 6, 4): -2.0, (6, 2): 1.5,
            (3, 5, 6, 2, 9): 1.0, (5, 6, 4): 0.25}
    ids = np.array([[0, 3, 5, 6, 2, 6], [9, 9, 3, 5, 6, 2], [4, 6, 6, 6, 6, 6], [1, 2, 3, 4, 5, 6],
                    [0, 0, 0, 0, 0, 1]])[:, -cur_len:]
    buffer = np.concatenate([np.full((5, 4), 6), ids, np.zeros((5, 2), int)], axis=1)
    ctx = ProcessorContext(jnp.asarray(buffer, jnp.int32), jnp.int32(cur_len), jnp.zeros(5, jnp.int32), jnp.int32(4))
    (proc,) = build_processors(prompt_len=2, max_length=9, eos_token_ids=(EOS,), num_beams=1, do_sample=False,
                               sequence_bias=bias)
    scores = _scores(0)[:, :12]
    ours = np.asarray(proc(jnp.asarray(scores), ctx))
    ref = hf.SequenceBiasLogitsProcessor(bias)(torch.tensor(ids), torch.tensor(scores)).numpy()
    np.testing.assert_array_equal(ours, ref)
    assert len(np.unique(np.round(ours - scores, 4))) >= (6 if cur_len == 6 else 4)  # many matches


def test_remove_invalid_values():
    scores = np.array([[np.nan, np.inf, -np.inf, 1.5]], np.float32)
    (proc,) = build_processors(prompt_len=1, max_length=3, eos_token_ids=(), num_beams=1, do_sample=False,
                               remove_invalid_values=True)
    _, _, ctx = _history(2, 0)
    ours = np.asarray(proc(jnp.asarray(scores), ctx))
    ref = hf.InfNanRemoveLogitsProcessor()(torch.zeros((1, 2), dtype=torch.long), torch.tensor(scores)).numpy()
    np.testing.assert_array_equal(ours, ref)


def test_processor_order_matches_transformers():
    procs = build_processors(
        prompt_len=3, max_length=8, eos_token_ids=(EOS,), num_beams=1, do_sample=True, temperature=0.5, top_h=0.5,
        top_k=5, top_p=0.9, min_p=0.05, repetition_penalty=1.2, no_repeat_ngram_size=2, bad_words_ids=[[4]],
        sequence_bias={(5,): 1.0}, min_length=4, min_new_tokens=1, suppress_tokens=[7], renormalize_logits=True,
        encoder_repetition_penalty=1.5, encoder_no_repeat_ngram_size=2)
    names = [type(p).__name__ for p in procs]
    assert names == ["SequenceBias", "EncoderRepetitionPenalty", "RepetitionPenalty", "NoRepeatNGram",
                     "EncoderNoRepeatNGram", "SequenceBias", "MinLength",
                     "MinNewTokens", "SuppressTokens", "Temperature", "TopH", "TopK", "TopP", "MinP", "Renormalize"]


# --- inside generate, against transformers generate ----------------------------------------

GENERATE_CASES = {
    "repetition_penalty": dict(repetition_penalty=1.7),
    "no_repeat_ngram_size": dict(no_repeat_ngram_size=2),
    "bad_words_ids": dict(bad_words_ids=[[5], [9, 10], [EOS]]),
    "min_new_tokens": dict(min_new_tokens=4),
    "suppress_tokens": dict(suppress_tokens=[3, 4, 5]),
    "forced_eos_token_id": dict(forced_eos_token_id=EOS),
    # the prompt as passed, its padding (token 0) included, favoured; then so much that the rows
    # would repeat its bigrams, which the ban stops
    "encoder_repetition_penalty": dict(encoder_repetition_penalty=1.8),
    "encoder_no_repeat_ngram_size": dict(encoder_no_repeat_ngram_size=2, encoder_repetition_penalty=5.0),
    "combined": dict(repetition_penalty=1.3, no_repeat_ngram_size=3, bad_words_ids=[[7, 8]], min_new_tokens=2,
                     suppress_tokens=[11], forced_eos_token_id=EOS, sequence_bias={(12,): 2.0},
                     begin_suppress_tokens=[13], exponential_decay_length_penalty=(3, 1.3),
                     encoder_repetition_penalty=0.6, encoder_no_repeat_ngram_size=1),
}


@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("name", sorted(GENERATE_CASES))
def test_generate_with_processors_equals_transformers(eos_model, name, num_beams):
    torch_model, model = eos_model
    rng = np.random.default_rng(len(name) * 7 + num_beams)
    ids, mask = left_padded_batch(rng, 4, 6, EOS_MODEL["vocab_size"], [0, 2, 3, 1])
    kw = dict(max_new_tokens=8, num_beams=num_beams, eos_token_id=EOS, pad_token_id=PAD, **GENERATE_CASES[name])
    if num_beams > 1:
        kw["num_return_sequences"] = 2
    ref = hf_generate(torch_model, ids, mask, do_sample=False, **kw)
    out = jaxgen.generate(model, ids, mask, output_scores=True, **kw).trim()
    assert_same_generation(out, ref, beams=num_beams > 1)


def test_user_processor_equals_transformers_custom_processor(eos_model):
    torch_model, model = eos_model

    def ban_odd_after_even(scores, ctx):
        """A history-aware custom processor: after an even token, odd tokens are banned."""
        last = ctx.sequences[:, ctx.end - 1]
        odd = (jnp.arange(scores.shape[-1]) % 2 == 1)[None, :]
        return jnp.where(odd & (last % 2 == 0)[:, None], -jnp.inf, scores)

    class Torch(hf.LogitsProcessor):
        def __call__(self, input_ids, scores):
            odd = (torch.arange(scores.shape[-1]) % 2 == 1)[None, :]
            return scores.masked_fill(odd & (input_ids[:, -1:] % 2 == 0), -float("inf"))

    ids, mask = left_padded_batch(np.random.default_rng(3), 3, 5, EOS_MODEL["vocab_size"], [0, 1, 2])
    kw = dict(max_new_tokens=7, eos_token_id=EOS, pad_token_id=PAD)
    for extra in (dict(), dict(num_beams=2)):
        ref = hf_generate(torch_model, ids, mask, do_sample=False, logits_processor=hf.LogitsProcessorList([Torch()]),
                          **kw, **extra)
        out = jaxgen.generate(model, ids, mask, logits_processor=[ban_odd_after_even], output_scores=True,
                              **kw, **extra).trim()
        assert_same_generation(out, ref, beams=bool(extra))
