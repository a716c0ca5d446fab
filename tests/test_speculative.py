"""Sampling with drafts: the first tokens of speculative sampling (a draft model's drafts) and of
prompt lookup sampling follow the model's own distribution exactly (chi-square over 40,000 draws
at 99.9%, against the joint probabilities transformers' processors give on the PyTorch model);
the draws hold EOS and padding as sampling does."""

from __future__ import annotations

import itertools

import jax
import numpy as np
import pytest
import torch
from scipy import stats
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper

import jaxgen
from tests.conftest import EOS, EOS_MODEL, PAD, build_checkpoint

VOCAB, NEW, TOP_K, TEMPERATURE = 10, 4, 4, 1.3
TINY = dict(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=1, n_head=2, initializer_range=0.6, bos_token_id=1,
            eos_token_id=2)
PROMPT = [5, 6, 7, 5, 6]  # its last bigram recurs: prompt lookup drafts from the start


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(torch model, jaxgen model, jaxgen draft): two random models of one 10-token vocabulary."""
    path = tmp_path_factory.mktemp("tiny")
    torch_model = build_checkpoint(path / "model", seed=0, **TINY)
    build_checkpoint(path / "draft", seed=3, **TINY)
    return torch_model, jaxgen.from_pretrained(path / "model"), jaxgen.from_pretrained(path / "draft")


def joint(torch_model) -> np.ndarray:
    """float64[V ** NEW]: the probability of every sequence of NEW tokens after PROMPT under
    transformers' temperature and top-k warpers, as a product of conditionals."""
    warp = LogitsProcessorList([TemperatureLogitsWarper(TEMPERATURE), TopKLogitsWarper(TOP_K)])
    probs = np.ones((1,))
    for n in range(NEW):
        prefixes = np.array(list(itertools.product(range(VOCAB), repeat=n)), np.int64).reshape(VOCAB ** n, n)
        ids = torch.tensor(np.concatenate([np.tile(PROMPT, (len(prefixes), 1)), prefixes], 1))
        with torch.no_grad():
            scores = warp(ids, torch_model(ids).logits[:, -1].double())
        probs = (probs[:, None] * torch.softmax(scores, -1).numpy()).reshape(-1)
    return probs


def draws(model, keys=2, rows=20_000, **kw) -> np.ndarray:
    """int64[keys * rows]: the index of each row's NEW sampled tokens in ``joint``'s order."""
    out = []
    for seed in range(keys):
        ids = np.tile(PROMPT, (rows, 1))
        seqs = jaxgen.generate(model, ids, max_new_tokens=NEW, do_sample=True,
                               key=jax.random.key(seed), temperature=TEMPERATURE, top_k=TOP_K, eos_token_id=None,
                               pad_token_id=0, prompt_bucket=None, **kw).trim().sequences[:, len(PROMPT):]
        out.append(np.ravel_multi_index(tuple(seqs.T), (VOCAB,) * NEW))
    return np.concatenate(out)


def assert_follows(samples: np.ndarray, probs: np.ndarray):
    """Chi-square goodness of fit at 99.9%, the cells expected fewer than 5 times pooled into one."""
    expected = probs * len(samples)
    observed = np.bincount(samples, minlength=len(probs)).astype(float)
    assert observed[expected == 0].sum() == 0, "a draw the model's distribution excludes"
    big = expected >= 5
    obs = np.append(observed[big], observed[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    result = stats.chisquare(obs, exp * obs.sum() / exp.sum())
    assert result.pvalue > 1e-3, f"chi-square {result.statistic:.0f} over {len(obs) - 1} degrees of freedom"


@pytest.mark.parametrize("kw", [dict(num_assistant_tokens=2, assistant_confidence_threshold=0.0),
                                dict(num_assistant_tokens=3, num_assistant_tokens_schedule="heuristic")],
                         ids=["two-tokens", "heuristic-confidence"])
def test_speculative_sampling_follows_the_model_s_distribution(tiny, kw):
    torch_model, model, draft = tiny
    samples = draws(model, assistant_model=draft, **kw)
    assert_follows(samples, joint(torch_model))


def test_the_check_tells_the_draft_s_distribution_apart(tiny):
    """The check has power: the draft model's own samples fail it."""
    torch_model, _, draft = tiny
    with pytest.raises(AssertionError, match="chi-square|excludes"):
        assert_follows(draws(draft), joint(torch_model))


def test_prompt_lookup_sampling_follows_the_model_s_distribution(tiny):
    torch_model, model, _ = tiny
    assert_follows(draws(model, prompt_lookup_num_tokens=3, max_matching_ngram_size=2), joint(torch_model))


def test_sampled_rows_end_on_eos_as_sampling_does(eos_model):
    """Batch 4, rows ending on EOS at different iterations: EOS then padding, every draft counted."""
    _, model = eos_model
    ids = np.random.default_rng(0).integers(3, EOS_MODEL["vocab_size"], (4, 5))
    out = jaxgen.generate(model, ids, max_new_tokens=24, do_sample=True, key=jax.random.key(1), eos_token_id=EOS,
                          pad_token_id=PAD, assistant_model=model.early_exit(1), num_assistant_tokens=3)
    seqs = out.trim().sequences[:, 5:]
    for row in seqs:
        ends = np.flatnonzero(row == EOS)
        if ends.size:
            assert (row[ends[0] + 1:] == PAD).all()
    assert (np.asarray(out.num_accepted) <= np.asarray(out.num_drafted)).all()
    assert ((np.asarray(out.num_drafted) > 0) | (seqs[:, 0] == EOS)).all()  # a row ending at once drafts nothing
