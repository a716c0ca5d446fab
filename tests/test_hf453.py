"""Contrastive search, group (diverse) beam search, DoLa and constrained beam search against
transformers 4.53.3, the last release that runs them in its core (transformers 5.x loads them
from the hub repositories ``transformers-community/contrastive-search``, ``.../group-beam-search``,
..., whose code is 4.53's). 4.53 runs in a virtual environment of its own, built once and cached in
``~/.cache/jaxgen-tests`` (``pip install torch==2.13.0 transformers==4.53.3``, about 30 s), and
is called in a subprocess (tests/hf453_reference.py) on the checkpoints these tests save.

The calls avoid processors whose 4.53 form differs from 5.x's, which jaxgen follows (4.53's
repetition penalty also penalises the left padding's pad id). Where 4.53 is wrong, the tests say
how and check what is right instead."""

from __future__ import annotations

import fcntl
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxgen
from tests.conftest import EOS, EOS_MODEL, PAD, build_checkpoint, left_padded_batch
from tests.test_hf_generation_utils import _normalised_sums

HERE = pathlib.Path(__file__).parent
CACHE = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "jaxgen-tests"
PACKAGES = ("torch==2.13.0", "transformers==4.53.3")


@pytest.fixture(scope="session")
def hf453() -> str:
    """The python of a virtual environment with transformers 4.53.3 (built on first use; a lock
    keeps parallel test workers from building it twice)."""
    venv = CACHE / "transformers-4.53.3"
    python = venv / "bin" / "python"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "transformers-4.53.3.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (venv / "ready").exists():
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
            subprocess.run([str(python), "-m", "pip", "install", "-q", *PACKAGES], check=True)
            (venv / "ready").touch()
    return str(python)


def reference(hf453: str, checkpoint, calls: list[dict], tmp_path) -> list[dict]:
    """transformers 4.53's ``generate(**call)`` for each call, in one subprocess."""
    subprocess.run([hf453, str(HERE / "hf453_reference.py"), str(checkpoint), str(tmp_path)], check=True,
                   input=json.dumps(calls), text=True, capture_output=True)
    return [dict(np.load(tmp_path / f"{i}.npz")) for i in range(len(calls))]


def assert_equal_to(ours, ref, atol=1e-4):
    """Sequences exactly, scores within ``atol`` with the same -inf pattern."""
    np.testing.assert_array_equal(ours.sequences, ref["sequences"])
    scores = np.stack(ours.scores)
    assert scores.shape == ref["scores"].shape
    finite = np.isfinite(ref["scores"])
    assert (np.isfinite(scores) == finite).all()
    np.testing.assert_allclose(scores[finite], ref["scores"][finite], atol=atol, rtol=0)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """(checkpoint path, jaxgen model): the EOS model of conftest (rows end at different steps)."""
    path = tmp_path_factory.mktemp("contrastive_gpt2")
    build_checkpoint(path, seed=0, eos_boost=2.0, **EOS_MODEL)
    return path, jaxgen.from_pretrained(path)


def _prompts(batch):
    ids, mask = left_padded_batch(np.random.default_rng(3), 3, 6, EOS_MODEL["vocab_size"], [0, 2, 5])
    return (ids, mask) if batch == 3 else (ids[1:2], mask[1:2])


CONTRASTIVE = [  # (batch, generate kwargs)
    (3, dict(penalty_alpha=0.6, top_k=4)),
    (3, dict(penalty_alpha=0.3, top_k=2, min_new_tokens=3)),
    (1, dict(penalty_alpha=0.8, top_k=6)),
    (3, dict(penalty_alpha=0.5, top_k=3, eos_token_id=[EOS, 7], max_new_tokens=14)),
]


def test_contrastive_search_equals_transformers_4_53(gpt2, hf453, tmp_path):
    path, model = gpt2
    calls = [dict(dict(max_new_tokens=10, eos_token_id=EOS, pad_token_id=PAD), **kw) for _, kw in CONTRASTIVE]
    refs = reference(hf453, path, [dict(call, ids=_prompts(b)[0].tolist(), mask=_prompts(b)[1].tolist())
                                   for (b, _), call in zip(CONTRASTIVE, calls)], tmp_path)
    finished_early = []
    for (batch, _), call, ref in zip(CONTRASTIVE, calls, refs):
        ids, mask = _prompts(batch)
        ours = jaxgen.generate(model, ids, mask, output_scores=True, **call).trim()
        assert_equal_to(ours, ref)
        finished_early.append(np.isin(ours.sequences[:, ids.shape[1]:-1], EOS).any(1))
    finished = np.concatenate(finished_early)
    assert finished.any() and not finished.all()  # rows end at different steps, and some run to the end


