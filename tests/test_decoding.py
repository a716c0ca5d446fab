"""Greedy and beam search against transformers 5.x generate on the same weights."""

from __future__ import annotations

import dataclasses
import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxgen
from jaxgen.decoding import api
from jaxgen.decoding.api import compile_generate
from tests.conftest import (
    EOS,
    EOS_MODEL,
    PAD,
    TUTORIAL_IDS,
    TUTORIAL_MASK,
    assert_same_generation,
    hf_generate,
    left_padded_batch,
)

GPT2_EOS = 50256


# --- the tutorial scenario -------------------------------------------------------------------


def test_tutorial_greedy(gpt2_vocab_model):
    torch_model, model = gpt2_vocab_model
    kw = dict(max_new_tokens=5, eos_token_id=GPT2_EOS, pad_token_id=GPT2_EOS)
    ref = hf_generate(torch_model, TUTORIAL_IDS, TUTORIAL_MASK, do_sample=False, **kw)
    out = jaxgen.greedy_search(model, TUTORIAL_IDS, TUTORIAL_MASK, output_scores=True, **kw).trim()
    assert_same_generation(out, ref)
    assert out.sequences.shape == (3, 8) and out.beam_indices is None and out.sequences_scores is None


def test_tutorial_beam_search_and_transition_scores(gpt2_vocab_model):
    torch_model, model = gpt2_vocab_model
    kw = dict(max_new_tokens=5, num_beams=5, num_return_sequences=4, eos_token_id=GPT2_EOS, pad_token_id=GPT2_EOS)
    ref = hf_generate(torch_model, TUTORIAL_IDS, TUTORIAL_MASK, do_sample=False, **kw)
    out = jaxgen.beam_search(model, TUTORIAL_IDS, TUTORIAL_MASK, output_scores=True, **kw).trim()
    assert_same_generation(out, ref, beams=True)
    assert out.sequences.shape == (12, 8)

    ts = np.asarray(jaxgen.compute_transition_scores(out.sequences, out.scores, out.beam_indices))
    ref_ts = torch_model.compute_transition_scores(ref.sequences, ref.scores, ref.beam_indices).numpy()
    np.testing.assert_allclose(ts, ref_ts, atol=1e-4)
    generated = (out.beam_indices != -1).sum(1)
    np.testing.assert_allclose(ts.sum(1) / generated**1.0, out.sequences_scores, atol=1e-4)


def test_transition_scores_normalized_greedy(gpt2_vocab_model):
    torch_model, model = gpt2_vocab_model
    kw = dict(max_new_tokens=4, eos_token_id=GPT2_EOS, pad_token_id=GPT2_EOS)
    ref = hf_generate(torch_model, TUTORIAL_IDS, TUTORIAL_MASK, do_sample=False, **kw)
    out = jaxgen.greedy_search(model, TUTORIAL_IDS, TUTORIAL_MASK, output_scores=True, **kw).trim()
    ts = np.asarray(jaxgen.compute_transition_scores(out.sequences, out.scores, normalize_logits=True))
    ref_ts = torch_model.compute_transition_scores(ref.sequences, ref.scores, normalize_logits=True).numpy()
    np.testing.assert_allclose(ts, ref_ts, atol=1e-4)
    assert (ts < 0).all()


# --- the matrix ------------------------------------------------------------------------------

# greedy, and (num_beams, early_stopping) x length penalties; the other knobs vary with the case
# index so that every value appears: num_return_sequences up to num_beams, EOS lists,
# min_new_tokens, batch sizes 1 and 7.
MATRIX = [(1, False)] + list(itertools.product(range(2, 5), [True, False, "never"]))


@pytest.mark.parametrize("num_beams, early_stopping", MATRIX)
def test_matrix_against_transformers(eos_model, num_beams, early_stopping):
    torch_model, model = eos_model
    case = MATRIX.index((num_beams, early_stopping))
    batch = 1 if case % 4 == 3 else 7
    eos = [EOS, 7] if case % 3 == 1 else EOS
    min_new = 3 if case % 5 == 2 else None
    nrs = 1 + case % num_beams
    rng = np.random.default_rng(case)
    pads = rng.integers(0, 5, size=batch) if batch > 1 else [2]
    ids, mask = left_padded_batch(rng, batch, 6, EOS_MODEL["vocab_size"], pads)
    for length_penalty in (-1.0, 0.0, 1.0, 2.0):
        kw = dict(max_new_tokens=9, num_beams=num_beams, eos_token_id=eos, pad_token_id=PAD,
                  min_new_tokens=min_new)
        if num_beams > 1:
            kw.update(num_return_sequences=nrs, length_penalty=length_penalty, early_stopping=early_stopping)
        ref = hf_generate(torch_model, ids, mask, do_sample=False, **kw)
        out = jaxgen.generate(model, ids, mask, output_scores=True, **kw).trim()
        assert_same_generation(out, ref, beams=num_beams > 1)
        if num_beams == 1:
            break  # length_penalty / early_stopping do not apply


