"""transformers' tests/generation/test_utils.py, ported to jaxgen: the model-agnostic tests of
``GenerationTesterMixin`` as they run for GPT-2, and the ``GenerationIntegrationTests`` about
transition scores, EOS lists and minimum lengths that only need a tiny random model.

Inputs are those of transformers' GPT-2 tester (``CausalLMModelTester`` defaults mapped through
``GPT2Config.attribute_map``): vocab 99, ``n_embd`` 32, 2 layers, 2 heads, ``n_positions`` 512,
``bos_token_id`` 1, ``pad_token_id`` 0; ``input_ids`` random ``[13, 7]`` ids (``ids_tensor``, drawn
here with numpy) and the mask ``torch.tril(ones_like(input_ids))``, both cut to batch 2 by
``prepare_config_and_inputs_for_generate``, which also sets ``eos_token_id=None`` (so the
checkpoint has no EOS) and keeps ``max_new_tokens=3``. Rows of that mask end in zeros (right
padding): jaxgen warns, as transformers does, and generates from the last column as it does.
One change: ``initializer_range=0.4`` instead of 0.02. Random GPT-2 weights at 0.02 give nearly
flat next-token distributions, whose near-ties would let float32 rounding (PyTorch vs XLA) pick
different tokens; at 0.4 the gaps are wide enough for exact comparisons.

Only the call changes: ``model.generate(...)`` becomes ``jaxgen.generate(model, input_ids,
attention_mask, ...)`` and ``.trim()`` (or ``return_dict_in_generate=False``); sampling takes
``key=jax.random.key(seed)`` where transformers seeds torch. Beyond transformers' checks (shapes
of sequences / scores / logits / beam indices, consistency between fields), every greedy and beam
test also checks that jaxgen returns what transformers' ``generate`` returns on the same weights;
sampling tests check that transformers, made to draw jaxgen's tokens (`hf_following`), returns
the same sequences and scores; beam-sampling tests check consistency (sequence scores are the
length-normalised sums of the transition scores; one key, one output), their parity with
transformers being test_sampling.py's ``test_beam_sampling_equals_transformers_on_the_drawn_candidates``.
The mixin's ``_check_outputs`` is ported for scores, logits, attentions and hidden states (the
dict-output tests ask for all four, as the mixin does, and compare them with transformers' eager
attention, the one that returns weights); its past_key_values checks are not (jaxgen returns no cache).

The integration tests load hub checkpoints (tiny-random-gpt2, distilgpt2, tiny-random-bart,
t5-small) and tokenize text; here they run on the same tiny GPT-2 with token ids, their hard-coded
expected values replaced by what transformers returns on these weights, their default
``max_length=20`` passed explicitly. The encoder-decoder transition-score tests run decoder-only
(``..._encoder_decoder...`` -> ``..._decoder_only...``); the EOS ids are chosen from the model's
own greedy continuation, so that EOS really ends generation where transformers' tests expect it.

Not ported (jaxgen-irrelevant internals or strategies jaxgen does not have):
- test_greedy_generate_dict_outputs_use_cache, test_beam_search_generate_dict_outputs_use_cache:
  for jaxgen the same call as the *_dict_output(s) tests (it always decodes with its KV cache);
  what they add are checks of past_key_values and of cached attentions / hidden states.
- test_model_parallel_beam_search: accelerate's device_map model parallelism (jaxgen: test_sharding).
- test_group_beam_search_generate, test_group_beam_search_generate_dict_output,
  test_transition_scores_group_beam_search_encoder_decoder: group (diverse) beam search, which
  tests/test_hf453.py checks against transformers 4.53 (5.x runs it from the hub only).
- test_transition_scores_beam_search_encoder_decoder: encoder-decoder (its decoder-only twin is ported).
- test_constrained_beam_search_generate, test_constrained_beam_search_generate_dict_output:
  constrained beam search.
- test_contrastive_generate, test_contrastive_generate_dict_outputs_use_cache,
  test_contrastive_generate_low_memory, test_eos_token_id_int_and_list_contrastive_search:
  contrastive search.
- test_assisted_decoding_matches_greedy_search, test_assisted_decoding_sample,
  test_assisted_decoding_with_logits_to_keep, test_generated_length_assisted_generation: assisted
  decoding with a draft model; test_prompt_lookup_decoding_matches_greedy_search and
  test_prompt_lookup_decoding_stops_at_eos: what tests/test_lookup.py checks (equal to greedy,
  EOS inside a draft) on left-padded batches.
- test_dola_decoding_sample: DoLa decoding.
- test_generate_with_head_masking: encoder-decoder head masks.
- test_past_key_values_format, test_generate_continue_from_past_key_values: past_key_values.
- test_generate_from_inputs_embeds, test_generate_from_inputs_embeds_with_static_cache,
  test_max_length_if_input_embeds (and the inputs_embeds half of test_min_length_if_input_embeds):
  jaxgen starts from input_ids, never from embeddings.
- test_offloaded_cache_implementation, test_generate_with_static_cache,
  test_generate_with_quant_cache: cache implementations.
- test_generate_compile_model_forward: torch.compile (jaxgen's decoders are always jitted).
- test_generate_methods_with_logits_to_keep: a model kwarg (jaxgen computes the last position only).
- test_inherits_generation_mixin: the PyTorch class hierarchy.
- test_eager_matches_sdpa_generate, test_eager_matches_fa2_generate: attention implementations.
- test_generate_without_input_ids: not an internal, covered by test_compat.py::test_no_input_ids_starts_from_bos.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import jaxgen
from tests.conftest import assert_same_generation, build_checkpoint, hf_generate, left_padded_batch
from tests.test_sampling import hf_following

# The rows of the tester's mask end in zeros: jaxgen warns about right padding (asserted once, in
# test_greedy_generate).
pytestmark = pytest.mark.filterwarnings("ignore:A decoder-only architecture is being used:UserWarning")

VOCAB_SIZE = 99
SEQ_LENGTH = 7
MAX_NEW_TOKENS = 3  # GenerationTesterMixin.max_new_tokens
PAD = 0
TESTER_EOS = 2  # the GPT-2 tester's eos_token_id, which prepare_config_and_inputs_for_generate removes

# GPT2ModelTester's config, as prepare_config_and_inputs_for_generate leaves it (eos_token_id=None);
# initializer_range 0.4 instead of 0.02 (see the module docstring).
GPT2_TESTER_CONFIG = dict(vocab_size=VOCAB_SIZE, n_positions=512, n_embd=32, n_layer=2, n_head=2,
                          initializer_range=0.4, bos_token_id=1, eos_token_id=None, pad_token_id=PAD)

# ids_tensor([batch_size=13, seq_length=7], vocab_size) and torch.tril(torch.ones_like(input_ids)),
# cut to batch_size=2 by prepare_config_and_inputs_for_generate.
_TESTER_IDS = np.random.default_rng(0).integers(0, VOCAB_SIZE, size=(13, SEQ_LENGTH))
INPUT_IDS = _TESTER_IDS[:2]
ATTENTION_MASK = np.tril(np.ones_like(_TESTER_IDS))[:2]

# The integration tests' single tokenized prompt (7 tokens, all attended).
PROMPT = _TESTER_IDS[:1]
PROMPT_MASK = np.ones_like(PROMPT)

# What the mixin's dict-output tests ask for beside scores and logits.
LAYERS = dict(output_attentions=True, output_hidden_states=True)

# GenerationTesterMixin._get_beam_kwargs()
BEAM_KWARGS = dict(early_stopping=False, length_penalty=2.0, num_beams=2, num_return_sequences=1)


def _processor_kwargs(do_sample=False):
    """GenerationTesterMixin._get_logits_processor_kwargs(do_sample)."""
    kwargs = dict(bad_words_ids=[[1, 0]], repetition_penalty=1.2, remove_invalid_values=True)
    if do_sample:
        kwargs.update(top_k=10, top_p=0.7, temperature=0.7)
    return kwargs


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    """(torch model, jaxgen model) on the same weights: ``torch.manual_seed(0)``,
    ``GPT2LMHeadModel(config).eval().save_pretrained(path)``, ``jaxgen.from_pretrained(path)``; the
    torch model runs eager attention, as the mixin's attention checks need."""
    path = tmp_path_factory.mktemp("tiny_gpt2")
    torch_model = build_checkpoint(path, seed=0, **GPT2_TESTER_CONFIG)
    torch_model.set_attn_implementation("eager")
    return torch_model, jaxgen.from_pretrained(path)


