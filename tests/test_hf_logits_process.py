"""transformers' tests/generation/test_logits_process.py, ported to jaxgen's processors.

Each test keeps transformers' name, inputs and expected values; only the call changes:
``processor(input_ids, scores)`` becomes ``proc(scores, ctx)`` with a `ProcessorContext` holding
``input_ids`` as the whole history (no bucket padding, no left padding); the encoder processors'
``encoder_input_ids`` (a decoder-only model's prompt) come first in it. transformers' warpers
built with ``filter_value=0.0`` count kept tokens as ``!= 0``; jaxgen always filters to -inf, so
those counts are of finite scores. "Should not change logits in-place" checks stay as written
(JAX arrays are immutable, so they only check that the processor changed something).

Not ported (jaxgen has no such processor or option):
- test_repetition_penalty_normalized, test_repetition_penalty_normalized_reward,
  test_repetition_penalty_normalized_3d_scores: no ``normalize=True`` repetition penalty nor 3D scores.
- test_encoder_repetition_penalty_normalized: no ``normalize=True`` encoder repetition penalty.
- test_prefix_constrained_logits_processor: no ``prefix_allowed_tokens_fn``.
- test_classifier_free_guidance: its processor calls a torch model of its own; tests/test_guidance.py
  checks guidance against transformers' generate instead.
- test_early_stop_processor, test_early_stop_processor_multi_eos: no Bark EOS prioritizer.
- test_watermarking_processor: no watermarking.
- test_synthidtext_watermarking_processor_bias_uniformity,
  test_synthidtext_watermark_processor_bias_uniformity_across_vocab,
  test_synthidtext_watermark_processor_distributional_convergence,
  test_synthidtext_watermark_processor_bias_test: no SynthID watermarking.
- test_dia_classifier_free_guidance, test_dia_channel_filter, test_dia_delay_pattern: no Dia processors.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxgen.processors import (
    EncoderNoRepeatNGram,
    EncoderRepetitionPenalty,
    EpsilonCutoff,
    EtaCutoff,
    ForcedBOS,
    ForcedEOS,
    MinLength,
    MinNewTokens,
    MinP,
    NoRepeatNGram,
    ProcessorContext,
    RemoveInvalidValues,
    Renormalize,
    RepetitionPenalty,
    SequenceBias,
    Temperature,
    TopH,
    TopK,
    TopP,
    Typical,
    apply,
    build_processors,
)

_rng = np.random.default_rng(0)


def ids_tensor(shape, vocab_size):
    """Random token ids, as transformers' test helper of that name."""
    return _rng.integers(0, vocab_size, size=shape)


def uniform_logits(batch_size, length):
    """transformers' ``_get_uniform_logits``: float32 ``1 / length`` everywhere."""
    return np.ones((batch_size, length), np.float32) / np.float32(length)


def log_dist(rows):
    """``torch.log`` of float32 probabilities, as the warper tests build their scores."""
    return torch.log(torch.tensor(rows, dtype=torch.float)).numpy()


