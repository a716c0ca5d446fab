"""Llama, Mistral, Qwen2, Qwen3, Phi-3 and Gemma 1/2/3 against transformers' PyTorch models on
the same random weights: logits of left-padded batches, greedy and beam search, sampling, every
rope type, GQA ratios 1/2/4, tied and untied heads, biases, sliding windows shorter than the
sequence (kept in rings), soft-capping that binds, dynamic and longrope lengths crossed during
generation, bfloat16; and their checkpoints' loading."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import jaxgen
from jaxgen.models.model import forward, logits, positions_from_mask
from tests.conftest import assert_same_generation, hf_generate, left_padded_batch
from tests.test_sampling import hf_following

VOCAB, EOS, PAD = 96, 2, 0
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD,
              initializer_range=0.2)
# name: (transformers config class, its arguments). Prompts are 7 tokens, generation 8 more.
CASES = {
    "llama_gqa2_biases_untied": ("LlamaConfig", dict(attention_bias=True, mlp_bias=True)),
    "llama3_gqa4_head_dim_tied": ("LlamaConfig", dict(
        num_attention_heads=8, head_dim=8, tie_word_embeddings=True,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=16))),
    "mistral_mha_window4": ("MistralConfig", dict(num_key_value_heads=4, sliding_window=4)),
    "qwen2_yarn_window_layer1": ("Qwen2Config", dict(
        use_sliding_window=True, sliding_window=3, max_window_layers=1,
        rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16))),
    "qwen3_qk_norm_linear_bias": ("Qwen3Config", dict(head_dim=16, attention_bias=True,
                                                      rope_scaling=dict(rope_type="linear", factor=2.0))),
    "phi3_partial_window5": ("Phi3Config", dict(partial_rotary_factor=0.5, sliding_window=5)),
    "llama_dynamic_crossing": ("LlamaConfig", dict(max_position_embeddings=10,
                                                   rope_scaling=dict(rope_type="dynamic", factor=2.0))),
    "phi3_longrope_crossing": ("Phi3Config", dict(
        original_max_position_embeddings=10, max_position_embeddings=40,
        rope_scaling=dict(rope_type="longrope", short_factor=[1.0, 1.3, 2.0, 3.0], long_factor=[2.0, 3.0, 5.0, 9.0]))),
    "gemma_mha_gelu": ("GemmaConfig", dict(num_key_value_heads=4, head_dim=16, hidden_act="gelu")),
    "gemma2_softcaps_window4": ("Gemma2Config", dict(head_dim=16, num_hidden_layers=3, sliding_window=4,
                                                     attn_logit_softcapping=1.0, final_logit_softcapping=2.5,
                                                     query_pre_attn_scalar=24)),
    "gemma3_local_global_window5": ("Gemma3TextConfig", dict(
        head_dim=8, num_hidden_layers=3, sliding_window=5, sliding_window_pattern=2, rope_local_base_freq=100.0,
        rope_scaling=dict(rope_type="linear", factor=2.0), final_logit_softcapping=4.0)),
}


def build(path, name, seed=0, **changes):
    """``CASES[name]``'s random PyTorch model, saved to ``path``; returns it."""
    config_class, kwargs = CASES[name]
    config = getattr(transformers, config_class)(**{**COMMON, **kwargs, **changes})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(path)
    return model


def fresh(torch_model):
    """A copy with the rotary embedding's state reset: transformers' dynamic and longrope
    embeddings remember the longest sequence they saw across calls."""
    copy = transformers.AutoModelForCausalLM.from_config(torch_model.config).eval()
    copy.load_state_dict(torch_model.state_dict())
    return copy


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    return request.param, build(path, request.param), jaxgen.from_pretrained(path), path


def _batch(seed=0):
    return left_padded_batch(np.random.default_rng(seed), 3, 7, VOCAB, pads=[0, 3, 1], low=3)