@pytest.fixture(scope="module")
def continuation(tiny_gpt2):
    """The 13 tokens transformers' greedy search appends to PROMPT up to max_length 20 (no EOS)."""
    torch_model, _ = tiny_gpt2
    ref = hf_generate(torch_model, PROMPT, PROMPT_MASK, do_sample=False, max_length=20)
    return ref.sequences[0, SEQ_LENGTH:].numpy()


def _generated(out):
    return out.sequences[:, SEQ_LENGTH:]


def _check_outputs(output, num_return_sequences=1, num_beams=1):
    """GenerationTesterMixin._check_outputs (decoder-only, with cache): one entry per generated
    token, scores and logits ``[internal batch, vocab]``, the internal batch being batch x
    num_beams with beams, batch x num_return_sequences without; attentions per layer ``[internal
    batch, heads, prompt, prompt]`` at the first step, then ``[internal batch, heads, 1, prompt +
    step]``; hidden states per layer (and the embeddings) ``[internal batch, prompt or 1, hidden]``."""
    input_batch_size = output.sequences.shape[0] // num_return_sequences
    internal_batch_size = input_batch_size * (num_beams if num_beams > 1 else num_return_sequences)
    gen_len = output.sequences.shape[-1] - SEQ_LENGTH
    assert isinstance(output.scores, tuple) and len(output.scores) == gen_len
    assert [s.shape for s in output.scores] == [(internal_batch_size, VOCAB_SIZE)] * gen_len
    assert isinstance(output.logits, tuple) and len(output.logits) == gen_len
    assert [x.shape for x in output.logits] == [(internal_batch_size, VOCAB_SIZE)] * gen_len
    layers, heads, hidden = GPT2_TESTER_CONFIG["n_layer"], GPT2_TESTER_CONFIG["n_head"], GPT2_TESTER_CONFIG["n_embd"]
    assert isinstance(output.attentions, tuple) and len(output.attentions) == gen_len
    assert isinstance(output.hidden_states, tuple) and len(output.hidden_states) == gen_len
    for step, (attentions, states) in enumerate(zip(output.attentions, output.hidden_states)):
        query, keys = (SEQ_LENGTH, SEQ_LENGTH) if step == 0 else (1, SEQ_LENGTH + step)
        assert isinstance(attentions, tuple) and isinstance(states, tuple)
        assert [a.shape for a in attentions] == [(internal_batch_size, heads, query, keys)] * layers
        assert [h.shape for h in states] == [(internal_batch_size, query, hidden)] * (layers + 1)