def test_contrastive_search_on_llama_equals_transformers_4_53(hf453, tmp_path):
    """Grouped-query attention, untied head, biases, on a left-padded batch: each row equals 4.53
    on that prompt alone. (4.53 on the padded batch is no reference here: its Llama leaves the
    padding positions' last hidden state at zero, whose cosine similarity is NaN; the NaN wins its
    max and every candidate's score, so a padded row takes the top candidate, as greedy search.)"""
    from tests.test_families import VOCAB, build
    build(tmp_path / "model", "llama_gqa2_biases_untied")
    model = jaxgen.from_pretrained(tmp_path / "model")
    ids, mask = left_padded_batch(np.random.default_rng(0), 3, 7, VOCAB, pads=[0, 3, 1], low=3)
    call = dict(max_new_tokens=8, eos_token_id=EOS, pad_token_id=PAD, penalty_alpha=0.6, top_k=4)
    alone = [dict(call, ids=[row[m == 1].tolist()], mask=[[1] * int(m.sum())]) for row, m in zip(ids, mask)]
    ours = jaxgen.generate(model, ids, mask, output_scores=True, **call).trim()
    for row, ref in enumerate(reference(hf453, tmp_path / "model", alone, tmp_path)):
        steps = ref["scores"].shape[0]
        np.testing.assert_array_equal(ours.sequences[row, ids.shape[1]:ids.shape[1] + steps],
                                      ref["sequences"][0, -steps:])
        np.testing.assert_allclose(np.stack(ours.scores)[:steps, row], ref["scores"][:, 0], atol=1e-4, rtol=0)


def test_contrastive_search_compiles_once_per_top_k(gpt2):
    """penalty_alpha is traced (a new value reuses the program); top_k, the candidate count, is static."""
    from jaxgen.decoding import api
    _, model = gpt2
    ids, mask = _prompts(3)
    kw = dict(max_new_tokens=5, eos_token_id=EOS, pad_token_id=PAD, top_k=3)
    jaxgen.generate(model, ids, mask, penalty_alpha=0.5, **kw)
    before = api._decode._cache_size()
    jaxgen.generate(model, ids, mask, penalty_alpha=0.7, **kw)
    assert api._decode._cache_size() == before


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_return_sequences=2), "num_return_sequences=2"),
    (dict(use_cache=False), "use_cache=False.*contrastive search"),
    (dict(penalty_alpha="high"), "penalty_alpha='high'"),
])
def test_contrastive_search_bad_arguments(gpt2, kwargs, message):
    _, model = gpt2
    ids, mask = _prompts(3)
    with pytest.raises(ValueError, match=message):
        jaxgen.generate(model, ids, mask, **{"max_new_tokens": 4, "penalty_alpha": 0.6, "top_k": 4,
                                             "pad_token_id": PAD, **kwargs})


GROUPS = [  # (batch, generate kwargs)
    (3, dict(num_beams=6, num_beam_groups=3, diversity_penalty=1.0, num_return_sequences=3, length_penalty=0.7)),
    (3, dict(num_beams=4, num_beam_groups=4, diversity_penalty=0.3, early_stopping=True)),
    (3, dict(num_beams=4, num_beam_groups=2, diversity_penalty=0.5, early_stopping="never", max_new_tokens=12)),
    (1, dict(num_beams=6, num_beam_groups=2, diversity_penalty=0.7, min_new_tokens=2)),
]


