"""Assisted decoding with a draft model (``assistant_model``): greedy search's tokens, scores and
logits on left-padded batches of 1 and 4, with a draft that always agrees (the model itself), one
that rarely does (another random model) and one of another family, EOS and max_new_tokens inside
a draft; transformers' own assisted generate at batch 1; bad input."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

import jaxgen
from tests.conftest import EOS, EOS_MODEL, PAD, build_checkpoint, hf_generate, left_padded_batch
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


@pytest.mark.parametrize("name, k, batch", [("itself", 4, 4), ("gpt2", 3, 4), ("llama", 5, 4)])  # batch 1: below
def test_equals_greedy(eos_model, drafts, name, k, batch):
    """12 new tokens (rows end on EOS inside drafts), then 10 without EOS (max_new_tokens is
    reached inside a draft)."""
    _, model = eos_model
    ids, mask = left_padded_batch(np.random.default_rng(batch), 4, 6, EOS_MODEL["vocab_size"], [0, 2, 5, 1])
    ids, mask = ids[:batch], mask[:batch]
    kw = dict(eos_token_id=EOS, pad_token_id=PAD, assistant_model=drafts[name][1], num_assistant_tokens=k)
    out = assert_greedy(model, ids, mask, max_new_tokens=12, **kw).trim()
    if batch > 1:  # a row ends on EOS while others continue
        assert np.isin(out.sequences[:, ids.shape[1]:-1], EOS).any()
    assert_greedy(model, ids, mask, max_new_tokens=10, min_new_tokens=10, **kw)


@pytest.mark.parametrize("batch", [1, 4])
def test_early_exit_equals_greedy_and_transformers(drafts, batch):
    """``assistant_early_exit``: the Llama's first layer and its head draft."""
    torch_model, model = drafts["llama"]
    ids, mask = left_padded_batch(np.random.default_rng(3), 4, 6, EOS_MODEL["vocab_size"], [0, 2, 5, 1])
    ids, mask = ids[:batch], mask[:batch]
    kw = dict(max_new_tokens=10, eos_token_id=EOS, pad_token_id=PAD)
    out = assert_greedy(model, ids, mask, assistant_early_exit=1, num_assistant_tokens=3, **kw)
    assert int(np.asarray(out.num_drafted).sum()) > 0
    if batch == 1:
        with torch.no_grad():
            ref = torch_model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), assistant_early_exit=1,
                                       do_sample=False, **kw)
        np.testing.assert_array_equal(out.trim().sequences, ref.numpy())


def test_schedules_and_confidence_change_the_drafting_not_the_output(eos_model, drafts):
    """With a draft that rarely agrees, the heuristic schedule drafts fewer tokens than the
    constant one; a confidence threshold of 1 stops every draft after one token, which is drafting
    one token a time; greedy search's output throughout (`assert_greedy`)."""
    _, model = eos_model
    ids, mask = left_padded_batch(np.random.default_rng(5), 4, 6, EOS_MODEL["vocab_size"], [0, 2, 5, 1])
    kw = dict(max_new_tokens=16, eos_token_id=None, pad_token_id=PAD, assistant_model=drafts["gpt2"][1])

    def run(**extra):
        out = assert_greedy(model, ids, mask, **kw, **extra)
        return np.asarray(out.num_drafted), np.asarray(out.num_accepted)

    constant = run(num_assistant_tokens=6, assistant_confidence_threshold=0)
    heuristic = run(num_assistant_tokens=6, assistant_confidence_threshold=0,
                    num_assistant_tokens_schedule="heuristic_transient")
    assert (constant[1] < constant[0] / 2).all(), "the draft was meant to disagree"
    assert (heuristic[0] < constant[0]).all()
    ones = run(num_assistant_tokens=1, assistant_confidence_threshold=0)
    np.testing.assert_array_equal(run(num_assistant_tokens=6, assistant_confidence_threshold=1.0), ones)
    assert (run(num_assistant_tokens=6, assistant_confidence_threshold=0.4)[0] < constant[0]).all()


def test_one_compile_per_batch_bucket_and_draft_length(eos_model, drafts):
    """Another prompt of the bucket, another key, another confidence threshold: the same program;
    another draft length: one more."""
    from jaxgen.decoding import api
    _, model = eos_model
    kw = dict(max_new_tokens=6, pad_token_id=PAD, do_sample=True, assistant_model=drafts["gpt2"][1],
              num_assistant_tokens=3)
    jaxgen.generate(model, np.array([[3, 4, 5]]), key=jax.random.key(0), **kw)
    before = api._decode._cache_size()
    jaxgen.generate(model, np.array([[7, 8, 9, 10]]), key=jax.random.key(1), assistant_confidence_threshold=0.9, **kw)
    assert api._decode._cache_size() == before
    jaxgen.generate(model, np.array([[7, 8, 9, 10]]), key=jax.random.key(1), **dict(kw, num_assistant_tokens=4))
    assert api._decode._cache_size() == before + 1


