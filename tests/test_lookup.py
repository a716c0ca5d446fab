"""Prompt lookup decoding (``prompt_lookup_num_tokens``): greedy search's tokens, its scores
and logits, on left-padded batches, with drafts that agree and drafts that do not, EOS and
max_new_tokens inside a draft, processors that read the history, two more families; the draft
rule itself; transformers' own prompt lookup at batch 1; bad input."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import jaxgen
from jaxgen.cli import DEMO_MODEL
from jaxgen.decoding.lookup import draft
from tests.conftest import EOS, PAD, dynamic_rope_checkpoint, hf_generate, left_padded_batch


DRAFTING = ("prompt_lookup_num_tokens", "max_matching_ngram_size", "assistant_model", "num_assistant_tokens",
            "num_assistant_tokens_schedule", "assistant_confidence_threshold", "assistant_early_exit")


def assert_greedy(model, ids, mask, **kw):
    """Assisted decoding (``kw`` names its drafts) returns greedy search's tokens, scores and
    logits. Returns its untrimmed output."""
    kw = dict(output_scores=True, output_logits=True, **kw)
    raw = jaxgen.generate(model, ids, mask, **kw)
    ours = raw.trim()
    plain = jaxgen.generate(model, ids, mask, **{k: v for k, v in kw.items() if k not in DRAFTING}).trim()
    np.testing.assert_array_equal(ours.sequences, plain.sequences)
    assert len(ours.scores) == len(plain.scores)
    for name in ("scores", "logits"):
        for a, b in zip(getattr(ours, name), getattr(plain, name)):
            a, b = np.asarray(a), np.asarray(b)
            assert (np.isneginf(a) == np.isneginf(b)).all()
            np.testing.assert_allclose(a[np.isfinite(b)], b[np.isfinite(b)], atol=1e-4)
    return raw


@pytest.fixture(scope="module")
def demo():
    model = jaxgen.from_pretrained(DEMO_MODEL)
    tokenizer = transformers.AutoTokenizer.from_pretrained(DEMO_MODEL, padding_side="left")
    tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


@pytest.mark.parametrize("k", [1, 4, 10])
@pytest.mark.parametrize("batch", [1, 3])
def test_repetitive_text_where_drafts_agree_equals_greedy(demo, batch, k):
    """The demo model copies its own phrases: most drafts are kept, rows end on EOS at different
    iterations and keep emitting pads (their scores as greedy's)."""
    model, tokenizer = demo
    texts = ["A friend is a friend who is a friend who is", "Love is love and love is", "The best way to be"][:batch]
    enc = tokenizer(texts, return_tensors="np", padding=True)
    out = assert_greedy(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=40, prompt_lookup_num_tokens=k,
                        pad_token_id=tokenizer.pad_token_id).trim()
    row, first = jnp.asarray(out.sequences[0]), jnp.int32(np.argmax(enc["attention_mask"][0]))
    drafts = [draft(row, first, jnp.int32(t), k, 2) for t in range(enc["input_ids"].shape[1], row.shape[0])]
    right = sum(int(count) > 0 and int(tokens[0]) == int(row[t])
                for t, (tokens, count) in zip(range(enc["input_ids"].shape[1], row.shape[0]), drafts))
    assert right >= 10  # of the first row's generated tokens, so many had a right first draft token


@pytest.mark.parametrize("batch, k, new", [(1, 4, 7), (4, 3, 12), (4, 5, 2)])
def test_random_model_where_drafts_rarely_agree_equals_greedy(eos_model, batch, k, new):
    """EOS often, max_new_tokens inside a draft (7 or 2 tokens, drafts of 4-5), left padding."""
    _, model = eos_model
    ids, mask = left_padded_batch(np.random.default_rng(batch), batch, 9, 48, [0, 3, 1, 5][:batch])
    ids[:, -4:] = ids[:, 2:6]  # a repeated stretch, so that some drafts exist
    assert_greedy(model, ids, mask, max_new_tokens=new, prompt_lookup_num_tokens=k, eos_token_id=EOS,
                  pad_token_id=PAD)


def test_processors_see_each_drafted_position_s_own_history(demo):
    model, tokenizer = demo
    enc = tokenizer(["A friend is a friend who is a friend who is", "Never"], return_tensors="np", padding=True)
    assert_greedy(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=30, prompt_lookup_num_tokens=5,
                  max_matching_ngram_size=3, repetition_penalty=1.3, no_repeat_ngram_size=4, min_new_tokens=10,
                  pad_token_id=tokenizer.pad_token_id)


@pytest.mark.parametrize("config_class, extra", [
    ("LlamaConfig", dict(num_key_value_heads=2)),
    ("MistralConfig", dict(num_key_value_heads=2, sliding_window=4)),  # window shorter than the text
])
def test_other_families_equal_greedy(tmp_path, config_class, extra):
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        initializer_range=0.3, bos_token_id=1, eos_token_id=2, pad_token_id=0, **extra)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    model = jaxgen.from_pretrained(tmp_path)
    ids, mask = left_padded_batch(np.random.default_rng(0), 3, 10, 64, [0, 4, 2])
    ids[:, -3:] = ids[:, 4:7]
    assert_greedy(model, ids, mask, max_new_tokens=16, prompt_lookup_num_tokens=4, pad_token_id=0)