def assert_group_beams_equal(ours, ref, batch, beams, length_penalty):
    """Sequences exactly and sequence scores within 1e-4; scores within 1e-4 for every row of a
    single prompt, and of the first prompt of a batch: 4.53 continues a finished group of a later
    prompt as copies of the first prompt's beam (its ``next_beam_indices = 0`` indexes the whole
    batch), so the scores of such rows are not that prompt's. Beam indices are checked for what
    they mean (each returned beam's transition scores sum to its sequence score): 4.53 numbers
    them within each group and mixes prompts, which jaxgen does not copy."""
    np.testing.assert_array_equal(ours.sequences, ref["sequences"])
    np.testing.assert_allclose(ours.sequences_scores, ref["sequences_scores"], atol=1e-4, rtol=0)
    scores, expected = np.stack(ours.scores), ref["scores"]
    rows = slice(None) if batch == 1 else slice(0, beams)
    finite = np.isfinite(expected[:, rows])
    assert (np.isfinite(scores[:, rows]) == finite).all()
    np.testing.assert_allclose(scores[:, rows][finite], expected[:, rows][finite], atol=1e-4, rtol=0)
    np.testing.assert_allclose(_normalised_sums(ours, length_penalty), ours.sequences_scores, atol=1e-4)


def test_group_beam_search_equals_transformers_4_53(gpt2, hf453, tmp_path):
    path, model = gpt2
    calls = [dict(dict(max_new_tokens=8, eos_token_id=EOS, pad_token_id=PAD), **kw) for _, kw in GROUPS]
    refs = reference(hf453, path, [dict(call, ids=_prompts(b)[0].tolist(), mask=_prompts(b)[1].tolist())
                                   for (b, _), call in zip(GROUPS, calls)], tmp_path)
    for (batch, _), call, ref in zip(GROUPS, calls, refs):
        ids, mask = _prompts(batch)
        ours = jaxgen.generate(model, ids, mask, output_scores=True, **call).trim()
        assert_group_beams_equal(ours, ref, batch, call["num_beams"], call.get("length_penalty", 1.0))


def test_group_beam_search_on_llama_equals_transformers_4_53(hf453, tmp_path):
    from tests.test_families import VOCAB, build
    build(tmp_path / "model", "llama_gqa2_biases_untied")
    model = jaxgen.from_pretrained(tmp_path / "model")
    ids, mask = left_padded_batch(np.random.default_rng(0), 3, 7, VOCAB, pads=[0, 3, 1], low=3)
    call = dict(max_new_tokens=8, eos_token_id=EOS, pad_token_id=PAD, num_beams=4, num_beam_groups=2,
                diversity_penalty=0.8, num_return_sequences=2)
    ref, = reference(hf453, tmp_path / "model", [dict(call, ids=ids.tolist(), mask=mask.tolist())], tmp_path)
    assert_group_beams_equal(jaxgen.generate(model, ids, mask, output_scores=True, **call).trim(), ref, 3, 4, 1.0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_beams=4, num_beam_groups=3, diversity_penalty=0.5), "num_beam_groups=3 .*divisible"),
    (dict(num_beams=4, diversity_penalty=0.5), "diversity_penalty=0.5 .*num_beam_groups > 1"),
    (dict(num_beams=4, num_beam_groups=2), "diversity_penalty=None .*diversity_penalty > 0.0"),
    (dict(num_beams=4, num_beam_groups=2, diversity_penalty=0.5, do_sample=True), "do_sample=True"),
    (dict(num_beams=4, num_beam_groups=2, diversity_penalty=0.5, stop_sequences=[[5, 6]]), "stop_sequences"),
    (dict(force_words_ids=[[5]], num_beams=1), "force_words_ids triggers constrained beam search.*num_beams > 1"),
    (dict(force_words_ids=[[5]], num_beams=2, do_sample=True), "do_sample=True.*do_sample=False"),
    (dict(force_words_ids=[[5]], num_beams=4, num_beam_groups=2, diversity_penalty=0.5), "num_beam_groups=2"),
    (dict(force_words_ids=[[5]], num_beams=2, stop_sequences=[[7]]), "stop_sequences=.*not with constrained"),
    (dict(force_words_ids=[[[5, 6], [5]]], num_beams=2), r"\[5\] is a prefix of another sequence"),
    (dict(force_words_ids=[[5, 99]], num_beams=2), r"force_words_ids=.*token ids must be in \[0, 48\)"),
    (dict(force_words_ids=[], num_beams=2), "force_words_ids=.*expected a list"),
    (dict(constraints=[], num_beams=2), r"constraints=\[\] .*expected a non-empty list"),
    (dict(constraints=[object()], num_beams=2), "constraints='<object>'.*PhrasalConstraint and DisjunctiveConstraint"),
])
def test_group_and_constrained_beam_search_bad_arguments(gpt2, kwargs, message):
    _, model = gpt2
    ids, mask = _prompts(3)
    with pytest.raises(ValueError, match=message):
        jaxgen.generate(model, ids, mask, max_new_tokens=4, pad_token_id=PAD, **kwargs)