def test_logits_match_pytorch_on_left_padded_batch(pair):
    _, torch_model, model, _ = pair
    ids, mask = left_padded_batch(np.random.default_rng(1), 4, 13, VOCAB, pads=[0, 3, 8, 1], low=0)
    pos = torch.tensor(np.asarray(positions_from_mask(jnp.asarray(mask))))
    with torch.no_grad():
        ref = fresh(torch_model)(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                                 position_ids=pos).logits.numpy()
    ours = np.asarray(model(ids, mask))
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], ref[real], atol=1e-4, rtol=0)
    assert np.abs(ref[real]).max() > 1.0


@pytest.mark.parametrize("beams", [1, 3])
def test_generate_equals_transformers(pair, beams):
    """Greedy and beam search (sequences, scores, beam indices, sequence scores); rope lengths and
    sliding windows are crossed during the 8 new tokens."""
    _, torch_model, model, _ = pair
    ids, mask = _batch()
    kw = dict(max_new_tokens=8, eos_token_id=EOS, pad_token_id=PAD)
    if beams > 1:
        kw.update(num_beams=beams, num_return_sequences=2, length_penalty=0.7)
    ref = hf_generate(fresh(torch_model), ids, mask, do_sample=False, **kw)
    assert_same_generation(jaxgen.generate(model, ids, mask, output_scores=True, **kw).trim(), ref, beams=beams > 1)


@pytest.mark.parametrize("name", ["qwen2_yarn_window_layer1", "phi3_longrope_crossing", "gemma2_softcaps_window4"])
def test_sampling_equals_transformers_on_the_drawn_tokens(name, tmp_path, monkeypatch):
    torch_model = build(tmp_path, name)
    model = jaxgen.from_pretrained(tmp_path)
    ids, mask = _batch(2)
    kw = dict(max_new_tokens=8, eos_token_id=EOS, pad_token_id=PAD, num_return_sequences=2, top_k=20, top_p=0.9,
              temperature=0.8)
    ours = jaxgen.sample(model, ids, mask, key=jax.random.key(4), output_scores=True, **kw).trim()
    assert_same_generation(ours, hf_following(fresh(torch_model), ids, mask, ours, monkeypatch, **kw))


@pytest.mark.parametrize("name", ["llama3_gqa4_head_dim_tied", "gemma2_softcaps_window4"])
def test_bfloat16_stays_within_documented_tolerance(tmp_path, name):
    """bfloat16 params and activations, norms, softmax and logits in float32: max |logit error|
    <= 4% of max |logit| against transformers in float32, as for GPT-2."""
    torch_model = build(tmp_path, name)
    torch_model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    model = jaxgen.from_pretrained(tmp_path / "bf16")  # dtype="auto": the checkpoint's
    assert model.config.dtype == "bfloat16" and model.params["embed"].dtype == jnp.bfloat16
    ids, mask = _batch(3)
    torch_model = build(tmp_path / "f32", name)  # float32, same weights before rounding
    with torch.no_grad():
        ref = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                          position_ids=torch.tensor(np.asarray(positions_from_mask(jnp.asarray(mask))))).logits.numpy()
    ours = np.asarray(model(ids, mask))
    real = mask.astype(bool)
    assert ours.dtype == np.float32
    assert np.abs(ours[real] - ref[real]).max() <= 0.04 * np.abs(ref[real]).max()
    assert (ours[real].argmax(-1) == ref[real].argmax(-1)).mean() > 0.8


