"""``output_attentions`` and ``output_hidden_states``: every step's attentions and hidden states
equal transformers' (eager attention, the only one that returns weights) in values, shapes and
nesting, for greedy search, sampling, beam search and beam sampling on left-padded prompts whose
rows finish at different steps, for GPT-2 and two other families; and nothing is allocated when
they are not asked for."""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxgen
from jaxgen.decoding import beam
from tests.conftest import EOS, EOS_MODEL, PAD, assert_same_generation, hf_generate, left_padded_batch
from tests.test_decoding import compiled_hlo
from tests.test_sampling import hf_drawing, hf_following

KW = dict(eos_token_id=EOS, pad_token_id=PAD, output_attentions=True, output_hidden_states=True)


def eager(torch_model):
    """A copy of ``torch_model`` running eager attention (transformers' SDPA returns no weights)."""
    model = copy.deepcopy(torch_model)
    model.set_attn_implementation("eager")
    return model


def assert_same_layers(ours, ref, atol=1e-4):
    """Attentions and hidden states: the same nesting (steps, then layers), shapes, None
    entries, and values within ``atol``."""
    for name in ("attentions", "hidden_states"):
        a, b = getattr(ours, name), getattr(ref, name)
        assert (a is None) == (b is None), name
        if a is None:
            continue
        assert len(a) == len(b), (name, len(a), len(b))
        for step, (x, y) in enumerate(zip(a, b)):
            assert len(x) == len(y), (name, step, len(x), len(y))
            for layer, (u, v) in enumerate(zip(x, y)):
                assert (u is None) == (v is None), (name, step, layer)
                if u is not None:
                    assert u.shape == tuple(v.shape), (name, step, layer, u.shape, tuple(v.shape))
                    np.testing.assert_allclose(u, v.numpy(), atol=atol, rtol=0, err_msg=f"{name}[{step}][{layer}]")


@pytest.fixture(scope="module")
def batch():
    """Three prompts of 6 tokens with 0, 2 and 5 left pads (the last row's prefill has padding
    rows that may read no key at all)."""
    return left_padded_batch(np.random.default_rng(3), 3, 6, EOS_MODEL["vocab_size"], [0, 2, 5])


@pytest.mark.parametrize("kw", [dict(), dict(num_beams=3, num_return_sequences=2, length_penalty=0.6)],
                         ids=["greedy", "beams"])
def test_greedy_and_beam_search_equal_transformers(eos_model, batch, kw):
    torch_model, model = eos_model
    ids, mask = batch
    kw = dict(KW, max_new_tokens=9, **kw)
    ref = hf_generate(eager(torch_model), ids, mask, do_sample=False, **kw)
    ours = jaxgen.generate(model, ids, mask, output_scores=True, **kw).trim()
    assert_same_generation(ours, ref, beams="num_beams" in kw)
    assert_same_layers(ours, ref)
    finished = np.isin(ours.sequences[:, ids.shape[1]:-1], EOS).any(1)
    assert finished.any() and not finished.all()  # rows end at different steps


def test_sampling_equals_transformers_on_the_drawn_tokens(eos_model, batch, monkeypatch):
    torch_model, model = eos_model
    ids, mask = batch
    kw = dict(KW, max_new_tokens=8, num_return_sequences=2, top_k=10, temperature=0.8)
    ours = jaxgen.sample(model, ids, mask, key=jax.random.key(5), output_scores=True, **kw).trim()
    ref = hf_following(eager(torch_model), ids, mask, ours, monkeypatch, **kw)
    assert_same_generation(ours, ref)
    assert_same_layers(ours, ref)


def test_beam_sampling_equals_transformers_on_the_drawn_candidates(eos_model, batch, monkeypatch):
    """As tests/test_sampling.py's beam sampling test: transformers made to draw jaxgen's candidates."""
    torch_model, model = eos_model
    ids, mask = batch
    kw = dict(KW, num_beams=3, max_new_tokens=6, top_k=20)
    key = jax.random.key(7)
    ours = jaxgen.sample(model, ids, mask, key=key, output_scores=True, **kw).trim()

    def draw(probs, num_samples, step):
        return torch.tensor(np.asarray(beam._top_candidates(jnp.log(jnp.asarray(probs.numpy())), num_samples, key,
                                                            step, True, kw["num_beams"])[1]), dtype=torch.long)

    ref, _ = hf_drawing(eager(torch_model), ids, mask, draw, monkeypatch, **kw)
    assert_same_generation(ours, ref, beams=True)
    assert_same_layers(ours, ref)


def test_across_loop_phases(eos_model, batch):
    """A decode long enough to run its loop in phases (`engine.loop_phases`), whose cache grows
    between them: every step's attentions still cover all the slots so far."""
    torch_model, model = eos_model
    ids, mask = batch
    kw = dict(KW, max_new_tokens=34, min_new_tokens=34, num_beams=2)
    from jaxgen.decoding import args
    assert args.parse(model, ids, mask, kw).spec.phases > 1
    ref = hf_generate(eager(torch_model), ids, mask, do_sample=False, **kw)
    ours = jaxgen.generate(model, ids, mask, output_scores=True, **kw).trim()
    assert_same_generation(ours, ref, beams=True)
    assert_same_layers(ours, ref)