def test_groups_without_beams_warn_and_run_greedy_search(gpt2):
    _, model = gpt2
    ids, mask = _prompts(3)
    kw = dict(max_new_tokens=4, pad_token_id=PAD)
    with pytest.warns(UserWarning) as record:
        out = jaxgen.generate(model, ids, mask, num_beam_groups=2, diversity_penalty=0.5, **kw).trim()
    assert sorted(str(w.message).split(" -- ")[0] for w in record) == [
        "num_beams is set to 1. However, diversity_penalty is set to 0.5",
        "num_beams is set to 1. However, num_beam_groups is set to 2"]
    np.testing.assert_array_equal(out.sequences, jaxgen.generate(model, ids, mask, **kw).trim().sequences)


@pytest.mark.parametrize("strategy", [dict(num_beam_groups=2, diversity_penalty=0.5), dict(force_words_ids=[[5, 6]])],
                         ids=["group", "constrained"])
def test_beam_attentions_and_hidden_states_equal_transformers_4_53(gpt2, hf453, tmp_path, strategy):
    """Group and constrained beam search: every step's attentions and hidden states of all beams,
    in 4.53's row order. One prompt without padding: 4.53's rows of a finished group are another
    prompt's at batch > 1, and its padding positions attend otherwise than 5.x's
    (tests/test_outputs.py checks those)."""
    path, model = gpt2
    ids, mask = (x[:1] for x in _prompts(3))
    call = dict(max_new_tokens=6, eos_token_id=EOS, pad_token_id=PAD, num_beams=4, output_attentions=True,
                output_hidden_states=True, **strategy)
    ref, = reference(hf453, path, [dict(call, ids=ids.tolist(), mask=mask.tolist())], tmp_path)
    ours = jaxgen.generate(model, ids, mask, output_scores=True, **call).trim()
    assert_equal_to(ours, ref)
    np.testing.assert_allclose(ours.sequences_scores, ref["sequences_scores"], atol=1e-4, rtol=0)
    for name in ("attentions", "hidden_states"):
        steps = getattr(ours, name)
        assert len(steps) == len(ours.scores)
        for step, entries in enumerate(steps):
            assert len(entries) == (2 if name == "attentions" else 3)
            for i, x in enumerate(entries):
                expected = ref[f"{name}_{step}_{i}"]
                assert x.shape == expected.shape, (name, step, i, x.shape, expected.shape)
                np.testing.assert_allclose(x, expected, atol=1e-4, rtol=0, err_msg=f"{name}[{step}][{i}]")


def test_contrastive_search_attentions_and_hidden_states_equal_transformers_4_53(gpt2, hf453, tmp_path):
    """Each step's are the chosen candidate's (the prompt's first). One prompt without padding, as
    for group beam search above."""
    path, model = gpt2
    ids, mask = (x[:1] for x in _prompts(3))
    call = dict(max_new_tokens=5, eos_token_id=EOS, pad_token_id=PAD, penalty_alpha=0.6, top_k=3,
                output_attentions=True, output_hidden_states=True)
    ref, = reference(hf453, path, [dict(call, ids=ids.tolist(), mask=mask.tolist())], tmp_path)
    ours = jaxgen.generate(model, ids, mask, output_scores=True, **call).trim()
    assert_equal_to(ours, ref)
    for name in ("attentions", "hidden_states"):
        steps = getattr(ours, name)
        assert len(steps) == len(ours.scores)
        for step, entries in enumerate(steps):
            for i, x in enumerate(entries):
                expected = ref[f"{name}_{step}_{i}"]
                assert x.shape == expected.shape, (name, step, i, x.shape, expected.shape)
                np.testing.assert_allclose(x, expected, atol=1e-4, rtol=0, err_msg=f"{name}[{step}][{i}]")


# (how many first rows of _prompts(3), generate kwargs): one candidate layer, and two (the batch's
# JS divergence picks one a step)
DOLA = [
    (3, dict(dola_layers="low")),
    (3, dict(dola_layers=[0, 1], max_new_tokens=12)),
    # -2: layer 1, counted from the end; a prompt without padding, where 4.53's penalty is 5.x's
    (1, dict(dola_layers=[-2, 0], repetition_penalty=1.2, eos_token_id=None)),
]