def test_matrix_model_really_finishes_rows_at_different_steps(eos_model):
    """Guards the matrix: on its batches, greedy rows hit EOS at many different steps, and some
    rows never do (so finished rows are padded while others run on)."""
    _, model = eos_model
    finish_steps, unfinished_rows = set(), 0
    for case in range(len(MATRIX)):
        rng = np.random.default_rng(case)
        ids, mask = left_padded_batch(rng, 7, 6, EOS_MODEL["vocab_size"], rng.integers(0, 5, size=7))
        out = jaxgen.greedy_search(model, ids, mask, max_new_tokens=9, eos_token_id=EOS, pad_token_id=PAD).trim()
        for row in out.sequences[:, 6:]:
            if (row == EOS).any():
                finish_steps.add(int(np.argmax(row == EOS)))
            else:
                unfinished_rows += 1
    assert len(finish_steps) >= 4, finish_steps
    assert unfinished_rows > 0


def test_min_length_and_max_length(eos_model):
    torch_model, model = eos_model
    ids, mask = left_padded_batch(np.random.default_rng(5), 3, 5, EOS_MODEL["vocab_size"], [0, 1, 3])
    for kw in (dict(max_length=12, min_length=9), dict(max_length=11, num_beams=3, min_length=8)):
        kw.update(eos_token_id=EOS, pad_token_id=PAD)
        ref = hf_generate(torch_model, ids, mask, do_sample=False, **kw)
        out = jaxgen.generate(model, ids, mask, output_scores=True, **kw).trim()
        assert_same_generation(out, ref, beams="num_beams" in kw)


@pytest.mark.filterwarnings("ignore:Using the model-agnostic default `max_length`")
def test_default_length_is_20_new_tokens_within_n_positions(eos_model):
    """Without max_new_tokens / max_length, transformers 5.x generates 20 tokens after the prompt
    (not up to a total of 20), stopping at n_positions (64 here)."""
    torch_model, model = eos_model
    kw = dict(eos_token_id=EOS, pad_token_id=PAD, suppress_tokens=[EOS])  # rows run to the limit
    for length, total in ((5, 25), (50, 64)):
        ids, mask = left_padded_batch(np.random.default_rng(length), 2, length, EOS_MODEL["vocab_size"], [0, 2])
        with pytest.warns(UserWarning, match="Using the model-agnostic default max_length"):
            out = jaxgen.generate(model, ids, mask, output_scores=True, **kw).trim()
        assert out.sequences.shape == (2, total)
        assert_same_generation(out, hf_generate(torch_model, ids, mask, do_sample=False, **kw))
    with pytest.raises(ValueError, match=r"prompt length 64.*no room for a new token.*n_positions=64"):
        jaxgen.generate(model, np.full((1, 64), 5), **kw)


def test_output_logits(eos_model):
    torch_model, model = eos_model
    ids, mask = left_padded_batch(np.random.default_rng(6), 2, 4, EOS_MODEL["vocab_size"], [0, 2])
    for kw in (dict(), dict(num_beams=3)):
        kw.update(max_new_tokens=6, eos_token_id=EOS, pad_token_id=PAD)
        ref = hf_generate(torch_model, ids, mask, do_sample=False, output_logits=True, **kw)
        out = jaxgen.generate(model, ids, mask, output_logits=True, **kw).trim()
        assert out.scores is None and len(out.logits) == len(ref.logits)
        for a, b in zip(out.logits, ref.logits):
            np.testing.assert_allclose(a, b.numpy(), atol=1e-4)


# --- buckets and compilation ------------------------------------------------------------------


def test_bucket_does_not_change_results(eos_model):
    _, model = eos_model
    ids, mask = left_padded_batch(np.random.default_rng(7), 3, 6, EOS_MODEL["vocab_size"], [0, 2, 4])
    kw = dict(max_new_tokens=7, num_beams=3, num_return_sequences=2, eos_token_id=EOS, pad_token_id=PAD,
              output_scores=True)
    base = jaxgen.generate(model, ids, mask, prompt_bucket=None, **kw).trim()
    for bucket in (8, 64):
        out = jaxgen.generate(model, ids, mask, prompt_bucket=bucket, **kw).trim()
        np.testing.assert_array_equal(out.sequences, base.sequences)
        np.testing.assert_array_equal(out.beam_indices, base.beam_indices)
        np.testing.assert_allclose(out.sequences_scores, base.sequences_scores, atol=1e-5)
        for a, b in zip(out.scores, base.scores):
            np.testing.assert_allclose(a, b, atol=1e-5)


def test_same_bucket_compiles_once(eos_model):
    _, model = eos_model
    rng = np.random.default_rng(8)
    kw = dict(max_new_tokens=5, num_beams=2, eos_token_id=EOS, pad_token_id=PAD, prompt_bucket=16, length_penalty=1.0)
    ids, mask = left_padded_batch(rng, 2, 5, EOS_MODEL["vocab_size"], [0, 1])
    jaxgen.generate(model, ids, mask, **kw).sequences.block_until_ready()
    before = api._decode._cache_size()
    for length in (7, 12, 16):  # other prompt lengths of the same bucket
        ids, mask = left_padded_batch(rng, 2, length, EOS_MODEL["vocab_size"], [0, 3])
        jaxgen.generate(model, ids, mask, **{**kw, "length_penalty": 0.5}).sequences.block_until_ready()
    assert api._decode._cache_size() == before
    ids, mask = left_padded_batch(rng, 2, 17, EOS_MODEL["vocab_size"], [0, 3])  # next bucket
    jaxgen.generate(model, ids, mask, **kw)
    assert api._decode._cache_size() == before + 1


