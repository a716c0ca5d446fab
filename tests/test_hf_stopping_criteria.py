"""transformers' tests/generation/test_stopping_criteria.py, ported to jaxgen's stopping rules.

jaxgen has no ``StoppingCriteria`` objects. EOS and stop sequences are checked inside the compiled loop by
`jaxgen.decoding.engine.hits_stop` (transformers' ``EosTokenCriteria`` and a token-level ``StopStringCriteria``);
``max_length`` / ``max_new_tokens`` bound the loop (``MaxLengthCriteria``). Each ported test keeps transformers'
name, inputs and expected values; only the call changes:

- ``criteria(input_ids, scores)`` becomes ``hits_stop(input_ids, last column, 0, spec)`` (`done` below): the last
  column holds the token just written, and a stop sequence may reach back to column 0 (no bucket padding);
- ``MaxLengthCriteria(max_length=10)`` becomes ``generate(..., max_length=10)`` on the ``eos_model`` fixture;
- a stop string becomes ``stop_sequences``: the token ids of the stop text as a word of its own (" end") and at
  the start of a text ("end"). The texts and the stop texts are tokenized with jaxgen's demo tokenizer (a
  byte-level BPE like GPT-2's, shipped with jaxgen, so the tests run offline; transformers' tests download
  GPT-2's). The pre-tokenizer cuts a word off with its leading space, so a word ends a text in the same tokens
  as it has alone, which keeps the expected values of the ported inputs.

Partly ported:
- test_eos_token_criteria_multi_codebook_frames: only its 2-D check. jaxgen writes one token per row per step:
  there are no codebook frames (3-D ``input_ids``) and no ``new_token_length`` (several new tokens at once).
- test_stop_string_criteria_byte_level_ascii: not its first assertion, the tokenizer's matching mode
  (``StopStringCriteria._get_stop_string_matching_mode``, an internal of transformers' criterion).

Not ported:
- test_list_criteria: a ``StoppingCriteriaList`` with ``MaxTimeCriteria``; jaxgen raises on ``stopping_criteria=``
  and on ``max_time``. Its ``MaxLengthCriteria`` checks are those of test_max_length_criteria.
- test_max_time_criteria: jaxgen raises on ``max_time`` (a compiled while_loop cannot stop on wall-clock time).
- test_confidence_criteria: ``ConfidenceCriteria`` belongs to assisted decoding, which jaxgen does not implement.
- test_validate_stopping_criteria: checks transformers' helper for ``StoppingCriteriaList``; jaxgen has no lists.
- test_stop_string_criteria: string matching across and inside the tokens of two downloaded tokenizers (GPT-2,
  and Qwen2 where <|im_end|> is a special token): e.g. "<|im_start|><|im_end|<|im_end|>" must stop on
  "<|im_end|>", but GPT-2's pre-tokenizer makes "|<|" one piece, so the text does not end in the tokens of
  "<|im_end|>" alone; no token-level stop sequence keeps all its expected values.
- test_stop_string_criteria_byte_fragments, test_stop_string_criteria_byte_fallback_fragments,
  test_stop_string_criteria_byte_fragment_compile: stop strings that end inside a multi-byte UTF-8 character
  split over byte tokens (Qwen2 / Llama tokenizers, torch.compile); that is matching on decoded bytes.
- test_stop_string_criteria_non_byte_level_tokenizer: StopStringCriteria's path for a WordPiece tokenizer
  (tiny-random-bert); hits_stop never sees a tokenizer, and the same texts and expected values are ported in
  test_stop_string_criteria_byte_level_ascii.
- test_stop_string_matching_mode_helpers, test_stop_string_matching_positions, test_stop_string_embedding_vecs:
  internals of StopStringCriteria's precomputation (matching mode, per-token overlaps, embedding vectors).
- test_single_letter_stop_string: "abc" (one GPT-2 token) must stop on "a", because a stop string may end
  inside the last token; a stop sequence matches whole tokens only.
- test_stopping_criteria_list_filters_kwargs_per_criterion, test_stopping_criteria_list_accepts_plain_callables:
  host-side criteria in a ``StoppingCriteriaList``; jaxgen raises on ``stopping_criteria=``.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from transformers import AutoTokenizer

import jaxgen
from jaxgen.cli import DEMO_MODEL
from jaxgen.decoding.engine import DecodeSpec, hits_stop
from tests.conftest import EOS, EOS_MODEL, PAD, assert_same_generation, hf_generate, left_padded_batch

_rng = np.random.default_rng(0)


def ids_tensor(shape, vocab_size):
    """Random token ids, as transformers' test helper of that name."""
    return _rng.integers(0, vocab_size, size=shape)