def _assert_same_layers(ours, ref):
    for name in ("attentions", "hidden_states"):
        for step, (a, b) in enumerate(zip(getattr(ours, name), getattr(ref, name), strict=True)):
            for x, y in zip(a, b, strict=True):
                np.testing.assert_allclose(x, y.numpy(), atol=1e-4, rtol=0, err_msg=f"{name} at step {step}")


def _assert_same_logits(ours, ref):
    for a, b in zip(ours.logits, ref.logits, strict=True):
        np.testing.assert_allclose(a, b.numpy(), atol=1e-4, rtol=0)


def _normalised_sums(out, length_penalty):
    """Each returned beam's transition scores summed and divided by its generated length to the
    power ``length_penalty``: transformers' ``sequences_scores``."""
    ts = np.asarray(jaxgen.compute_transition_scores(out.sequences, out.scores, out.beam_indices))
    generated = (out.beam_indices != -1).sum(1)
    return ts.sum(-1) / generated.astype(np.float64) ** length_penalty


def _eos_from_continuation(tokens, step):
    """A token of greedy search's continuation that, as EOS, ends generation right after ``step``
    new tokens (or, where that token already occurs earlier, after fewer): (eos, its step)."""
    for s in range(step, -1, -1):
        if tokens[s] not in tokens[:s]:
            return int(tokens[s]), s
    raise AssertionError("unreachable: the first token is always new")


def _unused_id(used, *also):
    """The smallest id in [3, vocab) that is neither in ``used`` nor in ``also``: as a second EOS
    id it never matches, so an EOS list with it must give what the single EOS id gives."""
    free = sorted(set(range(3, VOCAB_SIZE)) - set(np.asarray(used).ravel().tolist()) - set(also))
    assert free, "every id is used; pick another prompt"
    return free[0]


# --- GenerationTesterMixin: greedy search ---------------------------------------------------