def test_output_scores_false_allocates_no_score_buffer(gpt2_vocab_model):
    _, model = gpt2_vocab_model
    from jaxgen.decoding import args
    shape = "5x15x50257xf32"  # [steps, batch * beams, vocab]
    for output_scores in (True, False):
        req = args.parse(model, TUTORIAL_IDS, TUTORIAL_MASK, dict(
            max_new_tokens=5, num_beams=5, eos_token_id=GPT2_EOS, pad_token_id=GPT2_EOS, output_scores=output_scores))
        hlo = api._decode.lower(model, *api._operands(req), spec=req.spec).as_text()
        assert (shape in hlo) == output_scores


def _cache_moves(model, ids, mask, **kwargs):
    """(spec, lines of the compiled program that copy or gather a cache-sized array of any phase
    of the loop), after checking that the cache arrays are where this looks."""
    from jaxgen.decoding import args
    req = args.parse(model, ids, mask, dict(kwargs, eos_token_id=EOS, pad_token_id=PAD))
    hlo = api._decode.lower(model, *api._operands(req), spec=req.spec).compile().as_text()
    c, spec = model.config, req.spec
    rows, group = len(ids), spec.num_beams if spec.beam_search else 1
    lead = f"{rows},{c.n_kv_heads}" if rows > 1 else f"{c.n_kv_heads}"  # one row is stored without its batch dim
    shapes = []
    for end in spec.phase_ends:
        slots = spec.bucket_len + end * group  # beam search stores the prompt once per batch row
        shapes += [f"f32[{lead},{c.head_dim},{slots}]", f"f32[{lead},{slots},{c.head_dim}]"]
    assert all(f"= {shape}" in hlo for shape in shapes)
    return spec, [line for line in hlo.splitlines()
                  if re.search(r" (copy|gather)\(", line) and any(f"= {shape}" in line for shape in shapes)]


@pytest.mark.parametrize("batch", [2, 1])
def test_beam_step_neither_gathers_nor_copies_the_cache(eos_model, batch):
    """Reordering beams re-points an ancestry table: the compiled program has no gather or copy
    producing a cache-sized array (a physical reorder gathered, then copied, all of it per step),
    in any phase of the loop."""
    _, model = eos_model
    ids, mask = left_padded_batch(np.random.default_rng(5), batch, 6, EOS_MODEL["vocab_size"], [0, 2][:batch])
    spec, moves = _cache_moves(model, ids, mask, max_new_tokens=32, num_beams=3)
    assert spec.phase_ends == (16, 32)
    assert not moves, moves[:2]


@pytest.mark.parametrize("batch", [2, 1])
def test_token_step_updates_the_cache_in_place(eos_model, batch):
    """Greedy / sampling: no copy of a cache-sized array in the compiled program, in any phase
    (at batch 1 too: a cache with a unit batch dim would be copied four times a step)."""
    _, model = eos_model
    ids, mask = left_padded_batch(np.random.default_rng(5), batch, 6, EOS_MODEL["vocab_size"], [0, 2][:batch])
    spec, moves = _cache_moves(model, ids, mask, max_new_tokens=32)
    assert spec.phase_ends == (16, 32)
    assert not moves, moves[:2]


def compiled_hlo(model, ids, mask, **kwargs) -> str:
    """The compiled decode program of a call (8 new tokens, the EOS model's ids), as text."""
    return compile_generate(model, ids, mask, max_new_tokens=8, eos_token_id=EOS, pad_token_id=PAD,
                            **kwargs).compiled.as_text()


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="a property of XLA:CPU's compiler")
@pytest.mark.parametrize("batch, num_beams, single_row", [(1, 1, "row-major"), (1, 1, "weight-major"),
                                                         (2, 1, "weight-major"), (1, 3, "weight-major")])
def test_bfloat16_program_keeps_no_float32_copy_of_a_weight(eos_model, batch, num_beams, single_row):
    """XLA:CPU runs a bfloat16 matmul that returns bfloat16, or multiplies one row, by converting
    the weight to float32 (a float32 copy of every weight per call, more memory than a float32
    model), and gathers from a bfloat16 table by converting all of it. `kernels.matmul.project`
    avoids the first, in either order of a single row's product (`probe`); `layers.embed` ties
    the table to the step's tokens, so that the conversion stays inside the gather (of the rows it
    reads) instead of being hoisted out of the loop whole."""
    from jaxgen.kernels import probe

    _, model = eos_model
    c = model.config
    model = model.replace(params=jax.tree.map(lambda x: x.astype(jnp.bfloat16), model.params),
                          config=dataclasses.replace(c, dtype="bfloat16"))
    ids, mask = left_padded_batch(np.random.default_rng(5), batch, 6, c.vocab_size, [0, 2][:batch])
    with probe.fixed(("single row", "bfloat16"), single_row):
        hlo = compiled_hlo(model, ids, mask, num_beams=num_beams)
    d, inner = c.d_model, c.inner_dim
    assert f"bf16[{c.vocab_size},{d}]" in hlo, "the embedding is not in the program; the search below has lost its " \
        "anchor"
    for shape in (f"{c.vocab_size},{d}", f"{c.n_heads},3,{c.head_dim},{d}", f"{d},{d}", f"{inner},{d}", f"{d},{inner}"):
        for dtype in ("f32", "u16"):
            assert not materialized(hlo, f"{dtype}[{shape}]"), materialized(hlo, f"{dtype}[{shape}]")[:1]