def test_streamer_receives_greedy_search_s_steps(eos_model, drafts):
    """The steps every row has finished, one put each, as greedy search streams them."""
    from tests.test_decoding import Collector
    _, model = eos_model
    ids, mask = left_padded_batch(np.random.default_rng(6), 3, 5, EOS_MODEL["vocab_size"], [0, 2, 1])
    kw = dict(max_new_tokens=14, eos_token_id=EOS, pad_token_id=PAD)
    plain, assisted = Collector(), Collector()
    jaxgen.generate(model, ids, mask, streamer=plain, **kw)
    out = jaxgen.generate(model, ids, mask, streamer=assisted, assistant_model=drafts["gpt2"][1],
                          num_assistant_tokens=3, **kw).trim()
    assert assisted.ended and len(assisted.puts) == out.sequences.shape[1] - 5 + 1
    for a, b in zip(assisted.puts, plain.puts, strict=True):
        np.testing.assert_array_equal(a, b)


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


@pytest.mark.parametrize("drafter", [dict(assistant_model="itself", num_assistant_tokens=4),
                                     dict(prompt_lookup_num_tokens=3)], ids=["draft model", "prompt lookup"])
def test_attentions_and_hidden_states_equal_greedy_s(eos_model, drafts, drafter):
    """Each kept step's attentions and hidden states are greedy search's, also for a row that has
    finished (it feeds pads, as in greedy search)."""
    _, model = eos_model
    drafter = {k: drafts[v][1] if v == "itself" else v for k, v in drafter.items()}
    ids, mask = left_padded_batch(np.random.default_rng(3), 3, 6, EOS_MODEL["vocab_size"], [0, 2, 5])
    kw = dict(max_new_tokens=12, eos_token_id=EOS, pad_token_id=PAD, output_attentions=True, output_hidden_states=True)
    raw, plain = jaxgen.generate(model, ids, mask, **kw, **drafter), jaxgen.generate(model, ids, mask, **kw)
    assert np.asarray(raw.num_accepted).sum() > 0
    assert int(raw.num_steps) == int(plain.num_steps)
    finished = np.isin(np.asarray(plain.trim().sequences)[:, 6:-1], EOS).any(1)
    assert finished.any() and not finished.all()
    steps = int(plain.num_steps)
    for name in ("prompt_attentions", "attentions", "prompt_hidden", "hidden"):  # the static buffers, as trimmed
        ours, theirs = getattr(raw.layers, name), getattr(plain.layers, name)
        if not name.startswith("prompt"):
            ours, theirs = ours[:steps - 1], theirs[:steps - 1]
        np.testing.assert_allclose(ours, theirs, atol=1e-5, err_msg=name)
    ours, theirs = raw.trim(), plain.trim()
    for a, b in [(ours.attentions, theirs.attentions), (ours.hidden_states, theirs.hidden_states)]:
        assert [[x.shape for x in step] for step in a] == [[x.shape for x in step] for step in b]


def test_attentions_and_hidden_states_equal_transformers_at_batch_1(eos_model, drafts):
    """As transformers' assisted generate with a draft whose first iteration keeps no token, and as
    its greedy search with drafts kept from the first iteration on (there transformers 5.x returns
    its prompt's first positions for the drafts its first forward keeps: docs/semantics.md)."""
    from tests.test_outputs import assert_same_layers, eager
    torch_model, model = eos_model
    ids, mask = left_padded_batch(np.random.default_rng(7), 1, 6, EOS_MODEL["vocab_size"], [0])
    kw = dict(max_new_tokens=12, min_new_tokens=12, eos_token_id=EOS, pad_token_id=PAD, output_attentions=True,
              output_hidden_states=True)
    reference = eager(torch_model)
    for draft, torch_draft in [(drafts["gpt2"][1], eager(drafts["gpt2"][0])), (model, None)]:
        ours = jaxgen.generate(model, ids, mask, assistant_model=draft, num_assistant_tokens=4, **kw)
        assert (int(ours.num_accepted[0]) > 0) == (torch_draft is None)
        drafting = {} if torch_draft is None else dict(assistant_model=torch_draft, num_assistant_tokens=4)
        ref = hf_generate(reference, ids, mask, do_sample=False, **drafting, **kw)
        np.testing.assert_array_equal(ours.trim().sequences, ref.sequences.numpy())
        assert_same_layers(ours.trim(), ref)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_assistant_tokens=0), "num_assistant_tokens=0 is not allowed"),
    (dict(do_sample=True, num_return_sequences=2, key=jax.random.key(0)),
     "num_return_sequences=2 is not allowed: not with an assistant_model: it has to be 1"),
    (dict(use_cache=False), "use_cache=False is not allowed: not with an assistant_model"),
    (dict(assistant_model="gpt2"), "assistant_model='<str>' is not allowed: expected a jaxgen CausalLM"),
    (dict(assistant_model=None, assistant_early_exit=0), "assistant_early_exit=0 is not allowed"),
    (dict(do_sample=True, key=jax.random.key(0), assistant_ensemble_weight=0.5),
     "assistant_ensemble_weight=0.5, which jaxgen does not support"),
])
def test_bad_input(eos_model, drafts, kwargs, message):
    _, model = eos_model
    kwargs = {"assistant_model": drafts["gpt2"][1], **kwargs}
    with pytest.raises(ValueError, match=message):
        jaxgen.generate(model, np.array([[3, 4, 5]]), max_new_tokens=4, pad_token_id=PAD, **kwargs)