def done(input_ids, eos_token_ids=(), stop_sequences=()) -> list[bool]:
    """transformers' ``criteria(input_ids, scores).tolist()`` as jaxgen's per-step check: ``hits_stop`` on
    ``input_ids: int[rows, S]`` read as a prompt of ``S - 1`` tokens and the token just written at column
    ``S - 1``, with no bucket padding (stop sequences may reach back to column 0)."""
    ids = jnp.asarray(np.asarray(input_ids, np.int32))
    length = ids.shape[-1]
    spec = DecodeSpec(bucket_len=length - 1, max_new_tokens=1, eos_token_ids=tuple(eos_token_ids), pad_token_id=0,
                      stop_sequences=tuple(tuple(int(t) for t in stop) for stop in stop_sequences))
    return np.asarray(hits_stop(ids, jnp.int32(length - 1), jnp.int32(0), spec)).tolist()


@pytest.fixture(scope="module")
def tokenizer():
    """jaxgen's demo tokenizer, left-padding with its EOS, as transformers' tests set up GPT-2's."""
    tok = AutoTokenizer.from_pretrained(DEMO_MODEL, padding_side="left")
    tok.pad_token_id = tok.eos_token_id
    return tok


def stop_ids(tok, *stop_strings) -> list[list[int]]:
    """The token-level form of each stop string: its ids as a word of its own and at the start of a text."""
    return [tok(text, add_special_tokens=False)["input_ids"] for stop in stop_strings for text in (" " + stop, stop)]


def test_max_length_criteria(eos_model):
    """Ports transformers' test_max_length_criteria: MaxLengthCriteria(max_length=10) -> generate(max_length=10).

    The criterion is False on 5 and 9 tokens and True on 10: prompts of 5 and 9 tokens (3 rows, as
    transformers' ``_get_tensors``; ids within this model's 48) grow to exactly 10, as transformers' generate
    and ``max_new_tokens=10 - length`` do, and a prompt of 10 leaves nothing to generate: both libraries refuse it.
    """
    torch_model, model = eos_model
    kw = dict(eos_token_id=EOS, pad_token_id=PAD, suppress_tokens=[EOS])  # no row stops before the limit
    for length in (5, 9):
        ids, mask = left_padded_batch(np.random.default_rng(length), 3, length, EOS_MODEL["vocab_size"], [0, 0, 0])
        out = jaxgen.generate(model, ids, mask, max_length=10, output_scores=True, **kw).trim()
        assert out.sequences.shape == (3, 10) and len(out.scores) == 10 - length
        assert_same_generation(out, hf_generate(torch_model, ids, mask, do_sample=False, max_length=10, **kw))
        by_new_tokens = jaxgen.generate(model, ids, mask, max_new_tokens=10 - length, **kw).trim()
        np.testing.assert_array_equal(by_new_tokens.sequences, out.sequences)

    ids, mask = left_padded_batch(np.random.default_rng(10), 3, 10, EOS_MODEL["vocab_size"], [0, 0, 0])
    with pytest.raises(ValueError, match="max_length=10 is not allowed: must exceed the prompt length 10"):
        jaxgen.generate(model, ids, mask, max_length=10, **kw)
    with pytest.raises(ValueError, match="Input length of input_ids is 10, but `max_length` is set to 10"):
        hf_generate(torch_model, ids, mask, do_sample=False, max_length=10, **kw)