def materialized(hlo: str, array: str) -> list[str]:
    """The conversions and copies of a compiled program that write an ``array`` (``"f32[48,32]"``)
    to memory: converts and elementwise (loop) fusions outside a fusion's body (one fused into
    another computes only what its consumer reads)."""
    fused = set(re.findall(r"calls=(%[\w.\-]+)", hlo))
    found, inside = [], False
    for line in hlo.splitlines():
        if line.rstrip().endswith("{") and "->" in line and " = " not in line:  # a computation begins
            inside = line.split()[1 if line.startswith("ENTRY") else 0] in fused
        elif not inside and f"= {array}{{" in line and (" convert(" in line or "kind=kLoop" in line):
            found.append(line.strip())
    return found


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="a property of XLA:CPU's GEMM")
@pytest.mark.parametrize("batch, num_beams, choice, lanes", [(5, 1, "padded", 8), (1, 5, "padded", 8),
                                                             (3, 4, "padded", 16), (5, 1, "as is", 5)])
def test_cpu_projections_take_the_rows_this_machine_runs_fastest(eos_model, batch, num_beams, choice, lanes):
    """A decode step's 5 or 12 rows reach XLA:CPU's GEMM as 8 or 16 where padding to whole lane
    tiles is faster on this machine (`kernels.matmul.gemm_rows`; `probe` measures it at first use,
    fixed here), as they are where it is not; the prompt's rows, above 64 or up to 4, as they are."""
    from jaxgen.decoding import args
    from jaxgen.kernels import probe

    _, model = eos_model
    ids, mask = left_padded_batch(np.random.default_rng(5), batch, 6, model.config.vocab_size, [0, 2, 1][:batch])
    with probe.fixed(("lanes", batch * num_beams, "float32"), choice):
        hlo = compiled_hlo(model, ids, mask, num_beams=num_beams)
    bucket_len = args.DEFAULTS["prompt_bucket"]  # the 6-token prompts' bucket
    products = re.findall(r"= f32\[[\d,]*?(\d+)\]\{[\d,]+\} dot\((?:(?!batch_dims).)*rhs_contracting_dims=\{1\}", hlo)
    counts = set(map(int, products))  # also the prompt's last positions, batch <= 4 rows, as they are
    assert lanes in counts and counts <= {lanes, batch * bucket_len, *range(1, 5)}, counts


@pytest.mark.parametrize("num_beams", [1, 3])
def test_long_generation_across_loop_phases(eos_model, num_beams):
    """40 new tokens run in two loop phases (20 + 20 steps, the cache grown in between); rows
    finish in both phases. Sequences and scores equal transformers'."""
    torch_model, model = eos_model
    rng = np.random.default_rng(11)
    ids, mask = left_padded_batch(rng, 5, 6, EOS_MODEL["vocab_size"], [0, 3, 1, 0, 2])
    kw = dict(max_new_tokens=40, num_beams=num_beams, eos_token_id=EOS, pad_token_id=PAD, min_new_tokens=17)
    if num_beams > 1:
        kw.update(num_return_sequences=2, length_penalty=0.5)
    ref = hf_generate(torch_model, ids, mask, do_sample=False, **kw)
    out = jaxgen.generate(model, ids, mask, output_scores=True, **kw)
    assert out.num_steps > 20
    out = out.trim()
    assert_same_generation(out, ref, beams=num_beams > 1)
    if num_beams == 1:
        generated = out.sequences[:, 6:]
        finished_at = [int(np.argmax(row == EOS)) for row in generated if (row == EOS).any()]
        assert min(finished_at) < 20 <= max(finished_at), finished_at