@pytest.mark.parametrize("drafts", ["lookup", "early-exit"])
def test_your_processor_sees_each_row_s_own_history(eos_model, drafts):
    """A logits_processor that bans each row's last token, with drafts of either kind: greedy
    search's output (each drafted position processed with its own history)."""
    _, model = eos_model

    def no_repeat(scores, ctx):
        last = jnp.take_along_axis(ctx.sequences, jnp.broadcast_to(ctx.end - 1, (scores.shape[0], 1)), 1)
        return jnp.where(jnp.arange(scores.shape[-1]) == last, -jnp.inf, scores)

    ids, mask = left_padded_batch(np.random.default_rng(0), 3, 6, 48, [0, 2, 4])
    kw = (dict(prompt_lookup_num_tokens=3) if drafts == "lookup"
          else dict(assistant_model=model.early_exit(1), num_assistant_tokens=3))
    out = assert_greedy(model, ids, mask, max_new_tokens=12, eos_token_id=None, pad_token_id=PAD,
                        logits_processor=[no_repeat], **kw).trim()
    assert (out.sequences[:, 7:] != out.sequences[:, 6:-1]).all()


def test_untrimmed_buffers_equal_greedy_s(eos_model):
    """Inside jit a caller sees the static buffers: scores past num_steps are 0, as greedy's."""
    _, model = eos_model
    ids, mask = left_padded_batch(np.random.default_rng(7), 3, 8, 48, [0, 2, 1])
    kw = dict(max_new_tokens=12, eos_token_id=EOS, pad_token_id=PAD, output_scores=True)
    ours = jaxgen.generate(model, ids, mask, prompt_lookup_num_tokens=3, **kw)
    plain = jaxgen.generate(model, ids, mask, **kw)
    assert int(ours.num_steps) == int(plain.num_steps)
    np.testing.assert_array_equal(np.asarray(ours.sequences), np.asarray(plain.sequences))
    np.testing.assert_allclose(np.asarray(ours.scores), np.asarray(plain.scores), atol=1e-4)


def test_length_dependent_rope_is_refused(tmp_path):
    dynamic_rope_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="depends on the sequence length"):
        jaxgen.generate(jaxgen.from_pretrained(tmp_path), np.array([[3, 4, 5]]), prompt_lookup_num_tokens=2,
                        pad_token_id=0)


def test_equals_transformers_prompt_lookup_at_batch_1(demo):
    model, tokenizer = demo
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(DEMO_MODEL).eval()
    ids = tokenizer(["A friend is a friend who is a friend who is"], return_tensors="np")["input_ids"]
    mask = np.ones_like(ids)
    kw = dict(max_new_tokens=24, pad_token_id=tokenizer.eos_token_id, prompt_lookup_num_tokens=4)
    theirs = hf_generate(torch_model, ids, mask, **kw)
    ours = jaxgen.generate(model, ids, mask, **kw).trim()
    np.testing.assert_array_equal(ours.sequences, theirs.sequences.numpy())


def test_draft_takes_the_earliest_match_of_the_longest_ngram():
    row = jnp.asarray([0, 0, 5, 6, 7, 8, 9, 6, 7, 1, 5, 6, 7], jnp.int32)  # text from column 2
    tokens, count = draft(row, jnp.int32(2), jnp.int32(13), 3, 2)
    assert int(count) == 3 and tokens.tolist() == [8, 9, 6]  # "6 7" first at columns 3-4
    tokens, count = draft(row, jnp.int32(2), jnp.int32(13), 3, 3)
    assert int(count) == 3 and tokens.tolist() == [8, 9, 6]  # "5 6 7" at columns 2-4
    tokens, count = draft(row, jnp.int32(2), jnp.int32(6), 3, 2)  # "7 8": no earlier occurrence
    assert int(count) == 0
    tokens, count = draft(row, jnp.int32(2), jnp.int32(9), 4, 2)  # "6 7" at 3-4: 4 tokens follow
    assert int(count) == 4 and tokens.tolist() == [8, 9, 6, 7]
    tokens, count = draft(row, jnp.int32(3), jnp.int32(13), 5, 1)  # "7" at 4: capped by the text's end
    assert int(count) == 5 and tokens.tolist() == [8, 9, 6, 7, 1]


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt_lookup_num_tokens=0), "prompt_lookup_num_tokens=0 is not allowed"),
    (dict(prompt_lookup_num_tokens=2, max_matching_ngram_size=0), "max_matching_ngram_size=0 is not allowed"),
])
def test_bad_input(eos_model, kwargs, message):
    _, model = eos_model
    with pytest.raises(ValueError, match=message):
        jaxgen.generate(model, np.array([[3, 4, 5]]), key=None, pad_token_id=PAD, **kwargs)


@pytest.mark.parametrize("kwargs, mode", [(dict(num_beams=2), "beam search"),
                                          (dict(penalty_alpha=0.6, top_k=3), "contrastive search")])
def test_lookup_beside_another_mode_warns_and_is_ignored(eos_model, kwargs, mode):
    """transformers logs that assisted generation runs with greedy search and sampling only, and
    runs the call's own mode."""
    _, model = eos_model
    ids, kw = np.array([[3, 4, 5]]), dict(max_new_tokens=4, pad_token_id=PAD, **kwargs)
    with pytest.warns(UserWarning, match=f"prompt_lookup_num_tokens=3 .*decoding mode is {mode}, so it is ignored"):
        out = jaxgen.generate(model, ids, prompt_lookup_num_tokens=3, **kw).trim()
    np.testing.assert_array_equal(out.sequences, jaxgen.generate(model, ids, **kw).trim().sequences)
