"""Classifier-free guidance (``guidance_scale``, ``negative_prompt_ids``): greedy search and
sampling equal transformers' (its ``UnbatchedClassifierFreeGuidanceLogitsProcessor``) on
left-padded batches whose rows end at different steps, with the prompt's last token as the
unconditional prompt, with a left-padded negative prompt, a scale below 1, another family, and
sampled rows; what it cannot run raises by name."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

import jaxgen
from tests.conftest import (EOS, EOS_MODEL, PAD, assert_same_generation, dynamic_rope_checkpoint, hf_generate,
                            left_padded_batch)
from tests.test_outputs import eager
from tests.test_sampling import hf_following


def _batch(vocab=EOS_MODEL["vocab_size"]):
    ids, mask = left_padded_batch(np.random.default_rng(3), 3, 6, vocab, [0, 2, 5])
    negative, negative_mask = left_padded_batch(np.random.default_rng(9), 3, 4, vocab, [0, 1, 3])
    return ids, mask, negative, negative_mask


def _torch(kw):
    return {k: torch.tensor(v) if isinstance(v, np.ndarray) else v for k, v in kw.items()}


@pytest.mark.parametrize("case", ["last token", "negative prompt", "below 1 under a mask"])
def test_greedy_equals_transformers(eos_model, case):
    torch_model, model = eos_model
    ids, mask, negative, negative_mask = _batch()
    guided = {"last token": dict(guidance_scale=1.5),
              "negative prompt": dict(guidance_scale=3.0, negative_prompt_ids=negative,
                                      negative_prompt_attention_mask=negative_mask),
              # the last prompt token under a mask of its own; a zero row reads it as eager attention does
              "below 1 under a mask": dict(guidance_scale=0.5,
                                           negative_prompt_attention_mask=np.array([[1], [0], [1]]))}[case]
    kw = dict(max_new_tokens=8, eos_token_id=EOS, pad_token_id=PAD, **guided)
    ours = jaxgen.generate(model, ids, mask, output_scores=True, **kw).trim()
    ref = hf_generate(eager(torch_model), ids, mask, do_sample=False, **_torch(kw))
    assert_same_generation(ours, ref)
    plain = jaxgen.generate(model, ids, mask, output_scores=True, max_new_tokens=8, eos_token_id=EOS,
                            pad_token_id=PAD).trim()
    assert not np.allclose(ours.scores[0], plain.scores[0])  # guided: log-probabilities moved


def test_sampling_equals_transformers_on_the_drawn_tokens(eos_model, monkeypatch):
    """Two returned sequences a prompt: each row's unconditional branch starts from its own copy
    of the prompt's last token."""
    torch_model, model = eos_model
    ids, mask, _, _ = _batch()
    kw = dict(max_new_tokens=8, eos_token_id=EOS, pad_token_id=PAD, guidance_scale=2.0, top_k=10,
              num_return_sequences=2)
    ours = jaxgen.sample(model, ids, mask, key=jax.random.key(4), output_scores=True, **kw).trim()
    ref = hf_following(torch_model, ids, mask, ours, monkeypatch, **kw)
    assert_same_generation(ours, ref)


def test_llama_equals_transformers(tmp_path):
    from tests.test_families import VOCAB, build
    torch_model = build(tmp_path, "llama_gqa2_biases_untied")
    model = jaxgen.from_pretrained(tmp_path)
    ids, mask, negative, negative_mask = _batch(VOCAB)
    kw = dict(max_new_tokens=8, eos_token_id=EOS, pad_token_id=PAD, guidance_scale=2.5, negative_prompt_ids=negative,
              negative_prompt_attention_mask=negative_mask)
    assert_same_generation(jaxgen.generate(model, ids, mask, output_scores=True, **kw).trim(),
                           hf_generate(torch_model, ids, mask, do_sample=False, **_torch(kw)))


def test_scale_1_and_negative_prompts_alone_change_nothing(eos_model):
    """transformers adds no processor for a scale of 1, and reads the negative prompt only with one."""
    _, model = eos_model
    ids, mask, negative, _ = _batch()
    kw = dict(max_new_tokens=6, eos_token_id=EOS, pad_token_id=PAD)
    plain = jaxgen.generate(model, ids, mask, **kw).trim().sequences
    for extra in (dict(guidance_scale=1.0), dict(negative_prompt_ids=negative)):
        np.testing.assert_array_equal(jaxgen.generate(model, ids, mask, **kw, **extra).trim().sequences, plain)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_beams=2), "guidance_scale=1.5 is not allowed: not with beam search"),
    (dict(penalty_alpha=0.6, top_k=3), "not with contrastive search"),
    (dict(prompt_lookup_num_tokens=2), "not with assisted decoding"),
    (dict(negative_prompt_ids=[[3, 4]]), r"negative_prompt_ids='<int64\[1, 2\]>' is not allowed: expected integer "
                                         r"ids \[3, length\]"),
    (dict(negative_prompt_ids=[[3], [4], [99]]), r"negative_prompt_ids='<contains \[99\]>'"),
    (dict(negative_prompt_ids=[[3], [4], [5]], negative_prompt_attention_mask=[[1, 1]] * 3),
     r"negative_prompt_attention_mask=.* expected 0/1 values of shape \[3, 1\]"),
    (dict(negative_prompt_ids=[[3], [4], [5]], do_sample=True, num_return_sequences=2, key=jax.random.key(0)),
     "not with num_return_sequences=2"),
    (dict(guidance_scale="high"), "guidance_scale='high' is not allowed"),
    (dict(negative_prompt_attention_mask=[[1, 1]] * 3), r"expected 0/1 values of shape \[3, 1\]"),
    (dict(negative_prompt_ids=np.full((3, 62), 3)), r"its 62 tokens and the 3 generated ones .* n_positions=64"),
])
def test_bad_arguments(eos_model, kwargs, message):
    _, model = eos_model
    ids, mask, _, _ = _batch()
    kwargs = {"guidance_scale": 1.5, **kwargs}
    with pytest.raises(ValueError, match=message):
        jaxgen.generate(model, ids, mask, max_new_tokens=4, pad_token_id=PAD, **kwargs)


def test_dynamic_rope_is_refused(tmp_path):
    """transformers runs both branches on one rotary state that follows the longest sequence."""
    dynamic_rope_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="guidance_scale=1.5 is not allowed: this model's rotary embedding is dynamic"):
        jaxgen.generate(jaxgen.from_pretrained(tmp_path), np.array([[3, 4, 5]]), guidance_scale=1.5, pad_token_id=0)


def test_generate_batch_refuses_it(eos_model):
    _, model = eos_model
    with pytest.raises(ValueError, match="guidance_scale=1.5 is classifier-free guidance, which generate_batch does"):
        jaxgen.generate_batch(model, [[3, 4, 5]], guidance_scale=1.5, max_new_tokens=2, progress=False)