def test_greedy_generate(tiny_gpt2):
    torch_model, model = tiny_gpt2
    kw = dict(do_sample=False, num_beams=1, max_new_tokens=MAX_NEW_TOKENS, **_processor_kwargs())
    with pytest.warns(UserWarning, match=r"right-padding was detected \(rows \[0, 1\]"):
        sequences = jaxgen.generate(model, INPUT_IDS, ATTENTION_MASK, return_dict_in_generate=False, **kw)
    assert isinstance(sequences, np.ndarray)
    assert sequences.shape[-1] == MAX_NEW_TOKENS + INPUT_IDS.shape[-1]
    ref = hf_generate(torch_model, INPUT_IDS, ATTENTION_MASK, **kw)
    np.testing.assert_array_equal(sequences, ref.sequences.numpy())


def test_greedy_generate_dict_outputs(tiny_gpt2):
    torch_model, model = tiny_gpt2
    kw = dict(do_sample=False, num_beams=1, max_new_tokens=MAX_NEW_TOKENS, **_processor_kwargs())
    out = jaxgen.generate(model, INPUT_IDS, ATTENTION_MASK, output_scores=True, output_logits=True, **LAYERS,
                          **kw).trim()
    assert isinstance(out, jaxgen.HFOutput)
    assert out.sequences.shape[-1] == MAX_NEW_TOKENS + INPUT_IDS.shape[-1]
    assert out.beam_indices is None and out.sequences_scores is None  # no beam fields, as GenerateDecoderOnlyOutput
    _check_outputs(out)
    for step, scores in enumerate(out.scores):  # each token is the best processed score of its step
        np.testing.assert_array_equal(_generated(out)[:, step], scores.argmax(-1))
    ref = hf_generate(torch_model, INPUT_IDS, ATTENTION_MASK, output_logits=True, **LAYERS, **kw)
    assert_same_generation(out, ref)
    _assert_same_logits(out, ref)
    _assert_same_layers(out, ref)


# --- GenerationTesterMixin: sampling --------------------------------------------------------

def _sample_kwargs(num_return_sequences):
    """The mixin's sampling call; ``eos_token_id=None`` (the tester's model has no EOS, and None keeps
    it so in both libraries) because `hf_following` reads it."""
    return dict(num_beams=1, max_new_tokens=MAX_NEW_TOKENS, num_return_sequences=num_return_sequences,
                eos_token_id=None, **_processor_kwargs(do_sample=True))


def test_sample_generate(tiny_gpt2, monkeypatch):
    torch_model, model = tiny_gpt2
    kw = _sample_kwargs(num_return_sequences=1)
    sequences = jaxgen.generate(model, INPUT_IDS, ATTENTION_MASK, do_sample=True, key=jax.random.key(0),
                                return_dict_in_generate=False, **kw)
    assert sequences.shape[-1] == MAX_NEW_TOKENS + INPUT_IDS.shape[-1]
    ref = hf_following(torch_model, INPUT_IDS, ATTENTION_MASK, jaxgen.HFOutput(sequences=sequences), monkeypatch,
                       **kw)
    np.testing.assert_array_equal(sequences, ref.sequences.numpy())


def test_sample_generate_dict_output(tiny_gpt2, monkeypatch):
    torch_model, model = tiny_gpt2
    kw = _sample_kwargs(num_return_sequences=2)
    out = jaxgen.generate(model, INPUT_IDS, ATTENTION_MASK, do_sample=True, key=jax.random.key(0),
                          output_scores=True, output_logits=True, **LAYERS, **kw).trim()
    assert isinstance(out, jaxgen.HFOutput)
    assert out.sequences.shape == (4, MAX_NEW_TOKENS + INPUT_IDS.shape[-1])
    assert out.beam_indices is None and out.sequences_scores is None
    _check_outputs(out, num_return_sequences=2)
    np.testing.assert_array_equal(out.sequences[:, :SEQ_LENGTH], np.repeat(INPUT_IDS, 2, axis=0))
    rows = np.arange(out.sequences.shape[0])
    for step, scores in enumerate(out.scores):  # every drawn token survived the warpers
        assert np.isfinite(scores[rows, _generated(out)[:, step]]).all()
    ref = hf_following(torch_model, INPUT_IDS, ATTENTION_MASK, out, monkeypatch, **LAYERS, **kw)
    assert_same_generation(out, ref)
    _assert_same_logits(out, ref)
    _assert_same_layers(out, ref)


# --- GenerationTesterMixin: beam search -----------------------------------------------------


