"""Assisted decoding with a draft model (``assistant_model``): greedy search's tokens, scores and
logits on left-padded batches of 1 and 4, with a draft that always agrees (the model itself), one
that rarely does (another random model) and one of another family, EOS and max_new_tokens inside
a draft; transformers' own assisted generate at batch 1; bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import jaxgen
from tests.conftest import EOS, EOS_MODEL, PAD, build_checkpoint, left_padded_batch
from tests.test_lookup import assert_greedy


@pytest.fixture(scope="module")
def drafts(tmp_path_factory, eos_model):
    """name -> (torch model, jaxgen model) of drafts sharing the EOS model's 48-token vocabulary."""
    from tests.test_families import build
    path = tmp_path_factory.mktemp("drafts")
    other = build_checkpoint(path / "gpt2", seed=1, **dict(EOS_MODEL, n_layer=1))
    llama = build(path / "llama", "llama_gqa2_biases_untied", vocab_size=EOS_MODEL["vocab_size"])
    return {"itself": eos_model, "gpt2": (other, jaxgen.from_pretrained(path / "gpt2")),
            "llama": (llama, jaxgen.from_pretrained(path / "llama"))}


@pytest.mark.parametrize("name, k", [("itself", 4), ("gpt2", 3), ("llama", 5)])
@pytest.mark.parametrize("batch", [1, 4])
def test_equals_greedy(eos_model, drafts, name, k, batch):
    """12 new tokens (rows end on EOS inside drafts), then 10 without EOS (max_new_tokens is
    reached inside a draft)."""
    _, model = eos_model
    ids, mask = left_padded_batch(np.random.default_rng(batch), 4, 6, EOS_MODEL["vocab_size"], [0, 2, 5, 1])
    ids, mask = ids[:batch], mask[:batch]
    kw = dict(eos_token_id=EOS, pad_token_id=PAD, assistant_model=drafts[name][1], num_assistant_tokens=k)
    out = assert_greedy(model, ids, mask, max_new_tokens=12, **kw)
    if batch > 1:  # a row ends on EOS while others continue
        assert np.isin(out.sequences[:, ids.shape[1]:-1], EOS).any()
    assert_greedy(model, ids, mask, max_new_tokens=10, min_new_tokens=10, **kw)


def test_equals_transformers_assisted_generate_at_batch_1(eos_model, drafts):
    torch_model, model = eos_model
    torch_draft, draft = drafts["gpt2"]
    ids, mask = left_padded_batch(np.random.default_rng(7), 1, 6, EOS_MODEL["vocab_size"], [0])
    kw = dict(max_new_tokens=12, min_new_tokens=12, eos_token_id=EOS, pad_token_id=PAD)
    with torch.no_grad():
        ref = torch_model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), assistant_model=torch_draft,
                                   num_assistant_tokens=4, do_sample=False, **kw)
    ours = jaxgen.generate(model, ids, mask, assistant_model=draft, num_assistant_tokens=4, **kw).trim()
    np.testing.assert_array_equal(ours.sequences, ref.numpy())


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_beams=2), "num_beams=2 is not allowed: assisted decoding"),
    (dict(num_assistant_tokens=0), "num_assistant_tokens=0 is not allowed"),
    (dict(num_assistant_tokens_schedule="heuristic"), "num_assistant_tokens_schedule='heuristic'"),
    (dict(do_sample=True), "do_sample=True is not allowed: not with an assistant_model"),
    (dict(prompt_lookup_num_tokens=3), "prompt_lookup_num_tokens=3 is not allowed: not with an assistant_model"),
    (dict(assistant_model="gpt2"), "assistant_model='<str>' is not allowed: expected a jaxgen CausalLM"),
])
def test_bad_input(eos_model, drafts, kwargs, message):
    _, model = eos_model
    kwargs = {"assistant_model": drafts["gpt2"][1], **kwargs}
    with pytest.raises(ValueError, match=message):
        jaxgen.generate(model, np.array([[3, 4, 5]]), max_new_tokens=4, pad_token_id=PAD, **kwargs)


def test_another_vocabulary_is_refused(eos_model, tmp_path):
    _, model = eos_model
    build_checkpoint(tmp_path, seed=0, **dict(EOS_MODEL, vocab_size=64))
    draft = jaxgen.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"vocab_size 64.* share the model's vocabulary \(vocab_size 48"):
        jaxgen.generate(model, np.array([[3, 4, 5]]), max_new_tokens=4, pad_token_id=PAD, assistant_model=draft)


def test_the_model_as_its_own_draft_drafts_greedy_search_s_tokens(eos_model):
    """`lookup.model_draft` with the model itself as the draft: from any column of greedy search's
    output (the cache holding a stale draft after it, as after a partly accepted iteration), its
    k tokens are the next k of greedy search: every draft would be accepted. (No processor: the
    draft takes its raw argmax.)"""
    import jax.numpy as jnp

    from jaxgen.decoding import args, engine, lookup
    _, model = eos_model
    ids, mask = left_padded_batch(np.random.default_rng(2), 2, 6, EOS_MODEL["vocab_size"], [0, 3])
    kw = dict(max_new_tokens=18, eos_token_id=None, pad_token_id=PAD, prompt_bucket=None)  # no processor
    greedy = jaxgen.generate(model, ids, mask, **kw).trim()
    spec = args.parse(model, ids, mask, kw).spec
    pre = engine.prefill(model, jnp.asarray(ids), jnp.asarray(mask), jnp.int32(6), spec, 1, rings=False)
    cache, k = pre.cache.grow(6 + 18 + 5), 4
    kv_mask = jnp.concatenate([pre.kv_mask, jnp.ones((2, 5), bool)], axis=1)
    sequences = jnp.pad(jnp.asarray(greedy.sequences, jnp.int32), ((0, 0), (0, 5)))
    # after each, the cache holds drafts up to column generated + k - 2: 8 -> 13 is a whole draft
    # accepted with greedy's next token, leaving two columns unseen
    for generated in (1, 3, 4, 8, 13):
        last = jnp.full((2,), 6 + generated - 1, jnp.int32)
        tokens, cache = lookup.model_draft(model, cache, sequences, last, pre.positions + generated - 1, kv_mask, k,
                                           spec)
        np.testing.assert_array_equal(np.asarray(tokens), greedy.sequences[:, 6 + generated:6 + generated + k])
