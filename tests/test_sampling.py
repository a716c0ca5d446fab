"""Sampling and beam sampling: reproducibility, exclusions, the sampled distribution, and both
against transformers made to draw what jaxgen drew (tokens, or beam candidates)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxgen
from jaxgen.decoding import beam
from tests.conftest import EOS, EOS_MODEL, PAD, assert_same_generation, hf_generate, left_padded_batch

KW = dict(eos_token_id=EOS, pad_token_id=PAD)


@pytest.fixture(scope="module")
def batch():
    return left_padded_batch(np.random.default_rng(0), 3, 6, EOS_MODEL["vocab_size"], [0, 2, 4])


def test_same_key_same_output_other_key_other_output(eos_model, batch):
    _, model = eos_model
    ids, mask = batch
    kw = dict(max_new_tokens=10, temperature=1.3, num_return_sequences=4, **KW)
    a = jaxgen.sample(model, ids, mask, key=jax.random.key(0), **kw).trim()
    b = jaxgen.sample(model, ids, mask, key=jax.random.key(0), **kw).trim()
    c = jaxgen.sample(model, ids, mask, key=jax.random.key(1), **kw).trim()
    np.testing.assert_array_equal(a.sequences, b.sequences)
    assert a.sequences.shape[0] == 12  # rows expanded as transformers: batch * num_return_sequences
    np.testing.assert_array_equal(a.sequences[::4, :6], ids)  # consecutive copies of each prompt
    assert a.sequences.shape != c.sequences.shape or (a.sequences != c.sequences).any()


def test_top_k_1_equals_greedy(eos_model, batch):
    _, model = eos_model
    ids, mask = batch
    greedy = jaxgen.greedy_search(model, ids, mask, max_new_tokens=9, **KW).trim()
    sampled = jaxgen.sample(model, ids, mask, key=jax.random.key(3), top_k=1, max_new_tokens=9, **KW).trim()
    np.testing.assert_array_equal(sampled.sequences, greedy.sequences)


def test_top_k_1_equals_greedy_in_every_copy_of_one_prompt(eos_model):
    """One prompt, three returned sequences: the batch-1 prompt cache (stored without its batch
    dim) is repeated into a three-row cache that every step reads."""
    _, model = eos_model
    ids, mask = left_padded_batch(np.random.default_rng(2), 1, 6, EOS_MODEL["vocab_size"], [0])
    kw = dict(max_new_tokens=9, min_new_tokens=9, **KW)
    greedy = jaxgen.greedy_search(model, ids, mask, **kw).trim()
    sampled = jaxgen.sample(model, ids, mask, key=jax.random.key(5), top_k=1, num_return_sequences=3, **kw).trim()
    np.testing.assert_array_equal(sampled.sequences, np.repeat(greedy.sequences, 3, 0))


@pytest.mark.parametrize("warper", [dict(top_k=5), dict(top_p=0.6, top_k=0), dict(min_p=0.2, top_k=0),
                                    dict(typical_p=0.5, top_k=0), dict(top_h=0.5, top_k=0),
                                    dict(top_k=8, top_p=0.7, temperature=0.6)])
def test_never_emits_an_excluded_token(eos_model, batch, warper):
    """Over many draws, every sampled token had a finite processed score in its row."""
    _, model = eos_model
    ids, mask = batch
    out = jaxgen.sample(model, ids, mask, key=jax.random.key(7), max_new_tokens=8, num_return_sequences=64,
                        output_scores=True, **warper, **KW).trim()
    generated = out.sequences[:, ids.shape[1]:]
    running = np.ones(generated.shape[0], bool)
    excluded_counts = []
    for step, scores in enumerate(out.scores):
        tokens = generated[:, step]
        assert np.isfinite(scores[np.arange(len(tokens)), tokens])[running].all(), f"step {step}"
        excluded_counts.append(np.isneginf(scores[running]).sum())
        running &= tokens != EOS
    assert sum(excluded_counts) > 0  # the warper really excluded something


def _chi2_critical(df, z=3.09):
    """Wilson-Hilferty approximation of the chi-square quantile (z=3.09: the 99.9% point)."""
    return df * (1 - 2 / (9 * df) + z * np.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("warper", [dict(top_k=0), dict(temperature=0.7, top_k=20, top_p=0.95)])
def test_token_frequencies_match_processed_softmax(eos_model, warper):
    """One step, 4000 draws (one key, 4000 rows): chi-square against softmax(processed scores)."""
    _, model = eos_model
    ids, mask = left_padded_batch(np.random.default_rng(1), 1, 5, EOS_MODEL["vocab_size"], [0])
    draws = 4000
    out = jaxgen.sample(model, ids, mask, key=jax.random.key(11), max_new_tokens=1, num_return_sequences=draws,
                        output_scores=True, **warper, **KW).trim()
    scores = out.scores[0][0]
    probs = np.exp(scores - scores.max())
    probs /= probs.sum()
    counts = np.bincount(out.sequences[:, -1], minlength=len(probs))
    assert counts[probs == 0].sum() == 0
    expected = probs * draws
    big = expected >= 5
    observed = np.append(counts[big], counts[~big].sum())
    expected = np.append(expected[big], expected[~big].sum())
    if expected[-1] < 5:  # fold a tiny remainder bin into the smallest kept bin
        observed, expected = observed[:-1], expected[:-1]
        observed[np.argmin(expected)] += counts[~big].sum()
        expected[np.argmin(expected)] += (probs[~big] * draws).sum()
    stat = ((observed - expected) ** 2 / expected).sum()
    df = len(expected) - 1
    assert df >= 5
    assert stat < _chi2_critical(df), (stat, df)


def test_beam_sampling(eos_model, batch):
    _, model = eos_model
    ids, mask = batch
    kw = dict(num_beams=4, num_return_sequences=3, max_new_tokens=8, output_scores=True, **KW)
    a = jaxgen.sample(model, ids, mask, key=jax.random.key(5), **kw).trim()
    b = jaxgen.generate(model, ids, mask, do_sample=True, key=jax.random.key(5), **kw).trim()
    c = jaxgen.sample(model, ids, mask, key=jax.random.key(6), **kw).trim()
    np.testing.assert_array_equal(a.sequences, b.sequences)
    assert a.sequences.shape[0] == 9 and a.beam_indices.shape[0] == 9
    assert a.sequences.shape != c.sequences.shape or (a.sequences != c.sequences).any()
    # The reported sequence scores are the length-normalised sums of the chosen tokens' scores.
    ts = np.asarray(jaxgen.compute_transition_scores(a.sequences, a.scores, a.beam_indices))
    generated = (a.beam_indices != -1).sum(1)
    np.testing.assert_allclose(ts.sum(1) / generated, a.sequences_scores, atol=1e-4)
    assert (np.diff(a.sequences_scores.reshape(3, 3), axis=1) <= 1e-6).all()  # best first


def hf_drawing(torch_model, ids, mask, draw, monkeypatch, **kw):
    """transformers' ``generate(do_sample=True)`` with ``torch.multinomial(probs, num_samples)``
    replaced by ``draw(probs, num_samples, step)``; returns its output and how many draws it made."""
    step = [0]

    def multinomial(probs, num_samples):
        step[0] += 1
        return draw(probs, num_samples, step[0] - 1)

    monkeypatch.setattr(torch, "multinomial", multinomial)
    ref = hf_generate(torch_model, ids, mask, do_sample=True, output_logits=True, **kw)
    monkeypatch.undo()
    return ref, step[0]


def hf_following(torch_model, ids, mask, ours, monkeypatch, **kw):
    """transformers made to draw the tokens jaxgen drew: its processors, warpers, EOS handling
    and padding then run on jaxgen's prefixes, and every drawn token must have had a positive
    probability there."""
    drawn = ours.sequences[:, ids.shape[1]:]
    eos = np.atleast_1d(kw["eos_token_id"])

    def draw(probs, num_samples, t):
        assert num_samples == 1 and t < drawn.shape[1], "transformers ran more steps than jaxgen"
        tokens = torch.tensor(drawn[:, t])
        running = ~np.isin(drawn[:, :t], eos).any(1)
        p = probs[torch.arange(len(tokens)), tokens].numpy()
        assert (p[running] > 0).all(), f"step {t}: jaxgen drew a token of probability 0 ({p})"
        return tokens[:, None]

    return hf_drawing(torch_model, ids, mask, draw, monkeypatch, **kw)[0]


FOLLOW = {
    "temperature_top_k_top_p": dict(temperature=0.7, top_k=10, top_p=0.9),
    "min_p_repetition_penalty": dict(top_k=0, min_p=0.1, repetition_penalty=1.3, temperature=1.5),
    "typical_p_no_repeat_min_new": dict(top_k=0, typical_p=0.6, no_repeat_ngram_size=2, min_new_tokens=3),
    "epsilon_eta": dict(top_k=0, epsilon_cutoff=0.02, eta_cutoff=0.01),
    "top_h_suppress_renormalize": dict(top_h=0.6, suppress_tokens=[3, 4], renormalize_logits=True),
    "two_eos_forced_eos": dict(eos_token_id=[EOS, 7], forced_eos_token_id=EOS, temperature=1.8),
}


@pytest.mark.parametrize("name", sorted(FOLLOW))
def test_each_step_equals_transformers_on_the_drawn_tokens(eos_model, monkeypatch, name):
    """Processed scores (warpers included) and raw logits of every step, left-padded prompts,
    three draws per prompt, rows that finish early."""
    torch_model, model = eos_model
    ids, mask = left_padded_batch(np.random.default_rng(len(name)), 3, 5, EOS_MODEL["vocab_size"], [0, 3, 1])
    kw = dict(KW, max_new_tokens=10, num_return_sequences=3, **FOLLOW[name])
    ours = jaxgen.sample(model, ids, mask, key=jax.random.key(len(name)), output_scores=True, output_logits=True,
                         **kw).trim()
    ref = hf_following(torch_model, ids, mask, ours, monkeypatch, **kw)
    assert_same_generation(ours, ref)
    for a, b in zip(ours.logits, ref.logits, strict=True):
        np.testing.assert_allclose(np.asarray(a), b.numpy(), atol=1e-4, rtol=0)
    early = np.isin(ours.sequences[:, ids.shape[1]:-1], np.atleast_1d(kw["eos_token_id"])).any(1)
    assert early.any()  # a row finished before the last step and was padded after it


def _warper_cases(n, seed=2026):
    """``n`` random combinations of warpers and the processors that run before them (all in
    transformers' order, so a combination tests what each one leaves to the next), from a fixed
    seed."""
    rng = np.random.default_rng(seed)
    cases = []
    for _ in range(n):
        batch, length = int(rng.integers(1, 4)), int(rng.integers(2, 8))
        pads = [0] + [int(rng.integers(0, length)) for _ in range(batch - 1)]
        kw = dict(KW, max_new_tokens=int(rng.integers(1, 12)), num_return_sequences=int(rng.integers(1, 4)))
        optional = {
            "temperature": float(rng.choice([0.5, 1.3, 2.0])),
            "top_k": int(rng.choice([0, 2, 5, 20])),
            "top_p": float(rng.choice([0.3, 0.8, 0.95])),
            "min_p": float(rng.choice([0.05, 0.2])),
            "typical_p": float(rng.choice([0.3, 0.8])),
            "epsilon_cutoff": float(rng.choice([1e-4, 0.02])),
            "eta_cutoff": float(rng.choice([1e-4, 0.01])),
            "top_h": float(rng.choice([0.3, 0.8])),
            "repetition_penalty": float(rng.choice([0.8, 1.3])),
            "min_new_tokens": int(rng.integers(0, kw["max_new_tokens"] + 1)),
            "renormalize_logits": True,
        }
        for name, value in optional.items():
            if rng.random() < (0.5 if name in ("temperature", "top_k", "top_p") else 0.25):
                kw[name] = value
        cases.append((pads, length, kw))
    return cases


WARPER_CASES = _warper_cases(8)


@pytest.mark.parametrize("case", range(len(WARPER_CASES)))
def test_random_warper_combinations(eos_model, monkeypatch, case):
    """`_warper_cases`, each against transformers made to draw jaxgen's tokens: sequences and
    processed scores of every step. When it was written, 460 cases of a wider mix (top-k 1, 50
    and 300, no_repeat_ngram_size, suppress_tokens, two EOS ids too) agreed, and 48 over GPT-2's
    vocabulary."""
    torch_model, model = eos_model
    pads, length, kw = WARPER_CASES[case]
    ids, mask = left_padded_batch(np.random.default_rng(case), len(pads), length, EOS_MODEL["vocab_size"], pads)
    ours = jaxgen.sample(model, ids, mask, key=jax.random.key(case), output_scores=True, **kw).trim()
    assert_same_generation(ours, hf_following(torch_model, ids, mask, ours, monkeypatch, **kw))


@pytest.mark.parametrize("warper", [dict(top_k=0, top_p=0.9), dict(top_p=0.9),
                                    dict(top_k=0, typical_p=0.8, temperature=0.6)])
def test_thresholds_over_gpt2s_vocabulary_equal_transformers(gpt2_vocab_model, monkeypatch, warper):
    """top-p / typical-p thresholds found by bisection keep exactly the tokens transformers'
    sort and cumulative sum keep, over 50257 entries (top-p also after the default top-k 50,
    where it bisects among the 50 candidates)."""
    torch_model, model = gpt2_vocab_model
    ids, mask = left_padded_batch(np.random.default_rng(4), 2, 6, 50257, [0, 2], pad_id=50256)
    kw = dict(max_new_tokens=6, num_return_sequences=2, eos_token_id=50256, pad_token_id=50256, **warper)
    ours = jaxgen.sample(model, ids, mask, key=jax.random.key(2), output_scores=True, output_logits=True, **kw).trim()
    ref = hf_following(torch_model, ids, mask, ours, monkeypatch, **kw)
    assert_same_generation(ours, ref)
    kept = [np.isfinite(s).sum(-1) for s in ours.scores]
    limit = 50257 if warper.get("top_k") == 0 else 50  # transformers' default top_k
    assert all((1 < k).all() and (k < limit).all() for k in kept)  # the thresholds really cut


BEAM_FOLLOW = {
    "temperature": dict(temperature=1.3, num_return_sequences=2),
    "top_k_early_stopping": dict(top_k=20, temperature=0.8, early_stopping=True, num_return_sequences=3),
    "top_p_penalties": dict(top_p=0.95, repetition_penalty=1.3, length_penalty=0.5, min_new_tokens=2),
}


@pytest.mark.parametrize("name", sorted(BEAM_FOLLOW))
def test_beam_sampling_equals_transformers_on_the_drawn_candidates(eos_model, monkeypatch, name):
    """transformers' beam sampling draws its candidates with ``torch.multinomial`` (without
    replacement) from the softmax of the accumulated log-probs; jaxgen with the Gumbel top-k of
    `beam._top_candidates`. Given jaxgen's draws (the same function, key and step, applied to the
    log of transformers' probabilities, which differ from jaxgen's accumulated scores by a
    constant per row), transformers must return the same beams, scores and beam indices."""
    torch_model, model = eos_model
    ids, mask = left_padded_batch(np.random.default_rng(len(name)), 3, 5, EOS_MODEL["vocab_size"], [0, 3, 1])
    kw = dict(KW, num_beams=4, max_new_tokens=10, **BEAM_FOLLOW[name])
    key = jax.random.key(len(name))
    ours = jaxgen.sample(model, ids, mask, key=key, output_scores=True, **kw).trim()

    def draw(probs, num_samples, step):
        # Where fewer entries than num_samples have a positive probability, torch's choice among
        # the zero ones is unspecified: such a case would test nothing.
        assert ((probs > 0).sum(-1) >= num_samples).all()
        acc = jnp.log(jnp.asarray(probs.numpy()))
        _, idx = beam._top_candidates(acc, num_samples, key, step, True, kw["num_beams"])
        return torch.tensor(np.asarray(idx), dtype=torch.long)

    ref, draws = hf_drawing(torch_model, ids, mask, draw, monkeypatch, **kw)
    assert_same_generation(ours, ref, beams=True)
    assert draws == len(ours.scores)


BAD = [
    (dict(temperature=0.0), "temperature=0.0"),
    (dict(temperature=-1.0), "temperature=-1.0"),
    (dict(top_p=-0.1), "top_p=-0.1"),
    (dict(top_k=-1), "top_k=-1"),
    (dict(top_h=0.0), "top_h=0.0"),
    (dict(top_h=1.2), "top_h=1.2"),
    (dict(min_p=1.5), "min_p=1.5"),
    (dict(typical_p=0.0), "typical_p=0.0"),
    (dict(epsilon_cutoff="small"), "epsilon_cutoff='small'"),
    (dict(key=None), "explicit PRNG key"),
    (dict(top_kk=3), "unknown generate argument 'top_kk'.*did you mean 'top_k'"),
    (dict(bad_words_ids=[[i] for i in range(48)], suppress_tokens=[EOS]), "ban every token"),
    (dict(bad_words_ids=[[i] for i in range(48)], min_new_tokens=1), "ban every token"),
    (dict(bad_words_ids=[[1, 2], 3]), "bad_words_ids"),
    (dict(sequence_bias={(1, 99): 1.0}), "sequence_bias"),
    (dict(repetition_penalty=0.0), "repetition_penalty=0.0"),
]


@pytest.mark.parametrize("kwargs, message", BAD, ids=[m[:20] for _, m in BAD])
def test_bad_sampling_arguments(eos_model, batch, kwargs, message):
    _, model = eos_model
    ids, mask = batch
    kw = dict(key=jax.random.key(0), max_new_tokens=3, **KW)
    kw.update(kwargs)
    with pytest.raises(ValueError, match=message):
        jaxgen.sample(model, ids, mask, **kw)
