"""Shared fixtures: small GPT-2 checkpoints built with transformers, and parity helpers."""

from __future__ import annotations

import os

# The suite compiles about a thousand small programs, most of its time. LLVM at -O0 compiles them
# faster and leaves the optimized HLO (fusions, layouts, copies: what tests inspect) byte for byte
# the same; subprocesses inherit the flag. `TEST_XLA_FLAGS` (`XLA_FLAGS` extended) is for their
# own environments.
TEST_XLA_FLAGS = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()
os.environ["XLA_FLAGS"] = TEST_XLA_FLAGS

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

import jaxgen  # noqa: E402

torch.set_num_threads(2)
if jax.default_backend() != "cpu":
    # Parity with PyTorch float32 needs full float32 matmuls: JAX's default precision on a GPU
    # uses TF32, on a TPU bfloat16 passes (XLA:CPU is always full precision).
    jax.config.update("jax_default_matmul_precision", "highest")

# The tutorial's prompts ("Hello", "I love", "I want to") in GPT-2 ids, left-padded with 50256.
TUTORIAL_IDS = np.array([[50256, 50256, 15496], [50256, 40, 1842], [40, 765, 284]])
TUTORIAL_MASK = np.array([[0, 0, 1], [0, 1, 1], [1, 1, 1]])


def build_checkpoint(path, seed=0, eos_boost=None, **config) -> GPT2LMHeadModel:
    """A random GPT-2 saved with ``save_pretrained(path)``; returns the PyTorch model.

    ``eos_boost`` scales the EOS embedding row so that EOS is picked often enough for rows to
    finish at different steps (random GPT-2s otherwise almost never emit it).
    """
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**config)).eval()
    if eos_boost is not None:
        with torch.no_grad():
            model.transformer.wte.weight[config["eos_token_id"]] *= eos_boost
    model.save_pretrained(path)
    return model


# A model whose rows hit EOS (id 2) at different steps; pad id 0.
EOS_MODEL = dict(vocab_size=48, n_positions=64, n_embd=32, n_layer=2, n_head=4, initializer_range=0.4,
                 bos_token_id=1, eos_token_id=2)
EOS, PAD = 2, 0


@pytest.fixture(scope="session")
def eos_model(tmp_path_factory):
    """(torch model, jaxgen model) with peaked distributions and frequent EOS."""
    path = tmp_path_factory.mktemp("eos_model")
    torch_model = build_checkpoint(path, seed=0, eos_boost=2.0, **EOS_MODEL)
    return torch_model, jaxgen.from_pretrained(path)


@pytest.fixture(scope="session")
def gpt2_vocab_model(tmp_path_factory):
    """(torch model, jaxgen model) with GPT-2's 50257-token vocabulary (a tiny network)."""
    path = tmp_path_factory.mktemp("gpt2_vocab")
    torch_model = build_checkpoint(path, seed=0, vocab_size=50257, n_positions=128, n_embd=64, n_layer=2,
                                   n_head=4, initializer_range=0.3)
    return torch_model, jaxgen.from_pretrained(path)


def dynamic_rope_checkpoint(path) -> None:
    """A one-layer random Llama whose rotary embedding is ``dynamic`` (its frequencies follow the
    sequence length past 16 positions), saved to ``path``."""
    import transformers
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                      num_attention_heads=4, max_position_embeddings=16,
                                      rope_scaling=dict(rope_type="dynamic", factor=2.0))
    transformers.LlamaForCausalLM(config).save_pretrained(path)


def left_padded_batch(rng, batch, length, vocab, pads, pad_id=PAD, low=3):
    """ids int64[batch, length] with pads[i] left pads in row i, and the matching mask."""
    ids = rng.integers(low, vocab, size=(batch, length))
    mask = np.ones((batch, length), np.int64)
    for row, p in enumerate(pads):
        ids[row, :p] = pad_id
        mask[row, :p] = 0
    return ids, mask


def hf_generate(torch_model, ids, mask, **kwargs):
    with torch.no_grad():
        return torch_model.generate(
            torch.tensor(ids), attention_mask=None if mask is None else torch.tensor(mask),
            return_dict_in_generate=True, output_scores=True, **kwargs,
        )


def assert_same_generation(ours, ref, atol=1e-4, beams=False):
    """Sequences (and beam indices) equal; scores within atol with the same -inf pattern.

    When sequences differ, the message names the first differing row and step and the gap
    between the two best processed scores transformers saw there (a near-tie explains a split).
    """
    ref_seq = ref.sequences.numpy()
    if ours.sequences.shape != ref_seq.shape or not (ours.sequences == ref_seq).all():
        msg = f"sequences differ: ours {ours.sequences.shape}, transformers {tuple(ref_seq.shape)}"
        if ours.sequences.shape[0] == ref_seq.shape[0]:
            width = min(ours.sequences.shape[1], ref_seq.shape[1])
            rows, cols = np.nonzero(ours.sequences[:, :width] != ref_seq[:, :width])
            if len(rows):
                row, col = rows[0], cols[0]
                step = col - (ref_seq.shape[1] - len(ref.scores))
                if 0 <= step < len(ref.scores):
                    top2 = torch.topk(ref.scores[step], 2, dim=-1).values
                    gaps = (top2[:, 0] - top2[:, 1]).numpy()
                    msg += f"; first split at row {row}, step {step}; top-2 score gaps there: {gaps}"
        raise AssertionError(msg + f"\nours:\n{ours.sequences}\ntransformers:\n{ref_seq}")
    assert len(ours.scores) == len(ref.scores), (len(ours.scores), len(ref.scores))
    for step, (a, b) in enumerate(zip(ours.scores, ref.scores)):
        b = b.numpy()
        assert (np.isneginf(a) == np.isneginf(b)).all(), f"-inf pattern differs at step {step}"
        finite = np.isfinite(b)
        np.testing.assert_allclose(a[finite], b[finite], atol=atol, rtol=0, err_msg=f"scores at step {step}")
    if beams:
        np.testing.assert_array_equal(ours.beam_indices, ref.beam_indices.numpy())
        np.testing.assert_allclose(ours.sequences_scores, ref.sequences_scores.numpy(), atol=atol, rtol=0)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drops every compiled program after each test module: a process that keeps hundreds of
    XLA:CPU executables slows down (the whole suite on the 2-core machine: 12m12s without this,
    10m00s with it, back to back; its files run one by one: 7m40s in all)."""
    yield
    jax.clear_caches()