def ramp_logits(vocab_size, batch_size):
    """The warper tests' edge case: ``arange(vocab) - vocab // 2`` per row, the second row times 100."""
    ramp = np.tile(np.arange(vocab_size, dtype=np.float32), (batch_size, 1)) - (vocab_size // 2)
    ramp[1] = ramp[1] * 100.0
    return ramp


def ctx_of(input_ids, prompt_ignore_length=0):
    """``input_ids`` as the whole history; ``pad_lengths`` (columns of a row the repetition penalty
    skips) plays transformers' ``prompt_ignore_length``."""
    ids = jnp.asarray(np.asarray(input_ids), jnp.int32)
    pads = jnp.full((ids.shape[0],), prompt_ignore_length, jnp.int32)
    return ProcessorContext(ids, jnp.int32(ids.shape[1]), pads, jnp.int32(0))


def run(proc, input_ids, scores, prompt_ignore_length=0):
    """transformers' ``processor(input_ids, scores)``, as numpy; ``input_ids=None`` for the warpers."""
    scores = jnp.asarray(np.asarray(scores), jnp.float32)
    if input_ids is None:
        input_ids = np.zeros((scores.shape[0], 1), np.int32)
    return np.asarray(proc(scores, ctx_of(input_ids, prompt_ignore_length)))


def processor_list(procs):
    """transformers' ``LogitsProcessorList``."""
    return lambda scores, ctx: apply(tuple(procs), scores, ctx)


def no_bad_words(bad_words_ids, eos_token_id):
    """transformers' ``NoBadWordsLogitsProcessor``: jaxgen's ``bad_words_ids`` as `build_processors` maps it."""
    procs = build_processors(prompt_len=1, max_length=2, eos_token_ids=(eos_token_id,), num_beams=1,
                             do_sample=False, bad_words_ids=bad_words_ids)
    return processor_list(procs)


def test_min_length_dist_processor():
    """Ports LogitsProcessorTest.test_min_length_dist_processor."""
    vocab_size = 20
    batch_size = 4
    eos_token_id = 0

    min_dist_processor = MinLength(min_length=10, eos_token_ids=(eos_token_id,))

    # check that min length is applied at length 5
    input_ids = ids_tensor((batch_size, 5), vocab_size=20)
    scores = uniform_logits(batch_size, vocab_size)
    scores_before_min_length = run(min_dist_processor, input_ids, scores)
    assert scores_before_min_length[:, eos_token_id].tolist() == 4 * [-float("inf")]

    # check that min length is not applied anymore at length 15
    input_ids = ids_tensor((batch_size, 15), vocab_size=20)
    scores = uniform_logits(batch_size, vocab_size)
    scores_before_min_length = run(min_dist_processor, input_ids, scores)
    assert not np.isinf(scores_before_min_length).any()


@pytest.mark.parametrize("eos_token_id", [0, [0, 18]])
def test_new_min_length_dist_processor(eos_token_id):
    """Ports LogitsProcessorTest.test_new_min_length_dist_processor."""
    vocab_size = 20
    batch_size = 4
    eos_ids = tuple(eos_token_id) if isinstance(eos_token_id, list) else (eos_token_id,)

    # check that first input is skipped (min new length applying)
    input_ids = ids_tensor((batch_size, 5), vocab_size=20)
    new_min_dist_processor = MinNewTokens(prompt_len=jnp.int32(input_ids.shape[-1]), min_new_tokens=3,
                                          eos_token_ids=eos_ids)

    expected_eos_scores_before_min_length = batch_size * [-float("inf")]
    if isinstance(eos_token_id, list):
        expected_eos_scores_before_min_length *= len(eos_token_id)

    scores = uniform_logits(batch_size, vocab_size)
    scores_before_min_length = run(new_min_dist_processor, input_ids, scores)
    assert scores_before_min_length[:, eos_token_id].flatten().tolist() == expected_eos_scores_before_min_length

    # check that, for skipping, now prompt length is 5, after that we expect first 5 tokens will be skipped
    assert int(new_min_dist_processor.prompt_len) == 5

    # check that min length is applied at length 2
    input_ids = ids_tensor((batch_size, 2), vocab_size=20)
    scores = uniform_logits(batch_size, vocab_size)
    scores_before_min_length = run(new_min_dist_processor, input_ids, scores)
    assert scores_before_min_length[:, eos_token_id].flatten().tolist() == expected_eos_scores_before_min_length

    # check that min new length is applied at length 6 (because it has only 1 new token)
    input_ids = ids_tensor((batch_size, 6), vocab_size=20)
    scores = uniform_logits(batch_size, vocab_size)
    scores_before_min_length = run(new_min_dist_processor, input_ids, scores)
    assert scores_before_min_length[:, eos_token_id].flatten().tolist() == expected_eos_scores_before_min_length

    # check that min new length is applied at length 7 (because it has only 2 new tokens)
    input_ids = ids_tensor((batch_size, 7), vocab_size=20)
    scores = uniform_logits(batch_size, vocab_size)
    scores_before_min_length = run(new_min_dist_processor, input_ids, scores)
    assert scores_before_min_length[:, eos_token_id].flatten().tolist() == expected_eos_scores_before_min_length

    # check that min new length is not applied anymore at length 8
    input_ids = ids_tensor((batch_size, 8), vocab_size=20)
    scores = uniform_logits(batch_size, vocab_size)
    scores_before_min_length = run(new_min_dist_processor, input_ids, scores)
    assert not np.isinf(scores_before_min_length).any()

    # check that min new length is not applied anymore at length 15
    input_ids = ids_tensor((batch_size, 15), vocab_size=20)
    scores = uniform_logits(batch_size, vocab_size)
    scores_before_min_length = run(new_min_dist_processor, input_ids, scores)
    assert not np.isinf(scores_before_min_length).any()


def test_temperature_dist_warper():
    """Ports LogitsProcessorTest.test_temperature_dist_warper."""
    input_ids = None
    length = 20

    scores = uniform_logits(batch_size=2, length=length)

    # tweak scores to not be uniform anymore
    scores[1, 5] = (1 / length) + 0.1  # peak, 1st batch
    scores[1, 10] = (1 / length) - 0.4  # valley, 1st batch

    def softmax(x):
        return torch.softmax(torch.tensor(x), dim=-1).numpy()

    # compute softmax
    probs = softmax(scores)

    temp_dist_warper_sharper = Temperature(jnp.float32(0.5))
    temp_dist_warper_smoother = Temperature(jnp.float32(1.3))

    warped_prob_sharp = softmax(run(temp_dist_warper_sharper, input_ids, scores))
    warped_prob_smooth = softmax(run(temp_dist_warper_smoother, input_ids, scores))
    processed_scores = run(temp_dist_warper_smoother, input_ids, scores)

    # uniform distribution stays uniform
    np.testing.assert_allclose(probs[0, :], warped_prob_sharp[0, :], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(probs[0, :], warped_prob_smooth[0, :], rtol=1e-3, atol=1e-3)

    # sharp peaks get higher, valleys get lower
    assert probs[1, :].max() < warped_prob_sharp[1, :].max()
    assert probs[1, :].min() > warped_prob_sharp[1, :].min()

    # smooth peaks get lower, valleys get higher
    assert probs[1, :].max() > warped_prob_smooth[1, :].max()
    assert probs[1, :].min() < warped_prob_smooth[1, :].min()

    # processor should not change logits in-place
    assert not np.all(scores == processed_scores)


def test_repetition_penalty_dist_process():
    """Ports LogitsProcessorTest.test_repetition_penalty_dist_process."""
    input_ids = np.array([[0, 1], [5, 0]])
    vocab_size = 10

    scores = uniform_logits(batch_size=2, length=vocab_size)

    # give values special values
    scores[0, 0] = -(1 / vocab_size)
    scores[1, 5] = 4 / vocab_size

    rep_penalty_proc = RepetitionPenalty(jnp.float32(2.0))

    processed_scores = run(rep_penalty_proc, input_ids, scores)

    # check that values were correctly changed
    np.testing.assert_almost_equal(processed_scores[0, 0], -(1 / vocab_size) * 2)
    np.testing.assert_almost_equal(processed_scores[0, 1], (1 / vocab_size) / 2)

    np.testing.assert_almost_equal(processed_scores[1, 0], (1 / vocab_size) / 2)
    np.testing.assert_almost_equal(processed_scores[1, 5], (4 / vocab_size) / 2)

    # processor should not change logits in-place
    assert not np.all(scores == processed_scores)


def test_repetition_penalty_dist_process_exclusion_no_new_input_ids():
    """Ports LogitsProcessorTest.test_repetition_penalty_dist_process_exclusion_no_new_input_ids.

    transformers' ``prompt_ignore_length`` is the context's ``pad_lengths`` (columns skipped per row).
    """
    input_ids = np.array([[0, 1], [5, 0]])
    vocab_size = 10

    scores = uniform_logits(batch_size=2, length=vocab_size)

    # give values special values
    scores[0, 0] = -(1 / vocab_size)
    scores[1, 5] = 4 / vocab_size

    rep_penalty_proc = RepetitionPenalty(jnp.float32(2.0))

    processed_scores = run(rep_penalty_proc, input_ids, scores, prompt_ignore_length=input_ids.shape[-1])

    # Because input IDs were provided & we call with the same input
    # IDs that we initialize with, it should be the same as calling
    # with no input IDs, so no scores should be penalized.
    assert np.all(scores == processed_scores)


def test_repetition_penalty_dist_process_exclusion_with_new_input_ids():
    """Ports LogitsProcessorTest.test_repetition_penalty_dist_process_exclusion_with_new_input_ids.

    transformers' ``prompt_ignore_length`` is the context's ``pad_lengths`` (columns skipped per row).
    """
    orig_input_ids = np.array([[0, 1], [5, 0]])
    curr_input_ids = np.array([[0, 1, 0, 1], [5, 0, 5, 0]])
    vocab_size = 10

    scores = uniform_logits(batch_size=2, length=vocab_size)

    # give values special values
    scores[0, 0] = -(1 / vocab_size)
    scores[1, 5] = 4 / vocab_size

    rep_penalty_proc = RepetitionPenalty(jnp.float32(2.0))

    processed_scores = run(rep_penalty_proc, curr_input_ids, scores, prompt_ignore_length=orig_input_ids.shape[-1])

    # check that values were correctly changed
    np.testing.assert_almost_equal(processed_scores[0, 0], -(1 / vocab_size) * 2)
    np.testing.assert_almost_equal(processed_scores[0, 1], (1 / vocab_size) / 2)

    np.testing.assert_almost_equal(processed_scores[1, 0], (1 / vocab_size) / 2)
    np.testing.assert_almost_equal(processed_scores[1, 5], (4 / vocab_size) / 2)

    # processor should not change logits in-place
    assert not np.all(scores == processed_scores)


def test_top_k_dist_warper():
    """Ports LogitsProcessorTest.test_top_k_dist_warper."""
    input_ids = None
    vocab_size = 10
    batch_size = 2

    # create ramp distribution
    ramp = np.tile(np.arange(vocab_size, dtype=np.float32), (batch_size, 1))
    ramp[1:, : vocab_size // 2] = ramp[1:, : vocab_size // 2] + vocab_size

    top_k_warp = TopK(3)

    scores = run(top_k_warp, input_ids, ramp)

    # check that correct tokens are filtered
    assert np.isinf(scores[0]).tolist() == 7 * [True] + 3 * [False]
    assert np.isinf(scores[1]).tolist() == 2 * [True] + 3 * [False] + 5 * [True]

    # processor should not change logits in-place
    assert not np.all(scores == ramp)

    # check special cases
    length = 5

    logits = uniform_logits(batch_size=batch_size, length=length)
    top_k_warp_safety_check = TopK(max(1, 3))  # top_k=1, min_tokens_to_keep=3 (filter_value -inf, not 0.0)

    scores = run(top_k_warp_safety_check, input_ids, logits)
    # uniform dist is not changed
    assert np.isneginf(scores).sum(-1).tolist() == [0, 0]

    ramp = np.tile(np.arange(length, dtype=np.float32), (batch_size, 1))
    scores = run(top_k_warp_safety_check, input_ids, ramp)

    # min_tokens overwrites k: 3 tokens are kept => 2 tokens are nullified
    assert np.isneginf(scores).sum(-1).tolist() == [2, 2]


def test_top_p_dist_warper():
    """Ports LogitsProcessorTest.test_top_p_dist_warper."""
    input_ids = None
    vocab_size = 10
    batch_size = 2

    # create distribution and take log (inverse to Softmax as taken in TopPLogitsWarper)
    dist = log_dist([[0.3, 0.1, 0.1, 0.5], [0.15, 0.3, 0.3, 0.25]])

    top_p_warp = TopP(jnp.float32(0.8), 1)
    filtered_dist = np.exp(run(top_p_warp, input_ids, dist))

    # dist should be filtered to keep min num values so that sum is >= top_p
    # exp (-inf) => 0
    expected_filtered_dist = np.array([[0.3, 0.0, 0.0, 0.5], [0.0, 0.3, 0.3, 0.25]], np.float32)
    np.testing.assert_allclose(filtered_dist, expected_filtered_dist, rtol=1e-3, atol=1e-3)

    # processor should not change logits in-place
    assert not np.all(run(top_p_warp, input_ids, dist) == dist)

    # check edge cases with negative and extreme logits
    ramp = ramp_logits(vocab_size, batch_size)

    # make sure at least 2 tokens are kept
    top_p_warp = TopP(jnp.float32(0.9), 2)
    filtered_dist = run(top_p_warp, input_ids, ramp)

    # first batch should keep three tokens, second batch would keep only 1, but due to `min_tokens_to_keep=2` keeps 2.
    assert np.isfinite(filtered_dist).sum(-1).tolist() == [3, 2]


def test_top_h_dist_warper():
    """Ports LogitsProcessorTest.test_top_h_dist_warper.

    Small distributions whose kept set is obvious for the given alpha, passed as log-probabilities.
    """
    input_ids = None

    # --- Case 1: Highly peaked distribution -> small alpha keeps only the top-1
    dist1 = log_dist([[0.97, 0.01, 0.01, 0.01]])
    filtered_dist = np.exp(run(TopH(jnp.float32(0.3)), input_ids, dist1))  # exp(-inf) -> 0
    np.testing.assert_allclose(filtered_dist, np.array([[0.97, 0.0, 0.0, 0.0]]), rtol=1e-3, atol=1e-3)

    # --- Case 2: Moderately skewed distribution -> alpha large enough to keep exactly top-2
    dist2 = log_dist([[0.4, 0.3, 0.2, 0.1]])  # entropy budget with alpha=0.7 yields 2-token prefix
    filtered_dist = np.exp(run(TopH(jnp.float32(0.7)), input_ids, dist2))
    np.testing.assert_allclose(filtered_dist, np.array([[0.4, 0.3, 0.0, 0.0]]), rtol=1e-3, atol=1e-3)

    # --- Case 3: Uniform distribution -> alpha=1.0 keeps all tokens
    dist3 = log_dist([[0.25, 0.25, 0.25, 0.25]])
    filtered_dist = np.exp(run(TopH(jnp.float32(1.0)), input_ids, dist3))
    np.testing.assert_allclose(filtered_dist, np.array([[0.25, 0.25, 0.25, 0.25]]), rtol=1e-3, atol=1e-3)

    # --- Case 4: Probabilities including 0 value
    dist4 = log_dist([[0.75, 0.25, 0.0, 0.0]])
    filtered_dist = np.exp(run(TopH(jnp.float32(0.4)), input_ids, dist4))
    np.testing.assert_allclose(filtered_dist, np.array([[0.75, 0.0, 0.0, 0.0]]), rtol=1e-3, atol=1e-3)

    # Processor should not change logits in-place
    out_again = run(TopH(jnp.float32(0.5)), input_ids, dist3)
    assert not np.all(out_again == dist3)


def test_min_p_dist_warper():
    """Ports LogitsProcessorTest.test_min_p_dist_warper."""
    input_ids = None
    vocab_size = 10
    batch_size = 2

    # create distribution and take log (inverse to Softmax as taken in MinPLogitsWarper)
    dist = log_dist([
        [0.9, 0.0274, 0.047, 0.0274],  # two tokens should be kept (0.047 > 0.9*0.05=0.045)
        [0.15, 0.3, 0.3, 0.25],  # all should be kept -- no high-probability token
        [0.97, 0.01, 0.01, 0.01],  # only the first token should be kept
    ])

    min_p_warp = MinP(jnp.float32(0.05), 1)
    filtered_dist = np.exp(run(min_p_warp, input_ids, dist))

    # exp (-inf) => 0
    expected_filtered_dist = np.array([[0.9, 0.0, 0.047, 0.0], [0.15, 0.3, 0.3, 0.25], [0.97, 0.0, 0.0, 0.0]])
    np.testing.assert_allclose(filtered_dist, expected_filtered_dist, rtol=1e-3, atol=1e-3)

    # processor should not change logits in-place
    assert not np.all(run(min_p_warp, input_ids, dist) == dist)

    # check edge cases with negative and extreme logits
    ramp = ramp_logits(vocab_size, batch_size)

    # make sure at least 2 tokens are kept
    min_p_warp = MinP(jnp.float32(0.9), 2)
    filtered_dist = run(min_p_warp, input_ids, ramp)

    # first batch should keep two tokens, second batch would keep only 1, but due to `min_tokens_to_keep=2` keeps 2.
    assert np.isfinite(filtered_dist).sum(-1).tolist() == [2, 2]


def test_typical_dist_warper():
    """Ports LogitsProcessorTest.test_typical_dist_warper."""
    input_ids = None
    vocab_size = 10
    batch_size = 2

    # create distribution and take log (inverse to Softmax as taken in TopPLogitsWarper)
    dist = log_dist([[0.97, 0.01, 0.01, 0.01], [0.4, 0.2, 0.2, 0.2]])

    typical_warp = Typical(jnp.float32(0.5), 1)
    filtered_dist = np.exp(run(typical_warp, input_ids, dist))

    # dist should be filtered to keep min num values so that sum is >= 0.7
    # exp (-inf) => 0
    expected_filtered_dist = np.array([[0.97, 0.0, 0.0, 0.0], [0.0, 0.2, 0.2, 0.2]])
    np.testing.assert_allclose(filtered_dist, expected_filtered_dist, rtol=1e-3, atol=1e-3)

    # processor should not change logits in-place
    assert not np.all(run(typical_warp, input_ids, dist) == dist)

    # check special cases
    length = 5

    logits = uniform_logits(batch_size=batch_size, length=length)
    typical_warp_safety_check = Typical(jnp.float32(0.5), 3)

    scores = run(typical_warp_safety_check, input_ids, logits)
    # uniform dist is not changed
    assert np.isneginf(scores).sum(-1).tolist() == [0, 0]

    # check edge cases with negative and extreme logits
    ramp = ramp_logits(vocab_size, batch_size)

    # make sure at least 2 tokens are kept
    typical_warp = Typical(jnp.float32(0.7), 2)
    filtered_dist = run(typical_warp, input_ids, ramp)

    # first batch should keep two tokens, second batch would keep only 1, but due to `min_tokens_to_keep=2` keeps 2.
    assert np.isfinite(filtered_dist).sum(-1).tolist() == [2, 2]


def test_epsilon_dist_warper():
    """Ports LogitsProcessorTest.test_epsilon_dist_warper."""
    input_ids = None
    vocab_size = 10
    batch_size = 2

    # create distribution and take log (inverse to Softmax as taken in TopPLogitsWarper)
    dist = log_dist([[0.87, 0.099, 0.001, 0.03], [0.4, 0.299, 0.101, 0.2]])

    epsilon_warp = EpsilonCutoff(jnp.float32(0.1), 1)
    filtered_dist = np.exp(run(epsilon_warp, input_ids, dist))

    # dist should be filtered to only keep values with proba >= 0.1
    # exp (-inf) => 0
    expected_filtered_dist = np.array([[0.87, 0, 0, 0], [0.4, 0.299, 0.101, 0.2]])
    np.testing.assert_allclose(filtered_dist, expected_filtered_dist, rtol=1e-3, atol=1e-3)

    # processor should not change logits in-place
    assert not np.all(run(epsilon_warp, input_ids, dist) == dist)

    # check edge cases with negative and extreme logits
    ramp = ramp_logits(vocab_size, batch_size)

    # make sure at least 2 tokens are kept
    epsilon_warp = EpsilonCutoff(jnp.float32(5e-2), 2)
    filtered_dist = run(epsilon_warp, input_ids, ramp)

    # first batch should keep 3 tokens, second batch would keep only 1, but due to `min_tokens_to_keep=2` keeps 2.
    assert np.isfinite(filtered_dist).sum(-1).tolist() == [3, 2]


def test_eta_dist_warper():
    """Ports LogitsProcessorTest.test_eta_dist_warper."""
    input_ids = None
    vocab_size = 10
    batch_size = 2

    # create distribution and take log (inverse to Softmax as taken in TopPLogitsWarper)
    dist = log_dist([[0.0, 0.1, 0.8, 0.1], [0.01, 0.04, 0.9, 0.05]])

    eta_warp = EtaCutoff(jnp.float32(0.0625), 1)
    filtered_dist = np.exp(run(eta_warp, input_ids, dist))

    # dist should be filtered to only keep values with proba >= min(0.0625, sqrt(0.0625) * e^-H(p))
    # min(0.0625, 0.1320) is the cutoff for the first row and min(0.0625, 0.1644) is for the second
    # where H is the entropy function and p is the probability vector.
    # exp (-inf) => 0
    expected_filtered_dist = np.array([[0.0, 0.1, 0.8, 0.1], [0.0, 0.0, 0.9, 0.0]])
    np.testing.assert_allclose(filtered_dist, expected_filtered_dist, rtol=1e-3, atol=1e-3)

    # processor should not change logits in-place
    assert not np.all(run(eta_warp, input_ids, dist) == dist)

    # check edge cases with negative and extreme logits
    ramp = ramp_logits(vocab_size, batch_size)

    # make sure at least 2 tokens are kept
    eta_warp = EtaCutoff(jnp.float32(0.1), 2)
    filtered_dist = run(eta_warp, input_ids, ramp)

    # first batch should keep 2 tokens, second batch would keep only 1, but due to `min_tokens_to_keep=2` keeps 2.
    assert np.isfinite(filtered_dist).sum(-1).tolist() == [2, 2]


def test_no_repeat_ngram_dist_processor():
    """Ports LogitsProcessorTest.test_no_repeat_ngram_dist_processor."""
    vocab_size = 3
    batch_size = 2

    input_ids = np.array([[1, 1, 2, 1], [0, 1, 0, 1]])
    scores = uniform_logits(batch_size, vocab_size)

    no_repeat_proc_2_gram = NoRepeatNGram(2)
    no_repeat_proc_3_gram = NoRepeatNGram(3)

    filtered_scores_2_gram = run(no_repeat_proc_2_gram, input_ids, scores)
    filtered_scores_3_gram = run(no_repeat_proc_3_gram, input_ids, scores)

    # 2-gram would forbid 2nd and 3rd token (1,2) at 1st batch and 1st token (0) at 2nd batch
    assert np.isinf(filtered_scores_2_gram).tolist() == [[False, True, True], [True, False, False]]

    # 3-gram would forbid no token at 1st batch and 1st token (0) at 2nd batch
    assert np.isinf(filtered_scores_3_gram).tolist() == [[False, False, False], [True, False, False]]

    # processor should not change logits in-place
    assert not np.all(scores == filtered_scores_2_gram)
    assert not np.all(scores == filtered_scores_3_gram)


def run_encoder(proc_class, arg, encoder_input_ids, input_ids, scores):
    """transformers' ``Encoder*Processor(arg, encoder_input_ids)(input_ids, scores)``: each row's
    history is its prompt (the encoder ids of its batch row, ``rows // batch`` beams each) followed
    by its ``input_ids``."""
    encoder = np.atleast_2d(encoder_input_ids)
    prompts = np.repeat(encoder, len(input_ids) // len(encoder), axis=0)
    history = np.concatenate([prompts, input_ids], axis=1)
    proc = proc_class(arg, jnp.int32(encoder.shape[1]))
    return run(proc, history, scores)


def test_encoder_repetition_penalty_dist_process():
    """Ports LogitsProcessorTest.test_encoder_repetition_penalty_dist_process."""
    input_ids = np.array([[0, 1], [5, 0]])
    vocab_size = 10

    scores = uniform_logits(batch_size=2, length=vocab_size)

    # give values special values
    scores[0, 0] = -(1 / vocab_size)
    scores[1, 5] = 4 / vocab_size

    processed_scores = run_encoder(EncoderRepetitionPenalty, jnp.float32(1 / 2.0), input_ids, input_ids, scores)

    # check that values were correctly changed
    np.testing.assert_almost_equal(processed_scores[0, 0], -(1 / vocab_size) / 2)
    np.testing.assert_almost_equal(processed_scores[0, 1], (1 / vocab_size) * 2)

    np.testing.assert_almost_equal(processed_scores[1, 0], (1 / vocab_size) * 2)
    np.testing.assert_almost_equal(processed_scores[1, 5], (4 / vocab_size) * 2)

    # check that values not in the encoder ids were NOT changed
    np.testing.assert_almost_equal(processed_scores[0, 2], (1 / vocab_size))
    np.testing.assert_almost_equal(processed_scores[1, 2], (1 / vocab_size))


def test_encoder_no_repeat_ngram_dist_processor():
    """Ports LogitsProcessorTest.test_encoder_no_repeat_ngram_dist_processor."""
    vocab_size = 3
    num_beams = 2
    batch_size = 1

    encoder_input_ids = np.array([1, 2, 1, 1])

    input_ids = np.array([[1, 2, 1], [8, 0, 2]])
    scores = uniform_logits(batch_size * num_beams, vocab_size)

    filtered_scores_2_gram = run_encoder(EncoderNoRepeatNGram, 2, encoder_input_ids, input_ids, scores)
    filtered_scores_3_gram = run_encoder(EncoderNoRepeatNGram, 3, encoder_input_ids, input_ids, scores)

    # 2-gram would forbid 1st and 2nd token at 1st beam and 1st token (0) at 2nd beam
    assert np.isinf(filtered_scores_2_gram).tolist() == [[False, True, True], [False, True, False]]

    # 3-gram would forbid 1st token at 1st beam and no token at 2nd beam
    assert np.isinf(filtered_scores_3_gram).tolist() == [[False, True, False], [False, False, False]]

    # Batched input
    vocab_size = 3
    num_beams = 2
    batch_size = 2
    encoder_input_ids = np.array([[1, 2, 1, 1], [0, 0, 2, 1]])

    input_ids = np.array([[1, 2, 1], [1, 0, 2], [0, 0, 0], [0, 2, 2]])
    scores = uniform_logits(batch_size * num_beams, vocab_size)

    filtered_scores_2_gram = run_encoder(EncoderNoRepeatNGram, 2, encoder_input_ids, input_ids, scores)
    filtered_scores_3_gram = run_encoder(EncoderNoRepeatNGram, 3, encoder_input_ids, input_ids, scores)

    # 2gram
    # Batch 1
    #   - Beam 1: tokens (1, 2) forbidden
    #   - Beam 2: tokens (1) forbidden
    # Batch 2
    #   - Beam 1: tokens (0, 2) forbidden
    #   - Beam 2: tokens (1) forbidden
    assert np.isinf(filtered_scores_2_gram).tolist() == [
        [False, True, True], [False, True, False], [True, False, True], [False, True, False]]

    # Batch 1
    #   - Beam 1: tokens (1) forbidden
    #   - Beam 2: tokens () forbidden
    # Batch 2
    #   - Beam 1: tokens (2) forbidden
    #   - Beam 2: tokens () forbidden
    assert np.isinf(filtered_scores_3_gram).tolist() == [
        [False, True, False], [False, False, False], [False, False, True], [False, False, False]]


def test_no_repeat_ngram_dist_processor_banned_token_reappears():
    """Ports LogitsProcessorTest.test_no_repeat_ngram_dist_processor_banned_token_reappears."""
    vocab_size = 10
    batch_size = 1

    # The 3-gram (1, 2, 5) repeats the current (1, 2) suffix and bans 5. The later 3-gram (7, 8, 5) ends in the
    # same token without repeating the suffix, and must not undo that ban.
    input_ids = np.array([[1, 2, 5, 7, 8, 5, 1, 2]])
    scores = uniform_logits(batch_size, vocab_size)

    filtered_scores = run(NoRepeatNGram(3), input_ids, scores)

    assert np.nonzero(np.isinf(filtered_scores))[1].tolist() == [5]


def test_no_repeat_ngram_dist_processor_sequence_shorter_than_ngram():
    """Ports LogitsProcessorTest.test_no_repeat_ngram_dist_processor_sequence_shorter_than_ngram."""
    vocab_size = 3
    batch_size = 2

    # The sequences are one token short of holding a 3-gram, so nothing can be banned yet
    input_ids = np.array([[1, 2], [0, 1]])
    scores = uniform_logits(batch_size, vocab_size)

    filtered_scores = run(NoRepeatNGram(3), input_ids, scores)

    assert not np.isinf(filtered_scores).any()


def test_no_bad_words_dist_processor():
    """Ports LogitsProcessorTest.test_no_bad_words_dist_processor."""
    vocab_size = 5
    batch_size = 2
    eos_token_id = 4

    input_ids = np.array([[0, 1, 3, 1], [0, 1, 0, 1]])
    bad_word_tokens = [[1], [4], [1, 0], [0, 1, 2], [1, 3, 1, 3]]
    scores = uniform_logits(batch_size, vocab_size)

    no_bad_words_dist_proc = no_bad_words(bad_word_tokens, eos_token_id)

    filtered_scores = run(no_bad_words_dist_proc, input_ids, scores)

    # batch 1: 1st, 2nd, and 4th (0, 1, 3) token are forbidden
    # batch 2: 1st, 2nd, and 3rd (0, 1, 2) token are forbidden
    # Note that 5th element cannot be forbidden as it is EOS token
    assert np.isinf(filtered_scores).tolist() == [[True, True, False, True, False], [True, True, True, False, False]]

    # processor should not change logits in-place
    assert not np.all(scores == filtered_scores)

    # check edge case
    no_bad_words_dist_proc = no_bad_words([[4]], eos_token_id)
    filtered_scores = run(no_bad_words_dist_proc, input_ids, scores)
    np.testing.assert_allclose(scores, filtered_scores, rtol=1e-3, atol=1e-3)


def test_bias_dist_processor():
    """Ports LogitsProcessorTest.test_bias_dist_processor."""
    vocab_size = 5
    batch_size = 2

    input_ids = np.array([[0, 1, 3, 1], [0, 1, 0, 1]])
    positive_bias = {(1,): 100.0, (4,): 100.0}
    negative_bias = {(1, 0): -100.0, (0, 1, 2): -100.0, (1, 3, 1, 3): -100.0}
    # biases the same termination twice, to ensure we can handle overlapping terminations (it won't have an effect
    # on the test cases, though)
    negative_bias.update({(1, 3, 1, 3, 1, 3): -100.0})
    sequence_bias = {**positive_bias, **negative_bias}

    # scores = 0 to facilitate checks
    scores = np.zeros((batch_size, vocab_size), np.float32)

    bias_dist_proc = SequenceBias(tuple(sequence_bias), jnp.asarray(list(sequence_bias.values()), jnp.float32))
    filtered_scores = run(bias_dist_proc, input_ids, scores)

    # batch 1: positive bias: tokens (1, 4); negative bias: tokens (0, 3); neutral: tokens (2)
    # batch 2: positive bias: tokens (1, 4); negative bias: tokens (0, 2); neutral: tokens (3)
    assert filtered_scores.tolist() == [[-100.0, 100.0, 0.0, -100.0, 100.0], [-100.0, 100.0, -100.0, 0.0, 100.0]]

    # processor should not change logits in-place
    assert not np.all(scores == filtered_scores)


def test_processor_list():
    """Ports LogitsProcessorTest.test_processor_list."""
    batch_size = 4
    sequence_length = 10
    vocab_size = 15
    eos_token_id = 0

    # dummy input_ids and scores
    input_ids = ids_tensor((batch_size, sequence_length), vocab_size)
    input_ids_comp = input_ids.copy()

    scores = uniform_logits(batch_size, vocab_size)
    scores_comp = scores.copy()

    # instantiate all dist processors
    min_dist_proc = MinLength(min_length=10, eos_token_ids=(eos_token_id,))
    temp_dist_warp = Temperature(jnp.float32(0.5))
    rep_penalty_proc = RepetitionPenalty(jnp.float32(2.0))
    top_k_warp = TopK(3)
    top_p_warp = TopP(jnp.float32(0.8), 1)
    no_repeat_proc = NoRepeatNGram(2)
    no_bad_words_dist_proc = no_bad_words([[1]], eos_token_id)

    # no processor list
    scores = run(min_dist_proc, input_ids, scores)
    scores = run(temp_dist_warp, input_ids, scores)
    scores = run(rep_penalty_proc, input_ids, scores)
    scores = run(top_k_warp, input_ids, scores)
    scores = run(top_p_warp, input_ids, scores)
    scores = run(no_repeat_proc, input_ids, scores)
    scores = run(no_bad_words_dist_proc, input_ids, scores)

    # with processor list
    processor = processor_list([
        min_dist_proc,
        temp_dist_warp,
        rep_penalty_proc,
        top_k_warp,
        top_p_warp,
        no_repeat_proc,
        no_bad_words_dist_proc,
    ])
    scores_comp = run(processor, input_ids, scores_comp)

    # scores should be equal
    np.testing.assert_allclose(scores, scores_comp, rtol=1e-3, atol=1e-3)

    # input_ids should never be changed
    assert input_ids.tolist() == input_ids_comp.tolist()


def test_forced_bos_token_logits_processor():
    """Ports LogitsProcessorTest.test_forced_bos_token_logits_processor."""
    vocab_size = 20
    batch_size = 4
    bos_token_id = 0

    logits_processor = ForcedBOS(bos_token_id=bos_token_id)

    # check that all scores are -inf except the bos_token_id score
    input_ids = ids_tensor((batch_size, 1), vocab_size=20)
    scores = uniform_logits(batch_size, vocab_size)
    processed_scores = run(logits_processor, input_ids, scores)
    assert np.isneginf(processed_scores[:, bos_token_id + 1:]).all()
    # score for bos_token_id should be zero
    assert processed_scores[:, bos_token_id].tolist() == 4 * [0]

    # processor should not change logits in-place
    assert not np.all(scores == processed_scores)

    # check that bos_token_id is not forced if current length is greater than 1
    input_ids = ids_tensor((batch_size, 4), vocab_size=20)
    scores = uniform_logits(batch_size, vocab_size)
    processed_scores = run(logits_processor, input_ids, scores)
    assert not np.isinf(processed_scores).any()


def test_forced_eos_token_logits_processor():
    """Ports LogitsProcessorTest.test_forced_eos_token_logits_processor."""
    vocab_size = 20
    batch_size = 4
    eos_token_id = 0
    max_length = 5

    logits_processor = ForcedEOS(max_length=jnp.int32(max_length), eos_token_ids=(eos_token_id,))

    # check that all scores are -inf except the eos_token_id when max_length-1 is reached
    input_ids = ids_tensor((batch_size, 4), vocab_size=20)
    scores = uniform_logits(batch_size, vocab_size)
    processed_scores = run(logits_processor, input_ids, scores)
    assert np.isneginf(processed_scores[:, eos_token_id + 1:]).all()
    # score for eos_token_id should be zero
    assert processed_scores[:, eos_token_id].tolist() == 4 * [0]

    # processor should not change logits in-place
    assert not np.all(scores == processed_scores)

    # check that eos_token_id is not forced if max_length-1 is not reached
    input_ids = ids_tensor((batch_size, 3), vocab_size=20)
    scores = uniform_logits(batch_size, vocab_size)
    processed_scores = run(logits_processor, input_ids, scores)
    assert not np.isinf(processed_scores).any()


def test_remove_nan_inf_logits_processor():
    """Ports LogitsProcessorTest.test_remove_nan_inf_logits_processor."""
    scores = np.array([[0.0, 0.7, 0.8, float("nan")], [0.1, float("inf"), 0.3, float("-inf")]], np.float32)
    input_ids = ids_tensor((2, 4), vocab_size=20)

    logits_processor = RemoveInvalidValues()

    processed_scores = run(logits_processor, input_ids, scores)

    finfo = np.finfo(processed_scores.dtype)
    expected = np.array([[0.0, 0.7, 0.8, 0.0], [0.1, finfo.max, 0.3, finfo.min]], np.float32)
    assert np.allclose(processed_scores, expected, atol=1e-6)

    # processor should not change logits in-place
    assert not np.all(scores == processed_scores)


def test_exponential_decay_length_penalty():
    """Ports LogitsProcessorTest.test_exponential_decay_length_penalty (built as `build_processors` maps it)."""
    vocab_size = 20
    batch_size = 4
    eos_token_id = 0

    penalty_start = 5
    penalty_factor = 1.1

    input_ids = ids_tensor((batch_size, 2), vocab_size=vocab_size)
    input_ids_seq_length = input_ids.shape[-1]

    (length_decay_processor,) = build_processors(
        prompt_len=input_ids_seq_length, max_length=20, eos_token_ids=(eos_token_id,), num_beams=1, do_sample=False,
        exponential_decay_length_penalty=(penalty_start, penalty_factor),
    )

    # check that penalty is not applied before start
    scores = uniform_logits(batch_size, vocab_size)
    scores_before_start = run(length_decay_processor, input_ids, scores)
    assert scores_before_start[:, eos_token_id].tolist() == scores[:, eos_token_id].tolist()

    # check that penalty is applied after start
    input_ids = ids_tensor((batch_size, 20), vocab_size=vocab_size)
    scores = uniform_logits(batch_size, vocab_size)
    scores_after_start = run(length_decay_processor, input_ids, scores)
    assert (scores_after_start[:, eos_token_id] > scores[:, eos_token_id]).all()

    # check the penalty increases negative scores
    input_ids = ids_tensor((batch_size, 20), vocab_size=vocab_size)
    scores = -uniform_logits(batch_size, vocab_size)
    scores_after_start = run(length_decay_processor, input_ids, scores)
    assert (scores_after_start[:, eos_token_id] > scores[:, eos_token_id]).all()

    # processor should not change logits in-place
    assert not np.all(scores == scores_after_start)


def test_normalization():
    """Ports LogitsProcessorTest.test_normalization (LogitNormalization is jaxgen's Renormalize)."""
    input_ids = None

    scores = np.array([[-23.18, -29.96, -43.54, 47.77], [-33.58, -26.87, -32.96, 22.51]], np.float32)

    logit_normalization = Renormalize()
    normalized_scores = np.exp(run(logit_normalization, input_ids, scores))

    ones = np.ones(scores.shape[0], np.float32)
    assert np.allclose(normalized_scores.sum(-1), ones)

    assert np.allclose(normalized_scores, torch.softmax(torch.tensor(scores), dim=-1).numpy())

    # processor should not change logits in-place
    assert not np.all(scores == normalized_scores)