@pytest.mark.filterwarnings("ignore:dola_layers is set to trigger DoLa decoding")
def test_dola_decoding_equals_transformers_4_53(gpt2, hf453, tmp_path):
    """DoLa on the EOS model (two layers, tied head: "low" and "high" take layer 1) and on a
    Llama with GQA and an untied head ("low" takes the embeddings): sequences, and scores (the
    processed contrast); the raw logits stay the final layer's."""
    from tests.test_families import VOCAB, build
    path, model = gpt2
    calls = [dict(dict(max_new_tokens=10, eos_token_id=EOS, pad_token_id=PAD), **kw) for _, kw in DOLA]
    prompts = [tuple(x[:b] for x in _prompts(3)) for b, _ in DOLA]
    refs = reference(hf453, path, [dict(call, ids=ids.tolist(), mask=mask.tolist())
                                   for call, (ids, mask) in zip(calls, prompts)], tmp_path)
    for call, (ids, mask), ref in zip(calls, prompts, refs):
        assert_equal_to(jaxgen.generate(model, ids, mask, output_scores=True, **call).trim(), ref)

    build(tmp_path / "llama", "llama_gqa2_biases_untied")
    llama = jaxgen.from_pretrained(tmp_path / "llama")
    ids, mask = left_padded_batch(np.random.default_rng(0), 3, 7, VOCAB, pads=[0, 3, 1], low=3)
    call = dict(max_new_tokens=8, eos_token_id=EOS, pad_token_id=PAD, dola_layers="low")
    ref, = reference(hf453, tmp_path / "llama", [dict(call, ids=ids.tolist(), mask=mask.tolist())], tmp_path)
    ours = jaxgen.generate(llama, ids, mask, output_scores=True, output_logits=True, **call).trim()
    assert_equal_to(ours, ref)
    plain = jaxgen.generate(llama, ids, mask, output_logits=True, max_new_tokens=1, pad_token_id=PAD).trim()
    np.testing.assert_allclose(ours.logits[0], plain.logits[0], atol=1e-5)


def test_dola_candidate_layers_follow_transformers_rule():
    """4.53's `_dola_decoding`: every other layer of a half, from layer 2 with a tied head (the
    embeddings' logits would be the head's own), a span of 20 layers at most past 40 layers."""
    from jaxgen.decoding.dola import candidate_layers
    assert candidate_layers("low", 12, tied=True) == (2, 4)
    assert candidate_layers("low", 12, tied=False) == (0, 2, 4)
    assert candidate_layers("high", 12, tied=True) == (6, 8, 10)
    assert candidate_layers("low", 48, tied=False) == tuple(range(0, 20, 2))
    assert candidate_layers("high", 48, tied=False) == tuple(range(28, 48, 2))
    assert candidate_layers("low", 2, tied=True) == (1,) == candidate_layers("high", 2, tied=True)
    assert candidate_layers([3, 12, 14, -1, -13], 12, tied=True) == (3, 12, 0)  # 12 and -1: the final norm's
    with pytest.raises(ValueError, match=r"dola_layers='low' is not allowed: it leaves no layer below"):
        candidate_layers("low", 3, tied=True)
    with pytest.raises(ValueError, match="the model has 13 hidden states"):
        candidate_layers([-14], 12, tied=True)