def test_usable_inside_users_jit(eos_model):
    """Decoders run under the caller's jax.jit with the model as a traced argument (concrete-value
    checks such as token ranges are skipped for tracers; shape checks still run)."""
    _, model = eos_model
    ids, mask = left_padded_batch(np.random.default_rng(9), 3, 6, EOS_MODEL["vocab_size"], [0, 2, 4])
    kw = dict(max_new_tokens=6, eos_token_id=EOS, pad_token_id=PAD)

    @jax.jit
    def user_program(m, i, a):
        greedy = jaxgen.greedy_search(m, i, a, **kw)
        beams = jaxgen.beam_search(m, i, a, num_beams=3, **kw)
        return greedy, beams

    greedy, beams = user_program(model, jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_array_equal(greedy.trim().sequences,
                                  jaxgen.greedy_search(model, ids, mask, **kw).trim().sequences)
    np.testing.assert_array_equal(beams.trim().sequences,
                                  jaxgen.beam_search(model, ids, mask, num_beams=3, **kw).trim().sequences)


# --- bad input --------------------------------------------------------------------------------

BAD_CALLS = [
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences=3.*<= num_beams=2"),
    (dict(num_beams=0), "num_beams=0"),
    (dict(max_new_tokens=60), "exceeds the model's n_positions=64"),
    (dict(max_new_tokens=0), "max_new_tokens=0"),
    (dict(early_stopping="always", num_beams=2), "early_stopping='always'"),
    (dict(early_stopping=1, num_beams=2), "early_stopping=1"),
    (dict(num_return_sequences=2), "greedy methods .* return one sequence per prompt"),
    (dict(max_time=3.0), "max_time=3.0, which jaxgen does not support"),
    (dict(stop_strings=["\n"]), "could not locate a tokenizer"),
    (dict(stop_sequences=[[]]), "stop_sequences"),
    (dict(stop_sequences=[[3, 99]]), r"stop_sequences.*\[0, 48\)"),
    (dict(num_beam=3), "unknown generate argument 'num_beam' .*did you mean 'num_beams'"),
    (dict(length_penalty="big", num_beams=2), "length_penalty='big'"),
    (dict(suppress_tokens=list(range(48))), "ban every token"),
    (dict(eos_token_id=2.5), "eos_token_id=2.5.*token id"),
    (dict(eos_token_id=True), "eos_token_id=True"),
    (dict(forced_bos_token_id=[1, 3]), "forced_bos_token_id.*single token id"),
    (dict(forced_bos_token_id=5, suppress_tokens=[5, 6]), r"forced_bos_token_id=5.*banned .*\(by suppress_tokens\)"),
    (dict(forced_eos_token_id=[2, 7], suppress_tokens=[7, 2]), r"forced_eos_token_id=\[2, 7\].*by suppress_tokens"),
    (dict(forced_eos_token_id=2, begin_suppress_tokens=[2], max_new_tokens=1), "forced_eos_token_id=2.*begin_suppress"),
    (dict(min_new_tokens=1.5), "min_new_tokens=1.5"),
    (dict(prompt_bucket=0), "prompt_bucket=0"),
    (dict(mesh="4x2"), "mesh must be a jax.sharding.Mesh"),
]


@pytest.mark.parametrize("kwargs, message", BAD_CALLS, ids=[m[:24] for _, m in BAD_CALLS])
def test_bad_arguments_raise_before_tracing(eos_model, kwargs, message):
    _, model = eos_model
    ids, mask = left_padded_batch(np.random.default_rng(0), 2, 5, EOS_MODEL["vocab_size"], [0, 1])
    kw = dict(max_new_tokens=4, eos_token_id=EOS, pad_token_id=PAD)
    kw.update(kwargs)
    kw = {k: v for k, v in kw.items() if v is not None or k != "pad_token_id"}
    with pytest.raises(ValueError, match=message):
        jaxgen.generate(model, ids, mask, **kw)


def test_bad_inputs(eos_model):
    _, model = eos_model
    kw = dict(max_new_tokens=4, eos_token_id=EOS, pad_token_id=PAD)
    ids = np.array([[5, 6, 7], [8, 9, 10]])
    with pytest.raises(ValueError, match=r"input_ids.*\[0, 48\)"):
        jaxgen.generate(model, np.array([[5, 48]]), **kw)
    with pytest.raises(ValueError, match=r"input_ids.*\[0, 48\)"):
        jaxgen.generate(model, np.array([[-1, 5]]), **kw)
    with pytest.raises(ValueError, match="attention_mask.*shape"):
        jaxgen.generate(model, ids, np.ones((2, 4)), **kw)
    with pytest.raises(ValueError, match="input_ids.*integer array"):
        jaxgen.generate(model, np.ones((2, 3)), **kw)
    with pytest.raises(ValueError, match="input_ids.*integer array"):
        jaxgen.generate(model, np.array([1, 2, 3]), **kw)
    with pytest.raises(ValueError, match="beam_search needs num_beams"):
        jaxgen.beam_search(model, ids, **kw)
    with pytest.raises(ValueError, match="greedy_search runs with num_beams=1"):
        jaxgen.greedy_search(model, ids, num_beams=3, **kw)
    with pytest.raises(ValueError, match="model must be a jaxgen CausalLM"):
        jaxgen.generate("gpt2", ids, **kw)
    # Token ids may come as arrays (numpy, jax, torch), as transformers takes tensors.
    as_arrays = dict(max_new_tokens=4, eos_token_id=torch.tensor([EOS]), pad_token_id=jnp.int32(PAD),
                     forced_eos_token_id=np.array(EOS))
    np.testing.assert_array_equal(
        jaxgen.generate(model, ids, **as_arrays).sequences,
        jaxgen.generate(model, ids, **dict(kw, forced_eos_token_id=EOS)).sequences)
    with pytest.raises(ValueError, match=r"eos_token_id=\[2.0\].*token id"):
        jaxgen.generate(model, ids, **dict(kw, eos_token_id=torch.tensor([2.0])))
    from transformers import LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper

    class Mine(LogitsProcessor):  # a transformers processor of the user's: torch too
        def __call__(self, input_ids, scores):
            return scores

    with pytest.raises(ValueError, match=r"logits_processor='<TemperatureLogitsWarper, Mine>'.*torch tensors"):
        jaxgen.generate(model, ids, logits_processor=LogitsProcessorList([TemperatureLogitsWarper(0.5), Mine()]), **kw)


@pytest.mark.parametrize("length, kw", [
    (4, dict(max_new_tokens=2, forced_eos_token_id=EOS, begin_suppress_tokens=[EOS])),  # forced after the ban
    (1, dict(max_new_tokens=1, forced_eos_token_id=EOS, begin_suppress_tokens=[EOS], forced_bos_token_id=5)),
    (4, dict(max_new_tokens=3, forced_eos_token_id=[EOS, 7], suppress_tokens=[7])),  # EOS is left to force
])
def test_forced_tokens_next_to_suppressed_ones_equal_transformers(eos_model, length, kw):
    """The neighbours of the forced-and-suppressed conflicts in BAD_CALLS run, as transformers."""
    torch_model, model = eos_model
    ids, mask = left_padded_batch(np.random.default_rng(length), 2, length, EOS_MODEL["vocab_size"], [0, length - 1])
    kw = dict(kw, num_beams=2, eos_token_id=EOS, pad_token_id=PAD)
    assert_same_generation(jaxgen.generate(model, ids, mask, output_scores=True, **kw).trim(),
                           hf_generate(torch_model, ids, mask, **kw), beams=True)


def test_stop_sequences_equal_a_transformers_stopping_criterion(eos_model):
    """stop_sequences (token-level stop strings) behave as a transformers StoppingCriteria that
    matches the end of input_ids, for greedy and beam search."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    torch_model, model = eos_model
    ids, mask = left_padded_batch(np.random.default_rng(4), 5, 6, EOS_MODEL["vocab_size"], [0, 2, 4, 1, 3])
    free = jaxgen.greedy_search(model, ids, mask, max_new_tokens=10, eos_token_id=EOS, pad_token_id=PAD).trim()
    generated = free.sequences[:, 6:]
    # Stop on bigrams / single tokens that really occur, so that several rows stop early.
    stops = [[int(generated[0, 1]), int(generated[0, 2])], [int(generated[3, 4])]]

    class EndsWith(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
            for stop in stops:
                done |= (input_ids[:, -len(stop):] == torch.tensor(stop)).all(-1)
            return done

    for extra in (dict(), dict(num_beams=3, num_return_sequences=2)):
        kw = dict(max_new_tokens=10, eos_token_id=EOS, pad_token_id=PAD, **extra)
        ref = hf_generate(torch_model, ids, mask, do_sample=False, stopping_criteria=StoppingCriteriaList([EndsWith()]),
                          **kw)
        out = jaxgen.generate(model, ids, mask, stop_sequences=stops, output_scores=True, **kw).trim()
        assert_same_generation(out, ref, beams=bool(extra))
    stopped = jaxgen.greedy_search(model, ids, mask, max_new_tokens=10, eos_token_id=EOS, pad_token_id=PAD,
                                   stop_sequences=stops).trim()
    width = free.sequences.shape[1]
    padded = np.pad(stopped.sequences, ((0, 0), (0, width - stopped.sequences.shape[1])), constant_values=PAD)
    assert (padded[:, 6:] == PAD).sum() > (free.sequences[:, 6:] == PAD).sum()  # rows were cut early


def test_missing_or_holed_attention_mask_equals_transformers(eos_model):
    """Without attention_mask, transformers masks the pad id where it occurs in input_ids (unless
    it is an EOS id), left padding or not; an explicit mask may have holes. Greedy and beam
    search with a repetition penalty (which skips each row's left padding) equal transformers."""
    torch_model, model = eos_model
    ids, _ = left_padded_batch(np.random.default_rng(12), 4, 7, EOS_MODEL["vocab_size"], [3, 0, 1, 0])
    ids[1, 2] = ids[2, 4] = PAD  # the pad id as a prompt token: masked too
    ids[2, 1] = 5  # a real token before it, which the penalty must see
    holed = np.array([[0, 0, 1, 1, 0, 1, 1], [1, 0, 1, 0, 1, 1, 1], [0, 1, 1, 1, 1, 0, 1], [1] * 7])
    for mask, extra in itertools.product([None, holed], [dict(), dict(num_beams=3, num_return_sequences=2)]):
        kw = dict(max_new_tokens=6, eos_token_id=EOS, pad_token_id=PAD, repetition_penalty=4.0, **extra)
        out = jaxgen.generate(model, ids, mask, output_scores=True, **kw).trim()
        assert_same_generation(out, hf_generate(torch_model, ids, mask, do_sample=False, **kw), beams=bool(extra))
    # A pad id that is also the EOS id, or absent from the prompt, leaves every token unmasked.
    with_eos = np.where(ids == PAD, EOS, ids)
    for pad, prompt in ((EOS, with_eos), (PAD, with_eos)):
        kw = dict(max_new_tokens=6, eos_token_id=EOS, pad_token_id=pad)
        assert_same_generation(jaxgen.generate(model, prompt, None, output_scores=True, **kw).trim(),
                               hf_generate(torch_model, prompt, None, do_sample=False, **kw))


class Collector:
    """A transformers-style streamer that records what it is given."""

    def __init__(self):
        self.puts, self.ended = [], False

    def put(self, value):
        assert not self.ended
        self.puts.append(np.asarray(value))

    def end(self):
        self.ended = True


@pytest.mark.parametrize("do_sample", [False, True])
def test_streamer_receives_every_token_in_order(eos_model, do_sample):
    _, model = eos_model
    ids, mask = left_padded_batch(np.random.default_rng(10), 2, 5, EOS_MODEL["vocab_size"], [0, 2])
    kw = dict(max_new_tokens=8, eos_token_id=EOS, pad_token_id=PAD, do_sample=do_sample)
    if do_sample:
        kw["key"] = jax.random.key(4)
    plain = jaxgen.generate(model, ids, mask, **kw)
    before = api._decode._cache_size()
    for _ in range(2):  # a new streamer object reuses the compiled streaming program
        streamer = Collector()
        out = jaxgen.generate(model, ids, mask, streamer=streamer, **kw).trim()
        assert streamer.ended
        np.testing.assert_array_equal(out.sequences, plain.trim().sequences)
        np.testing.assert_array_equal(streamer.puts[0], ids)
        np.testing.assert_array_equal(np.stack(streamer.puts[1:], axis=1), out.sequences[:, 5:])
    assert api._decode._cache_size() == before + 1


def test_streamer_with_beams_is_rejected(eos_model):
    _, model = eos_model
    with pytest.raises(ValueError, match="streamer.*not beam search"):
        jaxgen.generate(model, np.array([[3, 4]]), num_beams=2, max_new_tokens=2, eos_token_id=EOS, pad_token_id=PAD,
                        streamer=Collector())
    with pytest.raises(ValueError, match="streamer.*put"):
        jaxgen.generate(model, np.array([[3, 4]]), max_new_tokens=2, eos_token_id=EOS, pad_token_id=PAD, streamer=print)


def test_compile_generate_runs_the_same_program(eos_model):
    _, model = eos_model
    ids, mask = left_padded_batch(np.random.default_rng(11), 2, 5, EOS_MODEL["vocab_size"], [0, 2])
    kw = dict(max_new_tokens=6, num_beams=2, eos_token_id=EOS, pad_token_id=PAD, output_scores=True)
    run = api.compile_generate(model, ids, mask, **kw)
    assert " while(" in run.compiled.as_text()  # XLA's executable, for inspection and memory_analysis()
    a, b = run().trim(), jaxgen.generate(model, ids, mask, **kw).trim()
    np.testing.assert_array_equal(a.sequences, b.sequences)
    np.testing.assert_allclose(a.sequences_scores, b.sequences_scores)


def test_first_argmax_breaks_ties_like_argmax():
    """Ties, infinities and NaNs (either sign, as x86 makes -inf + inf) as numpy's and torch's argmax."""
    from jaxgen.decoding.select import first_argmax

    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(64, 50)).astype(np.float32)  # many ties
    scores[3] = -np.inf
    scores[4, 7] = np.inf
    scores[5, [9, 30]] = np.nan
    scores[6] = np.nan
    scores[7, [2, 30]] = -np.nan, np.inf
    scores[8, :3] = -0.0, 0.0, -1.0
    scores[8, 3:] = -2.0
    ours = np.asarray(first_argmax(jnp.asarray(scores)))
    np.testing.assert_array_equal(ours, scores.argmax(-1))
    np.testing.assert_array_equal(ours, torch.tensor(scores).argmax(-1).numpy())
    assert list(ours[5:9]) == [9, 0, 2, 0]


def test_row_of_nans_picks_token_0_as_transformers(eos_model):
    """``no_repeat_ngram_size=1`` bans every token once each was used; ``renormalize_logits`` then
    makes the row NaN, and transformers' argmax takes its first NaN (token 0) from there on."""
    torch_model, model = eos_model
    ids, mask = left_padded_batch(np.random.default_rng(3), 2, 5, EOS_MODEL["vocab_size"], [0, 2])
    kw = dict(max_new_tokens=50, eos_token_id=EOS, pad_token_id=PAD, suppress_tokens=[EOS], no_repeat_ngram_size=1,
              renormalize_logits=True)
    ref = hf_generate(torch_model, ids, mask, do_sample=False, **kw)
    out = jaxgen.generate(model, ids, mask, output_scores=True, **kw).trim()
    assert np.isnan(ref.scores[-1].numpy()).all()
    assert_same_generation(out, ref)


def _ranked(scores, k):
    """torch.topk's ranking, ties to the lower index: NaN counted as +inf, -0.0 as +0.0."""
    order = np.argsort(-np.where(np.isnan(scores), np.inf, scores), axis=-1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, -1), order


@pytest.mark.parametrize("seed", range(4))
def test_chunked_top_k_ranks_as_torch_topk(seed):
    """Values, indices and tie order of select.top_k: ties, -inf, NaN and +inf, zeros of both
    signs, a ragged last chunk; chunks kept inside each of ``groups`` parts of a row, as beam
    search's beams. Where torch's order is defined (one NaN, no ties) it is torch.topk's; lax.top_k
    differs there (a negative NaN, as x86 makes -inf + inf, last)."""
    from jaxgen.decoding.select import top_k

    rng = np.random.default_rng(seed)
    for k, n, groups in [(1, 3001, 1), (5, 50257, 1), (8, 4 * 50257 // 7, 1), (12, 9000, 1), (8, 4 * 3001, 4),
                         (6, 3 * 5000, 3), (3, 40, 1)]:
        scores = rng.integers(-6, 6, size=(6, n)) if seed % 2 else rng.normal(size=(6, n))
        scores = scores.astype(np.float32)
        scores[1, rng.integers(0, n, size=n // 2)] = -np.inf
        scores[2] = -np.inf
        scores[2, -1] = 0.0
        scores[3, rng.integers(0, n, size=5)] = rng.choice([np.nan, -np.nan, np.inf], size=5)
        scores[4] = np.where(scores[4] > 0, -8.0, scores[4])
        scores[4, rng.integers(0, n, size=2 * k)] = rng.choice([0.0, -0.0], size=2 * k)
        scores[5] = rng.permutation(n).astype(np.float32)
        scores[5, n - 2] = -np.nan
        ours = top_k(jnp.asarray(scores), k, chunk=32, groups=groups)
        values, indices = _ranked(scores, k)
        np.testing.assert_array_equal(ours[0], values)
        np.testing.assert_array_equal(ours[1], indices)
        np.testing.assert_array_equal(ours[1][5], torch.topk(torch.tensor(scores[5]), k).indices.numpy())
        assert ours[1][5, 0] == n - 2 and jax.lax.top_k(scores[5], k)[1][0] != n - 2
    with pytest.raises(ValueError, match="groups=4"):
        top_k(jnp.zeros((2, 9001)), 3, groups=4)


def test_categorical_draws_as_jax_random_categorical():
    from jaxgen.decoding.select import categorical

    scores = jax.random.normal(jax.random.key(1), (8, 5000)) * 3
    for seed in range(3):
        key = jax.random.key(seed)
        np.testing.assert_array_equal(categorical(key, scores), jax.random.categorical(key, scores, axis=-1))


def _sweep_cases(n, seed=2026):
    """``n`` random combinations of decoding arguments that interact (beams, EOS lists, length
    penalty, early stopping, history processors, forced / suppressed tokens), from a fixed seed."""
    rng = np.random.default_rng(seed)
    cases = []
    for _ in range(n):
        batch, length = int(rng.integers(1, 4)), int(rng.integers(2, 8))
        pads = [0] + [int(rng.integers(0, length)) for _ in range(batch - 1)]
        kw = dict(max_new_tokens=int(rng.integers(1, 12)), pad_token_id=PAD,
                  eos_token_id=EOS if rng.random() < 0.6 else [EOS, int(rng.integers(3, 48))])
        beams = int(rng.choice([1, 2, 3, 4]))
        if beams > 1:
            kw.update(num_beams=beams, num_return_sequences=int(rng.integers(1, beams + 1)),
                      length_penalty=float(rng.choice([1.0, 0.0, 0.5, 2.0])),
                      early_stopping=[True, False, "never"][int(rng.integers(3))])
        optional = {
            "min_new_tokens": int(rng.integers(0, kw["max_new_tokens"] + 1)),
            "repetition_penalty": float(rng.choice([0.8, 1.2, 2.0])),
            "no_repeat_ngram_size": int(rng.integers(1, 4)),
            "bad_words_ids": [[int(rng.integers(3, 48))], [int(rng.integers(3, 48)), int(rng.integers(3, 48))]],
            "forced_eos_token_id": EOS,
            "suppress_tokens": [int(rng.integers(3, 48))],
            "begin_suppress_tokens": [EOS],
            "exponential_decay_length_penalty": (2, 1.3),
            "sequence_bias": {(int(rng.integers(3, 48)),): 3.0},
            "renormalize_logits": True,
        }
        for name, value in optional.items():
            if rng.random() < 0.25:
                kw[name] = value
        cases.append((pads, length, kw))
    return cases


SWEEP_CASES = _sweep_cases(9)


@pytest.mark.parametrize("case", range(len(SWEEP_CASES)))
def test_random_argument_combinations(eos_model, case):
    """`_sweep_cases`, each against transformers: sequences, scores, beam indices, sequence scores
    and transition scores."""
    torch_model, model = eos_model
    pads, length, kw = SWEEP_CASES[case]
    ids, mask = left_padded_batch(np.random.default_rng(case), len(pads), length, EOS_MODEL["vocab_size"], pads)
    ref = hf_generate(torch_model, ids, mask, do_sample=False, **kw)
    out = jaxgen.generate(model, ids, mask, output_scores=True, **kw).trim()
    beams = kw.get("num_beams", 1) > 1
    assert_same_generation(out, ref, beams=beams)
    ts = np.asarray(jaxgen.compute_transition_scores(out.sequences, out.scores, out.beam_indices if beams else None))
    ref_ts = torch_model.compute_transition_scores(ref.sequences, ref.scores, ref.beam_indices if beams else None)
    np.testing.assert_allclose(ts, ref_ts.numpy(), atol=1e-4)


def test_the_probe_keeps_its_first_candidate_unless_another_clearly_wins(monkeypatch):
    """Formulations sum in other orders, so a near tie decided by timing noise would change a
    machine's results from one process to the next: the first stays unless another is MARGIN
    faster."""
    from jaxgen.kernels import probe

    for times, expected in (((1.0, 0.9), "first"), ((1.0, 0.8), "second"), ((1.0, 0.8, 0.7), "third")):
        clock = iter(t for t in times for _ in range(3))
        monkeypatch.setattr(probe, "_timed", lambda run, weights: next(clock))
        candidates = {name: (lambda w: w) for name in ("first", "second", "third")[:len(times)]}
        assert probe._measure(candidates, jnp.float32, (8, 8), 1) == expected