def test_beam_search_generate(tiny_gpt2):
    torch_model, model = tiny_gpt2
    kw = dict(do_sample=False, max_new_tokens=MAX_NEW_TOKENS, **BEAM_KWARGS, **_processor_kwargs())
    sequences = jaxgen.generate(model, INPUT_IDS, ATTENTION_MASK, return_dict_in_generate=False, **kw)
    assert sequences.shape[-1] == MAX_NEW_TOKENS + INPUT_IDS.shape[-1]
    ref = hf_generate(torch_model, INPUT_IDS, ATTENTION_MASK, **kw)
    np.testing.assert_array_equal(sequences, ref.sequences.numpy())


def test_beam_search_generate_dict_output(tiny_gpt2):
    torch_model, model = tiny_gpt2
    kw = dict(do_sample=False, max_new_tokens=MAX_NEW_TOKENS, **BEAM_KWARGS, **_processor_kwargs())
    out = jaxgen.generate(model, INPUT_IDS, ATTENTION_MASK, output_scores=True, output_logits=True, **LAYERS,
                          **kw).trim()
    assert isinstance(out, jaxgen.HFOutput)
    assert out.sequences.shape[-1] == MAX_NEW_TOKENS + INPUT_IDS.shape[-1]
    _check_outputs(out, num_return_sequences=BEAM_KWARGS["num_return_sequences"], num_beams=BEAM_KWARGS["num_beams"])
    assert out.beam_indices.shape == (2, MAX_NEW_TOKENS)
    assert ((0 <= out.beam_indices) & (out.beam_indices < 2 * BEAM_KWARGS["num_beams"])).all()
    np.testing.assert_allclose(_normalised_sums(out, BEAM_KWARGS["length_penalty"]), out.sequences_scores, atol=1e-4)
    ref = hf_generate(torch_model, INPUT_IDS, ATTENTION_MASK, output_logits=True, **LAYERS, **kw)
    assert_same_generation(out, ref, beams=True)
    _assert_same_logits(out, ref)
    _assert_same_layers(out, ref)


# --- GenerationTesterMixin: beam sampling ---------------------------------------------------


def test_beam_sample_generate(tiny_gpt2):
    _, model = tiny_gpt2
    kw = dict(do_sample=True, max_new_tokens=MAX_NEW_TOKENS, **BEAM_KWARGS, **_processor_kwargs(do_sample=True))
    sequences = jaxgen.generate(model, INPUT_IDS, ATTENTION_MASK, key=jax.random.key(0),
                                return_dict_in_generate=False, **kw)
    assert sequences.shape[-1] == MAX_NEW_TOKENS + INPUT_IDS.shape[-1]
    again = jaxgen.generate(model, INPUT_IDS, ATTENTION_MASK, key=jax.random.key(0), return_dict_in_generate=False,
                            **kw)
    np.testing.assert_array_equal(sequences, again)  # as torch.manual_seed(0): the same key, the same draws


def test_beam_sample_generate_dict_output(tiny_gpt2):
    _, model = tiny_gpt2
    kw = dict(do_sample=True, max_new_tokens=MAX_NEW_TOKENS, **BEAM_KWARGS, **_processor_kwargs(do_sample=True))
    out = jaxgen.generate(model, INPUT_IDS, ATTENTION_MASK, key=jax.random.key(0), output_scores=True,
                          output_logits=True, **LAYERS, **kw).trim()
    assert isinstance(out, jaxgen.HFOutput)
    assert out.sequences.shape[-1] == MAX_NEW_TOKENS + INPUT_IDS.shape[-1]
    _check_outputs(out, num_return_sequences=BEAM_KWARGS["num_return_sequences"], num_beams=BEAM_KWARGS["num_beams"])
    assert out.beam_indices.shape == (2, MAX_NEW_TOKENS)
    assert ((0 <= out.beam_indices) & (out.beam_indices < 2 * BEAM_KWARGS["num_beams"])).all()
    np.testing.assert_allclose(_normalised_sums(out, BEAM_KWARGS["length_penalty"]), out.sequences_scores, atol=1e-4)


# --- GenerationTesterMixin: left padding ----------------------------------------------------