@pytest.mark.parametrize("kwargs, mode", [(dict(num_beams=2), "beam search"),
                                          (dict(penalty_alpha=0.6, top_k=3), "contrastive search")])
def test_beside_another_mode_warns_and_is_ignored(eos_model, drafts, kwargs, mode):
    """transformers logs that assisted generation runs with greedy search and sampling only, and
    runs the call's own mode."""
    _, model = eos_model
    ids, kw = np.array([[3, 4, 5]]), dict(max_new_tokens=4, pad_token_id=PAD, **kwargs)
    with pytest.warns(UserWarning, match=f"an assistant_model triggers .*decoding mode is {mode}, so it is ignored"):
        out = jaxgen.generate(model, ids, assistant_model=drafts["gpt2"][1], **kw).trim()
    np.testing.assert_array_equal(out.sequences, jaxgen.generate(model, ids, **kw).trim().sequences)


def test_drafters_take_transformers_order(eos_model, drafts):
    """The model's own layers, then prompt lookup, then the assistant model: the others warn."""
    _, model = eos_model
    ids = np.array([[3, 4, 5, 3, 4]])
    kw = dict(max_new_tokens=8, pad_token_id=PAD, eos_token_id=None)
    with pytest.warns(UserWarning, match=r"prompt_lookup_num_tokens=3 drafts .*assistant_model=<model> is not used"):
        out = jaxgen.generate(model, ids, assistant_model=drafts["gpt2"][1], prompt_lookup_num_tokens=3, **kw)
    lookup = jaxgen.generate(model, ids, prompt_lookup_num_tokens=3, **kw)
    np.testing.assert_array_equal(out.num_drafted, lookup.num_drafted)
    with pytest.warns(UserWarning, match=r"assistant_early_exit=1 drafts .*prompt_lookup_num_tokens=3 is not used"):
        out = jaxgen.generate(model, ids, assistant_early_exit=1, prompt_lookup_num_tokens=3, **kw)
    own = jaxgen.generate(model, ids, assistant_early_exit=1, **kw)
    np.testing.assert_array_equal(out.num_drafted, own.num_drafted)
    np.testing.assert_array_equal(out.sequences, jaxgen.generate(model, ids, **kw).sequences)


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

    from jaxgen.decoding import args, engine, lookup, select
    _, model = eos_model

    def choose(logits, sequences, i):
        return select.first_argmax(logits), logits

    ids, mask = left_padded_batch(np.random.default_rng(2), 2, 6, EOS_MODEL["vocab_size"], [0, 3])
    kw = dict(max_new_tokens=18, eos_token_id=None, pad_token_id=PAD, prompt_bucket=None)  # no processor
    greedy = jaxgen.generate(model, ids, mask, **kw).trim()
    spec = args.parse(model, ids, mask, dict(kw, assistant_model=model, num_assistant_tokens=4,
                                                 assistant_confidence_threshold=0)).spec
    pre = engine.prefill(model, jnp.asarray(ids), jnp.asarray(mask), jnp.int32(6), spec, 1, rings=False)
    cache, k, assistant = pre.cache.grow(6 + 18 + 5), 4, lookup.Assistant(model, jnp.float32(0.4))
    kv_mask = jnp.concatenate([pre.kv_mask, jnp.ones((2, 5), bool)], axis=1)
    sequences = jnp.pad(jnp.asarray(greedy.sequences, jnp.int32), ((0, 0), (0, 5)))
    # after each, the cache holds drafts up to column generated + k - 2: 8 -> 13 is a whole draft
    # accepted with greedy's next token, leaving two columns unseen
    draft = jax.jit(lambda cache, last, position: lookup.model_draft(
        assistant, cache, sequences, last, position, kv_mask, jnp.full((2,), k), choose, spec))
    for generated in (1, 3, 4, 8, 13):
        last = jnp.full((2,), 6 + generated - 1, jnp.int32)
        tokens, count, _, cache = draft(cache, last, pre.positions + generated - 1)
        np.testing.assert_array_equal(np.asarray(tokens), greedy.sequences[:, 6 + generated:6 + generated + k])
        np.testing.assert_array_equal(count, [k, k])