def test_gemma2_soft_caps_bind(tmp_path):
    """Both soft-caps change the logits here (transformers without either differs), and jaxgen
    equals transformers with them; the final cap bounds every logit."""
    name = "gemma2_softcaps_window4"
    torch_model = build(tmp_path, name)
    without = {cap: build(tmp_path / cap, name, **{cap: None})
               for cap in ("attn_logit_softcapping", "final_logit_softcapping")}
    ids, mask = _batch(4)
    real = mask.astype(bool)

    def torch_logits(m):
        with torch.no_grad():
            return m(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()[real]

    ref = torch_logits(torch_model)
    np.testing.assert_allclose(np.asarray(jaxgen.from_pretrained(tmp_path)(ids, mask))[real], ref, atol=1e-4, rtol=0)
    assert np.abs(ref).max() < 2.5 < np.abs(torch_logits(without["final_logit_softcapping"])).max()
    assert np.abs(torch_logits(without["attn_logit_softcapping"]) - ref).max() > 0.05


def test_sliding_layers_keep_only_their_window(tmp_path):
    """Gemma 2's sliding layers (window 4) keep rings of 4 slots in the compiled program, its
    global layer the whole 32 + 8 slots."""
    from jaxgen.decoding import api, args

    build(tmp_path, "gemma2_softcaps_window4")
    model = jaxgen.from_pretrained(tmp_path)
    ids, mask = _batch(5)
    req = args.parse(model, ids, mask, dict(max_new_tokens=8, eos_token_id=EOS, pad_token_id=PAD))
    hlo = api._decode.lower(model, *api._operands(req), spec=req.spec).compile().as_text()
    loop = next(line for line in hlo.splitlines() if " while(" in line)
    assert loop.count("f32[3,2,16,4]") == 2 and loop.count("f32[3,2,4,16]") == 2  # keys, values of 2 rings
    assert loop.count("f32[3,2,16,40]") == 1 and loop.count("f32[3,2,40,16]") == 1  # the global layer
    assert model.config.layer_windows == (4, None, 4)


def test_a_multimodal_gemma3_checkpoint_runs_its_language_model(tmp_path):
    """A ``gemma3`` checkpoint (its config nests the text model; weights under
    ``language_model.``): the text model loads, equal to transformers' on text; image tokens
    in the prompt raise, naming input_ids."""
    config = transformers.Gemma3Config(
        text_config=dict(COMMON, head_dim=8, num_hidden_layers=2, sliding_window=4, vocab_size=300),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14), mm_tokens_per_image=4, image_token_index=299)
    torch.manual_seed(0)
    torch_model = transformers.Gemma3ForConditionalGeneration(config).eval()
    torch_model.save_pretrained(tmp_path)
    model = jaxgen.from_pretrained(tmp_path)
    assert model.config.model_type == "gemma3_text" and model.config.unsupported_token_ids == (299,)
    ids, mask = _batch(6)
    with torch.no_grad():
        ref = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(model(ids, mask))[real], ref[real], atol=1e-4, rtol=0)
    ids[0, -2] = 299
    with pytest.raises(ValueError, match=r"input_ids='<contains \[299\]>'.*images"):
        jaxgen.generate(model, ids, mask, max_new_tokens=2, pad_token_id=PAD)


def test_rows_written_at_their_own_slots(tmp_path):
    """The cache writes each row at its own slot (rows at different lengths): row 1 skips two
    slots, masked out, and each row's logits still equal a full forward over its tokens."""
    build(tmp_path, "llama3_gqa4_head_dim_tied")
    model = jaxgen.from_pretrained(tmp_path)
    rng = np.random.default_rng(5)
    prompt, steps = 4, 5
    ids = rng.integers(3, VOCAB, (2, prompt + steps))
    kv_mask = np.ones((2, 16), bool)
    kv_mask[1, prompt:prompt + 2] = False
    positions = np.broadcast_to(np.arange(prompt + steps), (2, prompt + steps))
    cache = model.init_cache(2, 16)
    _, cache = forward(model, jnp.asarray(ids[:, :prompt]), jnp.asarray(positions[:, :prompt]), kv_mask, cache, 0)
    full = np.asarray(model(ids))
    step = jax.jit(forward)
    for t in range(prompt, prompt + steps):
        slots = jnp.asarray([t, t + 2], jnp.int32)
        hidden, cache = step(model, jnp.asarray(ids[:, t:t + 1]), jnp.asarray(positions[:, t:t + 1]), kv_mask, cache,
                             slots)
        np.testing.assert_allclose(np.asarray(logits(model, hidden))[:, 0], full[:, t], atol=1e-4, err_msg=f"{t}")