def test_left_padding_compatibility(tiny_gpt2):
    """32 extra left pads (id pad_token_id, mask 0) leave the next-token logits as they are; the
    logits come from a one-token generate, and equal transformers' generate (whose position ids
    are 0 at masked slots; the test's forward pass sets them to 1, which only changes the logits of
    a masked last column)."""
    torch_model, model = tiny_gpt2
    kw = dict(max_new_tokens=1, output_logits=True)
    next_logits_wo_padding = jaxgen.generate(model, INPUT_IDS, ATTENTION_MASK, **kw).trim().logits[0]

    padded_ids = np.concatenate([np.full((INPUT_IDS.shape[0], 32), PAD), INPUT_IDS], axis=1)
    padded_mask = np.concatenate([np.zeros((INPUT_IDS.shape[0], 32), ATTENTION_MASK.dtype), ATTENTION_MASK], axis=1)
    next_logits_with_padding = jaxgen.generate(model, padded_ids, padded_mask, **kw).trim().logits[0]
    np.testing.assert_allclose(next_logits_wo_padding, next_logits_with_padding, rtol=1e-5, atol=1e-5)

    ref = hf_generate(torch_model, INPUT_IDS, ATTENTION_MASK, do_sample=False, **kw).logits[0]
    np.testing.assert_allclose(next_logits_wo_padding, ref.numpy(), atol=1e-4, rtol=0)


# --- GenerationIntegrationTests: transition scores ------------------------------------------

# Two prompts, the second left-padded with pad_token_id and no attention mask (transformers infers
# it from the pad id), as the tokenized ["Justin Timberlake", "Michael Phelps"] of the greedy tests.
GREEDY_TRANSITION_IDS, _ = left_padded_batch(np.random.default_rng(1), 2, 3, VOCAB_SIZE, [0, 1], pad_id=PAD)
# Two prompts of equal length, as the decoder-only beam test's.
BEAM_TRANSITION_IDS, _ = left_padded_batch(np.random.default_rng(2), 2, 3, VOCAB_SIZE, [0, 0], pad_id=PAD)


def _greedy_transition_case(tiny_gpt2):
    torch_model, model = tiny_gpt2
    kw = dict(max_new_tokens=5, pad_token_id=PAD, eos_token_id=None)
    out = jaxgen.generate(model, GREEDY_TRANSITION_IDS, None, output_scores=True, **kw).trim()
    ref = hf_generate(torch_model, GREEDY_TRANSITION_IDS, None, do_sample=False, **kw)
    assert_same_generation(out, ref)
    return torch_model, out, ref


def test_transition_scores_greedy_search(tiny_gpt2):
    torch_model, out, ref = _greedy_transition_case(tiny_gpt2)
    transition_scores = np.asarray(jaxgen.compute_transition_scores(out.sequences, out.scores))
    expected_scores = torch_model.compute_transition_scores(ref.sequences, ref.scores).numpy()
    assert transition_scores.shape == (2, 5)
    np.testing.assert_allclose(transition_scores, expected_scores, atol=1e-3)


def test_transition_scores_greedy_search_normalized(tiny_gpt2):
    torch_model, out, ref = _greedy_transition_case(tiny_gpt2)
    transition_scores = np.asarray(jaxgen.compute_transition_scores(out.sequences, out.scores, normalize_logits=True))
    expected_scores = torch_model.compute_transition_scores(ref.sequences, ref.scores, normalize_logits=True).numpy()
    assert transition_scores.shape == (2, 5)
    np.testing.assert_allclose(transition_scores, expected_scores, atol=1e-3)
    assert (transition_scores <= 0).all()  # log-probabilities


def _beam_transition_kwargs(**kw):
    return dict(max_length=10, num_beams=4, num_return_sequences=2, pad_token_id=PAD, **kw)


@pytest.mark.parametrize("length_penalty", [0.0, 2.0])
def test_transition_scores_beam_search_decoder_only(tiny_gpt2, length_penalty):
    """transformers runs it with length_penalty=0.0 (sequence scores = sums of the transition
    scores); 2.0 divides each sum by its generated length squared (the same compiled program)."""
    torch_model, model = tiny_gpt2
    kw = _beam_transition_kwargs(eos_token_id=None, length_penalty=length_penalty)
    out = jaxgen.generate(model, BEAM_TRANSITION_IDS, None, output_scores=True, **kw).trim()
    assert out.sequences.shape == (4, 10) and out.beam_indices.shape == (4, 7)
    np.testing.assert_allclose(_normalised_sums(out, length_penalty), out.sequences_scores, atol=1e-3)
    assert_same_generation(out, hf_generate(torch_model, BEAM_TRANSITION_IDS, None, do_sample=False, **kw), beams=True)