def test_dola_alongside_other_settings(gpt2):
    """transformers' warnings (a repetition penalty below 1.2; DoLa beside beam search, which runs
    its own mode); the call's own hidden states beside DoLa's layers; sampling with top_k=1 draws
    DoLa greedy's tokens; generate_batch refuses it."""
    _, model = gpt2
    ids, mask = _prompts(3)
    kw = dict(max_new_tokens=6, eos_token_id=EOS, pad_token_id=PAD, dola_layers=[0, 1])
    with pytest.warns(UserWarning, match="recommended value for DoLa decoding is repetition_penalty>=1.2"):
        greedy = jaxgen.generate(model, ids, mask, output_hidden_states=[0, 2], output_scores=True, **kw).trim()
    plain = jaxgen.generate(model, ids, mask, output_hidden_states=True, max_new_tokens=1, pad_token_id=PAD).trim()
    assert [len(step) for step in greedy.hidden_states] == [3] * len(greedy.scores)
    np.testing.assert_allclose(greedy.hidden_states[0][2], plain.hidden_states[0][2], atol=1e-5)
    assert greedy.hidden_states[0][1] is None
    with pytest.warns(UserWarning, match="repetition_penalty"):
        sampled = jaxgen.generate(model, ids, mask, do_sample=True, top_k=1, key=jax.random.key(0), **kw).trim()
    np.testing.assert_array_equal(sampled.sequences, greedy.sequences)
    beams = dict(kw, num_beams=2, repetition_penalty=1.2)
    with pytest.warns(UserWarning, match=r"dola_layers=\[0, 1\] triggers DoLa decoding.*mode is beam search, so it"):
        out = jaxgen.generate(model, ids, mask, **beams).trim()
    beams.pop("dola_layers")
    np.testing.assert_array_equal(out.sequences, jaxgen.generate(model, ids, mask, **beams).trim().sequences)
    with pytest.raises(ValueError, match="dola_layers=.* is DoLa decoding, which generate_batch does not run"):
        jaxgen.generate_batch(model, [[3, 4, 5]], dola_layers="low", repetition_penalty=1.2, max_new_tokens=2,
                              progress=False)


# Constrained beam search: (batch, generate kwargs); phrases and disjunctions (one branching, where
# 4.53's copies of a state share its list of tokens read), EOS ids, length penalties, early
# stopping, a constraint the prompt already holds, and one no beam can meet in time.
CONSTRAINED = [
    (3, dict(num_beams=3, force_words_ids=[[5, 6]])),
    (3, dict(num_beams=4, force_words_ids=[[[7, 8], [9], [7, 10, 11]], [12]], num_return_sequences=2,
             length_penalty=0.5, max_new_tokens=10)),
    (3, dict(num_beams=3, force_words_ids=[[20, 21, 22], [[30], [31, 32]]], early_stopping=True, max_new_tokens=6)),
    (3, dict(num_beams=2, force_words_ids=[[[3, 4], [3, 5], [3, 6, 7]], [13, 14]], eos_token_id=[EOS, 9],
             early_stopping="never", min_new_tokens=3)),
    (1, dict(num_beams=3, force_words_ids=[[40, 41, 42, 43, 44, 45]], max_new_tokens=4)),  # no beam can
    (1, dict(num_beams=2, force_words_ids=[[5]], bad_words_ids=[[5]], max_new_tokens=4)),  # nor without -inf
]


def test_constrained_beam_search_equals_transformers_4_53(gpt2, hf453, tmp_path):
    """Sequences, scores (processed log-probs plus beam scores, as 4.53 returns them) and sequence
    scores; beam indices too (4.53's run over the whole sequence's length, -1 past the generated
    ones), except where the first returned beam did not meet every constraint (fewer than
    num_return_sequences did): 4.53 returns none then. A forced token that another processor
    bans scores -inf, and its hypothesis is kept at -inf, as there."""
    path, model = gpt2
    ids, mask = _prompts(3)
    held = int(ids[2, -1])  # the third prompt's last token: a constraint it holds before generating
    cases = CONSTRAINED + [(3, dict(num_beams=3, force_words_ids=[[held], [17]], num_return_sequences=3))]
    calls = [dict(dict(max_new_tokens=8, eos_token_id=EOS, pad_token_id=PAD), **kw) for _, kw in cases]
    refs = reference(hf453, path, [dict(call, ids=_prompts(b)[0].tolist(), mask=_prompts(b)[1].tolist())
                                   for (b, _), call in zip(cases, calls)], tmp_path)
    for (batch, _), call, ref in zip(cases, calls, refs):
        ids, mask = _prompts(batch)
        ours = jaxgen.generate(model, ids, mask, output_scores=True, **call).trim()
        assert_equal_to(ours, ref)
        np.testing.assert_allclose(ours.sequences_scores, ref["sequences_scores"], atol=1e-4, rtol=0)
        generated = ours.beam_indices.shape[1]
        if "beam_indices" in ref:
            np.testing.assert_array_equal(ours.beam_indices, ref["beam_indices"][:, :generated])
            assert (ref["beam_indices"][:, generated:] == -1).all()
    words = [set(np.asarray(ref["sequences"])[:, -8:].ravel().tolist()) for ref in refs[:1]]
    assert {5, 6} <= words[0]  # the phrase is there


