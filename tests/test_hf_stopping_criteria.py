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

``stop_strings`` themselves (with ``tokenizer=``) run on transformers' own table of the
tokenizer (`jaxgen.decoding.stop_strings`): the last tests check the in-loop check against
transformers' ``StopStringCriteria`` on the demo tokenizer, and generate against transformers'.
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


STOP_STRINGS = ("the end", ".", "a b", "xyz", "e")


def test_stop_strings_equal_transformers_stop_string_criteria(tokenizer):
    """`StopStrings.hits` against transformers' ``StopStringCriteria`` on the same tokenizer:
    texts that end in a stop string across, inside or at the end of tokens (a stop string may
    end inside the last token: "e" stops "the" and "the en"), that do not, and random token
    sequences."""
    import torch
    from transformers.generation.stopping_criteria import StopStringCriteria

    from jaxgen.decoding.stop_strings import StopStrings

    theirs, ours = StopStringCriteria(tokenizer, list(STOP_STRINGS)), StopStrings.build(tokenizer, STOP_STRINGS)
    texts = ["This is the end", "hello.", "a b", "nothing here", "the en", "xy z", "It was a bright day.",
             "x y z xyz", "the", "abc"]
    rng = np.random.default_rng(0)
    sequences = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    sequences += [rng.integers(0, tokenizer.vocab_size, rng.integers(1, 12)).tolist() for _ in range(200)]
    got = [bool(ours.hits(jnp.asarray([s], jnp.int32), len(s) - 1, 0)[0]) for s in sequences]
    expected = [bool(theirs(torch.tensor([s]), None)[0]) for s in sequences]
    assert got == expected
    assert got[:len(texts)] == [True, True, True, True, True, False, True, True, True, False]
    assert 10 < sum(got[len(texts):]) < 190  # the random ones both stop and run on


@pytest.mark.parametrize("num_beams", [1, 3])
def test_stop_strings_generate_equals_transformers(tokenizer, num_beams):
    """The demo model with stop strings that its text reaches at different steps per row."""
    import torch
    from transformers import AutoModelForCausalLM

    model, torch_model = jaxgen.from_pretrained(DEMO_MODEL), AutoModelForCausalLM.from_pretrained(DEMO_MODEL).eval()
    enc = tokenizer(["The meaning of life is", "A good friend", "Never"], return_tensors="np", padding=True)
    kw = dict(max_new_tokens=20, stop_strings=[".", "is", " the"], tokenizer=tokenizer, num_beams=num_beams,
              num_return_sequences=min(num_beams, 2), pad_token_id=tokenizer.pad_token_id)
    ours = jaxgen.generate(model, enc.input_ids, enc.attention_mask, **kw).trim().sequences
    with torch.no_grad():
        ref = torch_model.generate(torch.tensor(enc.input_ids), attention_mask=torch.tensor(enc.attention_mask),
                                   do_sample=False, **kw).numpy()
    np.testing.assert_array_equal(ours, ref)
    assert ours.shape[1] < enc.input_ids.shape[1] + 20  # stopped before max_new_tokens


def test_stop_strings_in_generate_batch_equal_generate(tokenizer):
    """Continuous batching stops each request where generate stops it alone (the batch's tokenizer
    spells the stop strings)."""
    model = jaxgen.from_pretrained(DEMO_MODEL)
    prompts = [tokenizer(t)["input_ids"] for t in ("The meaning of life is", "A good friend", "Never")]
    kw = dict(max_new_tokens=20, stop_strings=["."], pad_token_id=tokenizer.eos_token_id)
    results = jaxgen.generate_batch(model, prompts, tokenizer=tokenizer, max_rows=2, progress=False, **kw)
    for prompt, result in zip(prompts, results):
        alone = jaxgen.generate(model, np.array([prompt]), tokenizer=tokenizer, **kw).trim().sequences[0, len(prompt):]
        assert result.tokens == alone.tolist()
        assert result.finish_reason == "stop" and tokenizer.decode(result.tokens).endswith(".")


def test_stop_strings_without_eos_leave_stopped_rows_running(tokenizer, tmp_path):
    """transformers pads finished rows only when an EOS criterion exists: with stop strings alone
    a row that stopped goes on generating until every row has stopped (no pad id needed); an
    empty stop string stops every row after its first token."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=4,
                        initializer_range=0.4, bos_token_id=None, eos_token_id=None)
    torch_model = GPT2LMHeadModel(config).eval()
    torch_model.generation_config.eos_token_id = torch_model.generation_config.pad_token_id = None
    torch_model.save_pretrained(tmp_path)
    model = jaxgen.from_pretrained(tmp_path)
    ids, mask = left_padded_batch(np.random.default_rng(0), 3, 5, len(tokenizer), [0, 2, 1])
    for strings in (["k"], ["", "k"]):  # "k": the rows' texts reach it at steps 1, 4 and 7
        kw = dict(max_new_tokens=12, stop_strings=strings, tokenizer=tokenizer)
        ours = jaxgen.generate(model, ids, mask, **kw).trim().sequences
        with torch.no_grad():
            ref = torch_model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                                       **kw).numpy()
        np.testing.assert_array_equal(ours, ref)
        assert ours.shape[1] == ids.shape[1] + (8 if strings == ["k"] else 1)  # "": every row at once