def test_transition_scores_beam_search_decoder_only_with_eos(tiny_gpt2):
    """transformers' test_transition_scores_beam_search_encoder_decoder_with_eos, decoder-only. The
    EOS id is the first token of the best beam without EOS, so that beams end early."""
    torch_model, model = tiny_gpt2
    without_eos = hf_generate(torch_model, BEAM_TRANSITION_IDS, None, do_sample=False,
                              **_beam_transition_kwargs(eos_token_id=None, length_penalty=0.0))
    eos = int(without_eos.sequences[0, BEAM_TRANSITION_IDS.shape[1]])
    kw = _beam_transition_kwargs(eos_token_id=eos, length_penalty=0.0)
    out = jaxgen.generate(model, BEAM_TRANSITION_IDS, None, output_scores=True, **kw).trim()
    assert (out.beam_indices == -1).any()  # a returned beam ended at EOS before max_length
    transition_scores = np.asarray(jaxgen.compute_transition_scores(out.sequences, out.scores, out.beam_indices))
    assert (transition_scores[out.beam_indices == -1] == 0).all()
    np.testing.assert_allclose(transition_scores.sum(-1), out.sequences_scores, atol=1e-3)
    assert_same_generation(out, hf_generate(torch_model, BEAM_TRANSITION_IDS, None, do_sample=False, **kw), beams=True)


def test_transition_scores_beam_sample_decoder_only(tiny_gpt2):
    """transformers' test_transition_scores_beam_sample_encoder_decoder, decoder-only."""
    _, model = tiny_gpt2
    kw = _beam_transition_kwargs(do_sample=True, eos_token_id=None, length_penalty=0.0)
    out = jaxgen.generate(model, BEAM_TRANSITION_IDS, None, key=jax.random.key(0), output_scores=True, **kw).trim()
    assert out.sequences.shape == (4, 10) and out.beam_indices.shape == (4, 7)
    transition_scores = np.asarray(jaxgen.compute_transition_scores(out.sequences, out.scores, out.beam_indices))
    np.testing.assert_allclose(transition_scores.sum(-1), out.sequences_scores, atol=1e-3)


def test_transition_scores_early_stopping(tiny_gpt2):
    """Twice the same prompt, 4 beams, 3 returned sequences, EOS forced at the last step. transformers
    runs t5-small with max_length=10 (9 decoder tokens after the start token): here 9 new tokens."""
    torch_model, model = tiny_gpt2
    ids = np.repeat(PROMPT, 2, axis=0)
    mask = np.ones_like(ids)
    kw = dict(max_new_tokens=9, eos_token_id=TESTER_EOS, forced_eos_token_id=TESTER_EOS, pad_token_id=PAD,
              num_beams=4, do_sample=False, num_return_sequences=3, length_penalty=0.0)
    out = jaxgen.generate(model, ids, mask, output_scores=True, **kw).trim()
    transition_scores = np.asarray(jaxgen.compute_transition_scores(out.sequences, out.scores, out.beam_indices))
    np.testing.assert_allclose(transition_scores.sum(-1), out.sequences_scores, rtol=1e-5, atol=1e-5)
    assert (_generated(out) == TESTER_EOS).any(1).all()  # every hypothesis ends in EOS (forced at the last step)
    assert_same_generation(out, hf_generate(torch_model, ids, mask, **kw), beams=True)


# --- GenerationIntegrationTests: EOS as an int and as a list ---------------------------------


def test_eos_token_id_int_and_list_greedy_search(tiny_gpt2, continuation):
    """transformers: eos 873 and [873, 198] both end tiny-random-gpt2's greedy continuation of a
    7-token prompt at length 13. Here the EOS is the 6th token of the model's own continuation
    (length 13 again, unless that token occurs earlier), the second id one it never emits."""
    torch_model, model = tiny_gpt2
    eos, step = _eos_from_continuation(continuation, 5)
    expectation = SEQ_LENGTH + step + 1
    for eos_token_id in (eos, [eos, _unused_id(continuation, eos)]):
        kw = dict(do_sample=False, num_beams=1, max_length=20, eos_token_id=eos_token_id)
        out = jaxgen.generate(model, PROMPT, PROMPT_MASK, output_scores=True, **kw).trim()
        assert len(out.sequences[0]) == expectation
        assert_same_generation(out, hf_generate(torch_model, PROMPT, PROMPT_MASK, **kw))