# --- loading --------------------------------------------------------------------------------


def _params_equal(a, b):
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_sharded_and_prefixless_checkpoints_give_identical_params(tmp_path):
    torch_model = build(tmp_path / "single", "phi3_partial_window5")
    reference = jaxgen.from_pretrained(tmp_path / "single")
    torch_model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    _params_equal(reference, jaxgen.from_pretrained(tmp_path / "sharded"))
    tied = build(tmp_path / "tied", "llama3_gqa4_head_dim_tied")  # the base model: no "model." prefix, no head
    tied.model.save_pretrained(tmp_path / "base")
    shutil.copy(tmp_path / "tied" / "config.json", tmp_path / "base")
    _params_equal(jaxgen.from_pretrained(tmp_path / "tied"), jaxgen.from_pretrained(tmp_path / "base"))


def test_untied_head_is_its_own_tensor_and_eos_lists_stay_whole(tmp_path):
    build(tmp_path, "llama_gqa2_biases_untied", eos_token_id=[EOS, 7])
    model = jaxgen.from_pretrained(tmp_path)
    assert not np.allclose(model.params["lm_head"], model.params["embed"])
    assert model.config.eos_token_id == (EOS, 7)
    assert model.generation_config["eos_token_id"] == (EOS, 7)


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **changes}))


@pytest.mark.parametrize("changes, message", [
    (dict(hidden_size=64), r"has shape \(96, 32\) but config.json implies \(96, 64\)"),
    (dict(model_type="mixtral"), "model_type=.mixtral. is not supported; jaxgen runs gemma, .*, gpt2, llama, mistral"),
    (dict(hidden_act="mish"), "hidden_act='mish' is not supported"),
    (dict(rope_parameters=dict(rope_type="mrope", rope_theta=1e4)), "rope_type='mrope'; jaxgen implements"),
    (dict(num_hidden_layers=1, layer_types=["full_attention"]), r"not part of qwen3 as configured \(e.g. \['model.l"),
    (dict(num_hidden_layers=1), "config.json is not a valid qwen3 config"),
])
def test_checkpoint_errors(tmp_path, changes, message):
    build(tmp_path, "qwen3_qk_norm_linear_bias")
    _edit_config(tmp_path, **changes)
    with pytest.raises(jaxgen.CheckpointError, match=message):
        jaxgen.from_pretrained(tmp_path)


def test_a_bfloat16_checkpoint_loads_in_about_its_own_memory(tmp_path):
    """Tensors are read one at a time into buffers JAX adopts without copying: loading a 51 MB
    bfloat16 checkpoint as bfloat16 raises the peak memory of a process (JAX and transformers
    already started) by under 1.3x its size (`scripts/load_memory.py --warm`)."""
    import subprocess
    import sys
    from pathlib import Path

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                                      num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=True)
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path)
    script = Path(__file__).resolve().parents[1] / "scripts" / "load_memory.py"
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), "--measure", "--warm"], capture_output=True,
                          text=True, check=True, timeout=300)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["dtype"] == "bfloat16" and result["checkpoint_bytes"] > 50e6
    assert result["peak_over_checkpoint"] < 1.3, result


def test_a_partial_rotary_factor_that_llama_s_default_rope_ignores(tmp_path):
    """transformers' Llama applies its default rotary embedding to the whole head whatever
    ``partial_rotary_factor`` says; jaxgen loads such a config alike (other rope types refuse it)."""
    torch_model = build(tmp_path, "llama_gqa2_biases_untied", partial_rotary_factor=0.5)
    ids = np.arange(3, 12)[None]
    with torch.no_grad():
        ref = torch_model(input_ids=torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(jaxgen.from_pretrained(tmp_path)(ids)), ref, atol=1e-4, rtol=0)