def test_eos_token_criteria():
    """Ports transformers' test_eos_token_criteria: EosTokenCriteria(eos_token_id=0) -> hits_stop with EOS id 0."""
    eos = (0,)
    input_ids = ids_tensor((3, 5), 250)
    input_ids[:, -1] = 0
    assert all(done(input_ids, eos))

    input_ids = ids_tensor((3, 5), 250)
    input_ids[:2, -1] = 0
    input_ids[2, -1] = 1
    assert done(input_ids, eos) == [True, True, False]

    input_ids = ids_tensor((3, 5), 250)
    input_ids[:, -1] = 1
    assert done(input_ids, eos) == [False, False, False]


def test_eos_token_criteria_multi_codebook_frames():
    """Ports transformers' test_eos_token_criteria_multi_codebook_frames, its 2-D check only (module docstring)."""
    eos = 7
    input_ids_2d = [[1, eos], [1, 2]]
    assert done(input_ids_2d, (eos,)) == [True, False]


def test_stop_string_criteria_byte_level_ascii(tokenizer):
    """Ports transformers' test_stop_string_criteria_byte_level_ascii: stop string "end" -> stop_sequences.

    "end of" starts with the stop text: a stop sequence that does not end at the last token does not stop.
    """
    true_input_ids = tokenizer("the end", return_tensors="np", add_special_tokens=False)["input_ids"]
    false_input_ids = tokenizer("end of", return_tensors="np", add_special_tokens=False)["input_ids"]
    stops = stop_ids(tokenizer, "end")
    assert done(true_input_ids, stop_sequences=stops)[0]
    assert not done(false_input_ids, stop_sequences=stops)[0]


def test_stop_string_criteria_vocab_size_mismatch(tokenizer):
    """Ports transformers' test_stop_string_criteria_vocab_size_mismatch: ids past len(tokenizer) do not stop a row.

    hits_stop compares token ids and never looks them up in a vocabulary (``generate`` itself rejects ids
    outside the model's vocab_size before tracing).
    """
    input_ids = [[len(tokenizer) + 1024, 1, 2]]
    assert not done(input_ids, stop_sequences=stop_ids(tokenizer, "test"))[0]


def test_criteria_per_row(tokenizer):
    """Ports transformers' test_criteria_per_row: MaxLengthCriteria(20) + StopStringCriteria(["end"]), one row.

    In jaxgen the length limit bounds the loop rather than being a per-row check (test_max_length_criteria);
    these texts are shorter than 20 GPT-2 tokens, so in transformers the stop string alone decides.
    """
    text = "They completed the challenging puzzle, revealing the hidden image at the end"
    stops = stop_ids(tokenizer, "end")
    inputs = tokenizer(text, return_tensors="np", add_special_tokens=False)

    # stops when the stop string ends the row
    assert done(inputs["input_ids"], stop_sequences=stops) == [True]

    # does not stop without it
    assert done(inputs["input_ids"][:, :-1], stop_sequences=stops) == [False]


def test_criteria_per_row_batched(tokenizer):
    """Ports transformers' test_criteria_per_row_batched: as test_criteria_per_row on a left-padded batch."""
    text = [
        "They completed the challenging puzzle, revealing the hidden image at the end",
        "Today a dragon flew over France",
        "The aroma of freshly baked pizza filled the kitchen",
    ]
    stops = stop_ids(tokenizer, "end")
    inputs = tokenizer(text, return_tensors="np", padding="longest", add_special_tokens=False)

    # one value per row: only the first ends with the stop string
    assert done(inputs["input_ids"], stop_sequences=stops) == [True, False, False]

    # False when no row ends with it
    assert done(inputs["input_ids"][:, :-1], stop_sequences=stops) == [False, False, False]