@pytest.mark.parametrize("selection", [[0, -1], 1, [-2, 7], 5])
def test_chosen_hidden_states(eos_model, batch, selection):
    """``output_hidden_states`` as indices (transformers 5): the others are None; an index out of
    range selects nothing."""
    torch_model, model = eos_model
    ids, mask = batch
    kw = dict(KW, max_new_tokens=4, output_attentions=False, output_hidden_states=selection)
    ref = hf_generate(eager(torch_model), ids, mask, do_sample=False, **kw)
    ours = jaxgen.generate(model, ids, mask, output_scores=True, **kw).trim()
    assert ours.attentions is None
    assert_same_layers(ours, ref)


@pytest.mark.parametrize("name, beams", [("llama_gqa2_biases_untied", 3), ("gemma3_local_global_window5", 1)])
def test_families_equal_transformers(tmp_path, name, beams):
    """Grouped-query heads (4 query heads over 2 kv heads), and sliding layers beside global ones,
    whose keys transformers' sliding cache layers crop to the window once the sequence passes it."""
    from tests.test_families import _batch, build
    torch_model = build(tmp_path, name)
    model = jaxgen.from_pretrained(tmp_path)
    ids, mask = _batch()
    kw = dict(KW, max_new_tokens=8, num_beams=beams)
    ref = hf_generate(eager(torch_model), ids, mask, do_sample=False, **kw)
    ours = jaxgen.generate(model, ids, mask, output_scores=True, **kw).trim()
    assert_same_generation(ours, ref, beams=beams > 1)
    assert_same_layers(ours, ref)
    if name.startswith("gemma3"):
        assert ours.attentions[-1][0].shape[-1] == 5 and ours.attentions[-1][1].shape[-1] == 7 + 7


def test_nothing_is_kept_unless_asked(eos_model, batch):
    """The compiled program holds no attention or hidden-state buffer when they are not asked
    for."""
    _, model = eos_model
    ids, mask = batch
    steps = "f32[7,2,3,4,40]"  # [N - 1, layers, rows, heads, P + N]
    states = "f32[7,3,3,32]"  # [N - 1, layers + 1, rows, d]
    prompt = "f32[2,3,4,32,32]"  # [layers, rows, heads, P, P]
    asked = compiled_hlo(model, ids, mask, output_attentions=True, output_hidden_states=True)
    assert steps in asked and states in asked and prompt in asked
    plain = compiled_hlo(model, ids, mask)
    assert steps not in plain and states not in plain and prompt not in plain


def test_return_dict_false_returns_the_sequences(eos_model, batch):
    _, model = eos_model
    ids, mask = batch
    out = jaxgen.generate(model, ids, mask, max_new_tokens=4, return_dict_in_generate=False, **KW)
    assert isinstance(out, np.ndarray) and out.shape[0] == 3


@pytest.mark.parametrize("kwargs, message", [
    (dict(output_hidden_states="all"), "output_hidden_states='all'"),
    (dict(output_hidden_states=[0.5]), "output_hidden_states"),
    (dict(output_attentions=1), "output_attentions=1"),
])
def test_bad_arguments(eos_model, batch, kwargs, message):
    _, model = eos_model
    ids, mask = batch
    with pytest.raises(ValueError, match=message):
        jaxgen.generate(model, ids, mask, max_new_tokens=4, eos_token_id=EOS, pad_token_id=PAD, **kwargs)



def test_one_new_token_with_layer_outputs_and_the_model_output_interface(eos_model, batch):
    """max_new_tokens=1 returns the prefill's attentions and hidden states alone (no later step to
    record); the trimmed output reads as transformers' ModelOutput (a mapping of its set fields)."""
    torch_model, model = eos_model
    ids, mask = batch
    torch_eager = eager(torch_model)
    for strategy in (dict(), dict(num_beams=2)):
        kw = dict(KW, max_new_tokens=1, **strategy)
        ref = hf_generate(torch_eager, ids, mask, do_sample=False, **kw)
        ours = jaxgen.generate(model, ids, mask, output_scores=True, **kw).trim()
        assert_same_generation(ours, ref, beams=bool(strategy))
        assert_same_layers(ours, ref)
    assert ours.sequences.dtype == np.int64 and ref.sequences.dtype == torch.int64
    assert ours.keys() == [k for k in ref.keys() if k != "cache"]
    assert ours["sequences_scores"] is ours.sequences_scores and ours[0] is ours.sequences and "logits" not in ours
    assert ours.to_tuple()[2] is ours.scores and len(ours) == len(ours.keys()) == len(list(ours))
    with pytest.raises(KeyError):
        ours["logits"]