def test_constraint_states_equal_transformers_4_53(hf453):
    """`jaxgen.decoding.constraints` against 4.53's ``ConstraintListState`` on random phrases and
    disjunctions over six tokens, after random sequences: bank, completion, the tokens
    ``advance()`` lists and the bank of each extended copy (4.53's shared lists included)."""
    from jaxgen.decoding import constraints

    rng = np.random.default_rng(0)
    cases = []
    while len(cases) < 120:
        made = []
        for _ in range(int(rng.integers(1, 4))):
            if rng.random() < 0.5:
                made.append(["phrase", rng.integers(0, 6, rng.integers(1, 4)).tolist()])
            else:
                alts = [rng.integers(0, 6, rng.integers(1, 4)).tolist() for _ in range(int(rng.integers(2, 4)))]
                if all(a[:len(b)] != b for i, a in enumerate(alts) for j, b in enumerate(alts) if i != j):
                    made.append(["disjunction", alts])
        if made:
            cases.append({"constraints": made, "sequence": rng.integers(0, 6, rng.integers(0, 11)).tolist()})
    proc = subprocess.run([hf453, str(HERE / "hf453_constraints.py")], input=json.dumps(cases), text=True,
                          capture_output=True, check=True)
    expected = json.loads(proc.stdout)

    @jax.jit
    def after(t, sequence, length):
        s = jax.lax.fori_loop(0, length, lambda i, s: constraints.add(t, s, sequence[i]),
                              constraints.start(t, ()))
        return constraints.bank(t, s), constraints.completed(s), *constraints.advances(t, s)

    for case, want in zip(cases, expected):
        t = constraints.tables(tuple((tuple(ids),) if kind == "phrase" else tuple(map(tuple, ids))
                                     for kind, ids in case["constraints"]))
        t = _padded(t, nodes=32, children=6)  # one compiled program per number of constraints
        seq = case["sequence"]
        bank, completed, tokens, listed, banks = after(t, np.pad(seq, (0, 10 - len(seq))), len(seq))
        got = {"bank": int(bank), "completed": bool(completed),
               "tokens": [] if completed else np.asarray(tokens)[np.asarray(listed)].tolist(),
               "banks": [] if completed else np.asarray(banks)[np.asarray(listed)].tolist()}
        assert got == want, case


def _padded(t, nodes: int, children: int):
    """`constraints.Tables` with room for ``nodes`` nodes of ``children`` children (pads no
    node points to), and its max_seqlen traced, so that one program serves many."""
    n, k = t.child_token.shape
    pad = ((0, nodes - n), (0, children - k))
    return t._replace(child_token=jnp.pad(t.child_token, pad, constant_values=-1),
                      child_node=jnp.pad(t.child_node, pad), leaf=jnp.pad(t.leaf, (0, nodes - n), constant_values=True),
                      depth=jnp.pad(t.depth, (0, nodes - n)), max_seqlen=jnp.int32(t.max_seqlen))


def test_constraint_objects_and_generate_batch(gpt2):
    """transformers 4.x's constraint objects (or the hub repository's, of the same names) run as
    the force_words_ids they hold; generate_batch refuses constrained beam search."""
    _, model = gpt2
    ids, mask = _prompts(3)

    class PhrasalConstraint:  # noqa: D401 - the name and token_ids are what jaxgen reads
        token_ids = [5, 6]

    class DisjunctiveConstraint:
        token_ids = [[7, 8], [9]]

    kw = dict(num_beams=3, max_new_tokens=8, eos_token_id=EOS, pad_token_id=PAD)
    objects = jaxgen.generate(model, ids, mask, constraints=[PhrasalConstraint(), DisjunctiveConstraint()], **kw)
    words = jaxgen.generate(model, ids, mask, force_words_ids=[[5, 6], [[7, 8], [9]]], **kw)
    np.testing.assert_array_equal(objects.trim().sequences, words.trim().sequences)
    with pytest.raises(ValueError, match=r"force_words_ids=\[\[5\]\] is constrained beam search, which generate_batch"):
        jaxgen.generate_batch(model, [[3, 4, 5]], force_words_ids=[[5]], num_beams=2, max_new_tokens=2,
                              progress=False)