def test_eos_token_id_int_and_list_beam_search(tiny_gpt2, continuation):
    """The same EOS with 3 beams; the expected length is where transformers' beam search ends (or
    from which it pads). The second id of the list is never among the candidates a beam keeps
    (max(2, 1 + 2 EOS ids) * 3 = 9 per beam and step), so the list gives what the int gives."""
    torch_model, model = tiny_gpt2
    eos, _ = _eos_from_continuation(continuation, 5)
    kw = dict(do_sample=False, num_beams=3, max_length=20)
    ref = hf_generate(torch_model, PROMPT, PROMPT_MASK, eos_token_id=eos, **kw)
    ref_tokens = ref.sequences[0].numpy()
    hits = np.nonzero(ref_tokens[SEQ_LENGTH:] == eos)[0]
    expectation = SEQ_LENGTH + int(hits[0]) + 1 if len(hits) else len(ref_tokens)
    candidates = np.argsort(-np.stack([s.numpy() for s in ref.scores]), axis=-1)[..., :9]
    outputs = []
    for eos_token_id in (eos, [eos, _unused_id(candidates, eos)]):
        out = jaxgen.generate(model, PROMPT, PROMPT_MASK, output_scores=True, eos_token_id=eos_token_id, **kw).trim()
        generated_tokens = out.sequences[0]
        unpadded_correct_condition = expectation == len(generated_tokens)
        padded_correct_condition = expectation < len(generated_tokens) and (generated_tokens[expectation:] == PAD).all()
        assert unpadded_correct_condition or padded_correct_condition
        assert_same_generation(out, hf_generate(torch_model, PROMPT, PROMPT_MASK, eos_token_id=eos_token_id, **kw),
                               beams=True)
        outputs.append(out.sequences)
    np.testing.assert_array_equal(outputs[0], outputs[1])


def test_eos_token_id_int_and_list_top_k_top_sampling(tiny_gpt2, continuation, monkeypatch):
    """transformers seeds torch (seed 1) and expects length 20 for both; jaxgen's draws differ, so
    the expected length is that of transformers made to draw jaxgen's tokens. The second id of the
    list is one the int run never drew: with the same key the list run draws the same tokens."""
    torch_model, model = tiny_gpt2
    eos, _ = _eos_from_continuation(continuation, 5)
    kw = dict(num_beams=1, top_p=0.7, top_k=10, temperature=0.7, max_length=20)
    out = jaxgen.generate(model, PROMPT, PROMPT_MASK, do_sample=True, key=jax.random.key(1), output_scores=True,
                          eos_token_id=eos, **kw).trim()
    ref = hf_following(torch_model, PROMPT, PROMPT_MASK, out, monkeypatch, eos_token_id=eos, **kw)
    assert_same_generation(out, ref)
    expectation = ref.sequences.shape[-1]
    other = _unused_id(_generated(out), eos)
    out_list = jaxgen.generate(model, PROMPT, PROMPT_MASK, do_sample=True, key=jax.random.key(1), output_scores=True,
                               eos_token_id=[eos, other], **kw).trim()
    assert len(out.sequences[0]) == expectation == len(out_list.sequences[0])
    np.testing.assert_array_equal(out_list.sequences, out.sequences)


# --- GenerationIntegrationTests: minimum length ---------------------------------------------


def test_min_length_if_input_embeds(tiny_gpt2, continuation):
    """The input_ids half of transformers' test (``generate(input_ids, min_length=10)``); the EOS
    is the first token of the model's greedy continuation, so without min_length generation would
    stop at once, and with it EOS cannot come before the sequence is 10 tokens long."""
    torch_model, model = tiny_gpt2
    eos = int(continuation[0])
    kw = dict(do_sample=False, max_length=20, eos_token_id=eos)
    assert hf_generate(torch_model, PROMPT, PROMPT_MASK, **kw).sequences.shape[-1] == SEQ_LENGTH + 1
    min_length = 10
    out = jaxgen.generate(model, PROMPT, PROMPT_MASK, min_length=min_length, output_scores=True, **kw).trim()
    assert out.sequences.shape[-1] > min_length
    assert eos not in out.sequences[0, SEQ_LENGTH:min_length]
    assert_same_generation(out, hf_generate(torch_model, PROMPT, PROMPT_MASK, min_length=min_length, **kw))
