"""The JAX GPT-2 against transformers' GPT2LMHeadModel, and the checkpoint loader."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertModel, GenerationConfig, GPT2LMHeadModel, GPT2Model

import jaxgen
from jaxgen.models.model import forward, logits, positions_from_mask
from tests.conftest import build_checkpoint, left_padded_batch

BASE = dict(vocab_size=80, n_positions=48, n_embd=32, n_layer=2, n_head=4, initializer_range=0.2,
            bos_token_id=1, eos_token_id=2)
CONFIGS = {
    "defaults": {},
    "inner_gelu_eps_layer_scaling": dict(n_inner=40, activation_function="gelu", layer_norm_epsilon=1e-3,
                                         scale_attn_by_inverse_layer_idx=True),
    "upcast_unscaled_relu": dict(reorder_and_upcast_attn=True, scale_attn_weights=False,
                                 activation_function="relu", n_layer=3),
    "untied_head_silu": dict(tie_word_embeddings=False, activation_function="silu", n_head=2,
                             scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    torch_model = build_checkpoint(path, seed=1, **{**BASE, **CONFIGS[request.param]})
    return torch_model, jaxgen.from_pretrained(path), path


def _torch_logits(torch_model, ids, mask):
    pos = torch.tensor(np.asarray(positions_from_mask(jnp.asarray(mask))))
    with torch.no_grad():
        out = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=pos)
    return out.logits.numpy()


def test_logits_match_pytorch_on_left_padded_batch(pair):
    torch_model, model, _ = pair
    ids, mask = left_padded_batch(np.random.default_rng(0), 4, 11, BASE["vocab_size"], pads=[0, 3, 7, 1], low=0)
    ours = np.asarray(model(ids, mask))
    ref = _torch_logits(torch_model, ids, mask)
    real = mask.astype(bool)
    assert ours.dtype == np.float32 and ours.shape == (4, 11, BASE["vocab_size"])
    np.testing.assert_allclose(ours[real], ref[real], atol=1e-4, rtol=0)
    assert np.abs(ref[real]).max() > 1.0  # non-trivial logits


def test_untied_head_is_really_untied(tmp_path):
    build_checkpoint(tmp_path, seed=1, **{**BASE, "tie_word_embeddings": False})
    params = jaxgen.from_pretrained(tmp_path).params
    assert "lm_head" in params and not np.allclose(params["lm_head"], params["embed"])


@pytest.mark.parametrize("batch", [3, 1])
def test_prefill_then_cached_steps_equal_full_forward(pair, batch):
    """(At batch 1 the cache is stored without its batch dim.)"""
    _, model, _ = pair
    ids, mask = left_padded_batch(np.random.default_rng(1), batch, 16, BASE["vocab_size"], pads=[0, 2, 5][:batch],
                                  low=0)
    prompt = 6
    full = np.asarray(model(ids, mask))
    positions = positions_from_mask(jnp.asarray(mask))
    kv_mask = jnp.asarray(mask, bool)
    cache = model.init_cache(batch, 16)
    assert cache.batch == batch and cache.values[0].ndim == (4 if batch > 1 else 3)
    hidden, cache = forward(model, jnp.asarray(ids[:, :prompt]), positions[:, :prompt], kv_mask, cache, 0)
    np.testing.assert_allclose(np.asarray(logits(model, hidden))[:, -1], full[:, prompt - 1], atol=1e-4)
    step = jax.jit(forward)
    for t in range(prompt, prompt + 10):
        hidden, cache = step(model, jnp.asarray(ids[:, t:t + 1]), positions[:, t:t + 1], kv_mask, cache, t)
        np.testing.assert_allclose(np.asarray(logits(model, hidden))[:, 0], full[:, t], atol=1e-4,
                                   err_msg=f"cached step at position {t}")


@pytest.mark.parametrize("batch", [2, 1])
def test_grouped_cache_rows_read_their_ancestors_slots(pair, batch):
    """Beam search's cache: each row of a group writes its own slots and reads every slot from
    the row ``kv_mask`` names; with random ancestries, each row's logits equal a full forward
    over the sequence it stands for."""
    _, model, _ = pair
    rng = np.random.default_rng(4)
    group, prompt, steps, vocab = 3, 5, 4, BASE["vocab_size"]
    ids, mask = left_padded_batch(rng, batch, prompt, vocab, pads=[0, 2][:batch], low=0)
    total = prompt + steps
    kv_mask = np.concatenate([mask, np.ones((batch, steps), mask.dtype)], 1).astype(bool)
    positions = positions_from_mask(jnp.asarray(mask))
    _, prompt_kv = forward(model, jnp.asarray(ids), positions, jnp.asarray(mask))
    cache = model.init_cache(batch, total, group, prompt).fill_prompt(prompt_kv)
    seqs, seq_mask = np.repeat(ids, group, 0), np.repeat(mask, group, 0)  # what each row stands for
    ancestry = np.zeros((batch, group, total), np.int64)  # the prompt lives in row 0
    next_pos = np.repeat(np.asarray(positions[:, -1]) + 1, group)
    step = jax.jit(forward)
    for t in range(steps):
        parents = rng.integers(0, group, (batch, group))
        tokens = rng.integers(0, vocab, batch * group)
        ancestry = np.take_along_axis(ancestry, parents[:, :, None], 1)
        ancestry[:, :, prompt + t] = np.arange(group)
        parent_rows = (np.arange(batch)[:, None] * group + parents).reshape(-1)
        seqs = np.concatenate([seqs[parent_rows], tokens[:, None]], 1)
        seq_mask = np.concatenate([seq_mask[parent_rows], np.ones((batch * group, 1), mask.dtype)], 1)
        reads = kv_mask[:, None, :, None] & (ancestry[..., None] == np.arange(group))  # [batch, g, slot, r]
        hidden, cache = step(model, jnp.asarray(tokens[:, None]), jnp.asarray(next_pos[:, None]),
                             jnp.asarray(reads.reshape(batch * group, total, group)), cache, prompt + t)
        next_pos += 1
        # the full forward of every step at one length (right padding does not reach back): one compile
        tail = ((0, 0), (0, steps - 1 - t))
        full = model(np.pad(seqs, tail), np.pad(seq_mask, tail))
        np.testing.assert_allclose(np.asarray(logits(model, hidden))[:, 0], np.asarray(full)[:, prompt + t],
                                   atol=1e-4, err_msg=f"step {t}")
    with pytest.raises(ValueError, match="group=3 needs kv_mask"):
        forward(model, jnp.asarray(tokens[:, None]), jnp.asarray(next_pos[:, None]), jnp.ones((6, total), bool),
                cache, total - 1)


@pytest.mark.parametrize("dtype, tol", [(jnp.bfloat16, 0.04), (jnp.float16, 0.005)])
def test_half_precision_stays_within_documented_tolerance(pair, dtype, tol):
    """bfloat16 / float16 params and activations; softmax, LayerNorm and logits in float32.
    Documented tolerance: max |logit error| <= tol * max |logit| (4% bf16, 0.5% fp16;
    measured 0.8-1.7% and 0.13-0.25% on these configs)."""
    torch_model, _, path = pair
    model = jaxgen.from_pretrained(path, dtype=dtype)
    assert model.params["embed"].dtype == dtype
    ids, mask = left_padded_batch(np.random.default_rng(2), 2, 9, BASE["vocab_size"], pads=[0, 4], low=0)
    ours = np.asarray(model(ids, mask))
    assert ours.dtype == np.float32
    ref = _torch_logits(torch_model, ids, mask)
    real = mask.astype(bool)
    err = np.abs(ours[real] - ref[real]).max()
    assert err <= tol * np.abs(ref[real]).max(), err
    assert (ours[real].argmax(-1) == ref[real].argmax(-1)).mean() > 0.8
    # One token of one row: every matmul has a single row (bfloat16 on CPU pads it to two).
    one = np.asarray(model(ids[:1, :1], mask[:1, :1]))[0, 0]
    ref_one = _torch_logits(torch_model, ids[:1, :1], mask[:1, :1])[0, 0]
    assert np.abs(one - ref_one).max() <= tol * np.abs(ref_one).max()


def _params_equal(a, b):
    leaves_a, tree_a = jax.tree.flatten(a.params)
    leaves_b, tree_b = jax.tree.flatten(b.params)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_safetensors_sharded_bin_and_prefixless_give_identical_params(tmp_path):
    torch_model = build_checkpoint(tmp_path / "single", seed=3, **BASE)
    reference = jaxgen.from_pretrained(tmp_path / "single")

    torch_model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    _params_equal(reference, jaxgen.from_pretrained(tmp_path / "sharded"))

    (tmp_path / "bin").mkdir()
    shutil.copy(tmp_path / "single" / "config.json", tmp_path / "bin")
    torch.save(torch_model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    _params_equal(reference, jaxgen.from_pretrained(tmp_path / "bin"))

    # Base-model checkpoint: no "transformer." prefix and no lm_head (tied).
    base = GPT2Model(torch_model.config)
    base.load_state_dict(torch_model.transformer.state_dict())
    base.save_pretrained(tmp_path / "base")
    _params_equal(reference, jaxgen.from_pretrained(tmp_path / "base"))


def test_model_is_a_pytree_usable_under_jit(tmp_path):
    build_checkpoint(tmp_path, seed=0, **BASE)
    model = jaxgen.from_pretrained(tmp_path)
    leaves = jax.tree.leaves(model)
    assert len(leaves) == 4 + 12 * BASE["n_layer"]
    doubled = jax.tree.map(lambda x: x * 1, model)
    assert doubled.config == model.config
    ids = np.arange(6)[None] % BASE["vocab_size"]
    np.testing.assert_allclose(np.asarray(jax.jit(lambda m, i: m(i))(model, ids)), np.asarray(model(ids)), atol=1e-5)


# --- bad input -------------------------------------------------------------------------------


def _copy_config(src, dst, **changes):
    dst.mkdir(exist_ok=True)
    config = json.loads((src / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("good")
    build_checkpoint(path, seed=0, **BASE)
    return path


def test_missing_directory(tmp_path):
    with pytest.raises(jaxgen.CheckpointError, match="does not exist"):
        jaxgen.from_pretrained(tmp_path / "nope")


def test_directory_without_weights(tmp_path, good_dir):
    _copy_config(good_dir, tmp_path / "empty")
    with pytest.raises(jaxgen.CheckpointError, match="no weights file"):
        jaxgen.from_pretrained(tmp_path / "empty")


def test_directory_without_config(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(jaxgen.CheckpointError, match="no config.json"):
        jaxgen.from_pretrained(tmp_path / "x")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "bad_header"])
def test_corrupted_safetensors(tmp_path, good_dir, damage):
    bad = tmp_path / "bad"
    _copy_config(good_dir, bad)
    data = (good_dir / "model.safetensors").read_bytes()
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = b"\x00\x01" * 100
    else:
        data = data[:8] + b"{not json" + data[17:]
    (bad / "model.safetensors").write_bytes(data)
    with pytest.raises(jaxgen.CheckpointError, match="not a valid safetensors file"):
        jaxgen.from_pretrained(bad)


def test_shapes_disagreeing_with_config(tmp_path, good_dir):
    bad = tmp_path / "bad"
    _copy_config(good_dir, bad, n_embd=64)
    shutil.copy(good_dir / "model.safetensors", bad)
    with pytest.raises(jaxgen.CheckpointError, match=r"has shape .* config.json implies"):
        jaxgen.from_pretrained(bad)


def test_unsupported_model_type_is_rejected(tmp_path):
    BertModel(BertConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2)).save_pretrained(tmp_path)
    with pytest.raises(jaxgen.CheckpointError, match="model_type='bert' is not supported; jaxgen runs .*gpt2, llama"):
        jaxgen.from_pretrained(tmp_path)


def test_unsupported_config_options(tmp_path, good_dir):
    _copy_config(good_dir, tmp_path / "a", activation_function="mish")
    with pytest.raises(jaxgen.CheckpointError, match="activation_function='mish'"):
        jaxgen.from_pretrained(tmp_path / "a")
    _copy_config(good_dir, tmp_path / "b", add_cross_attention=True)
    with pytest.raises(jaxgen.CheckpointError, match="add_cross_attention"):
        jaxgen.from_pretrained(tmp_path / "b")


def test_bad_dtype(good_dir):
    with pytest.raises(ValueError, match="dtype="):
        jaxgen.from_pretrained(good_dir, dtype=jnp.int8)


def test_hub_id_offline_gives_one_clear_sentence(tmp_path, monkeypatch):
    """A hub id that is not cached, with the hub unreachable, fails with advice, not a traceback."""
    with pytest.raises(jaxgen.CheckpointError, match="local Hugging Face cache.*local copy"):
        jaxgen.from_pretrained("gpt2", cache_dir=tmp_path, local_files_only=True)


@pytest.mark.parametrize("generation_config", [False, True])
def test_hub_id_resolves_through_the_local_cache(tmp_path, good_dir, generation_config):
    """The real hub path: a snapshot in the huggingface_hub cache layout loads offline, with or
    without the optional generation_config.json (its settings then come from config.json)."""
    repo = tmp_path / "models--someone--tiny-gpt2"
    commit = "0" * 40
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(good_dir / name, snap / name)
    if generation_config:
        (snap / "generation_config.json").write_text(json.dumps({"num_beams": 4, "pad_token_id": 0}))
    model = jaxgen.from_pretrained("someone/tiny-gpt2", cache_dir=tmp_path, local_files_only=True)
    _params_equal(model, jaxgen.from_pretrained(good_dir))
    eos = {"eos_token_id": json.loads((good_dir / "config.json").read_text())["eos_token_id"]}
    assert dict(model.generation_config) == ({"num_beams": 4, "pad_token_id": 0, "eos_token_id": ()}
                                             if generation_config else eos)


def test_transformers_loading_arguments(tmp_path, good_dir):
    """subfolder, variant, use_safetensors, torch_dtype and dtype spellings, generation_config, and
    the arguments that cannot change the result, as transformers' from_pretrained takes them;
    others raise naming themselves."""
    reference = jaxgen.from_pretrained(good_dir)
    nested = tmp_path / "repo" / "llm"
    shutil.copytree(good_dir, nested)
    _params_equal(reference, jaxgen.from_pretrained(tmp_path / "repo", subfolder="llm", trust_remote_code=True,
                                                    device_map="auto", low_cpu_mem_usage=True))
    variant = tmp_path / "variant"
    _copy_config(good_dir, variant)
    shutil.copy(good_dir / "model.safetensors", variant / "model.fp16.safetensors")
    _params_equal(reference, jaxgen.from_pretrained(variant, variant="fp16"))
    with pytest.raises(jaxgen.CheckpointError, match="no weights file; looked for model.safetensors, "
                                                     "model.safetensors.index.json$"):
        jaxgen.from_pretrained(variant, use_safetensors=True)
    with pytest.raises(jaxgen.CheckpointError, match="looked for pytorch_model.bin, pytorch_model.bin.index.json$"):
        jaxgen.from_pretrained(good_dir, use_safetensors=False)
    for dtype in (torch.bfloat16, "torch.bfloat16", "bf16", jnp.bfloat16):
        assert jaxgen.from_pretrained(good_dir, dtype=dtype).config.dtype == "bfloat16"
    assert jaxgen.from_pretrained(good_dir, dtype="half").config.dtype == "float16"
    with pytest.warns(UserWarning, match="torch_dtype is deprecated"):
        assert jaxgen.from_pretrained(good_dir, torch_dtype=torch.float16).config.dtype == "float16"
    model = jaxgen.from_pretrained(good_dir, generation_config=GenerationConfig(num_beams=3, eos_token_id=[2, 5]))
    assert dict(model.generation_config) == {"num_beams": 3, "eos_token_id": (2, 5)}
    for bad, message in ((dict(quantization_config={}), "quantization_config=<dict>"),
                         (dict(attn_implementation="flash_attention_2"), "attn_implementation='flash_attention_2'"),
                         (dict(dtype={"": "bfloat16"}), "one dtype for the whole model")):
        with pytest.raises(ValueError, match=message):
            jaxgen.from_pretrained(good_dir, **bad)


def test_tied_config_with_its_own_head(tmp_path, good_dir):
    """transformers 5.x: a head stored beside a tied embedding, with other values, unties them
    (with a warning; its config still says tied, which DoLa's choice of layers reads); a head
    stored without the embedding is the embedding too."""
    state = load_file(good_dir / "model.safetensors")
    rng = np.random.default_rng(0)
    own = tmp_path / "own"
    _copy_config(good_dir, own)
    head = torch.tensor(rng.standard_normal((BASE["vocab_size"], BASE["n_embd"]), np.float32))
    save_file({**state, "lm_head.weight": head}, own / "model.safetensors", metadata={"format": "pt"})
    ids = np.arange(3, 9)[None]
    with pytest.warns(UserWarning, match="not tied"):
        model = jaxgen.from_pretrained(own)
    torch_model = GPT2LMHeadModel.from_pretrained(own)
    np.testing.assert_allclose(np.asarray(model(ids)), _torch_logits(torch_model, ids, np.ones_like(ids)), atol=1e-4,
                               rtol=0)
    assert model.config.tie_word_embeddings and torch_model.config.tie_word_embeddings and "lm_head" in model.params
    only = tmp_path / "only"
    _copy_config(good_dir, only)
    embed = state.pop("transformer.wte.weight")
    save_file({**state, "lm_head.weight": embed}, only / "model.safetensors", metadata={"format": "pt"})
    _params_equal(jaxgen.from_pretrained(good_dir), jaxgen.from_pretrained(only))


def test_malformed_files_fail_naming_them(tmp_path, good_dir):
    cases = {
        "config_list": ({"config.json": "[1, 2]"}, "config.json: expected a JSON object"),
        "index_list": ({"model.safetensors.index.json": "[]"}, "model.safetensors.index.json: expected a JSON"),
        "outside": ({"model.safetensors.index.json": json.dumps({"weight_map": {"a": "../good/model.safetensors"}})},
                    "points outside"),
    }
    for name, (files, message) in cases.items():
        d = tmp_path / name
        _copy_config(good_dir, d)
        for filename, text in files.items():
            (d / filename).write_text(text)
        with pytest.raises(jaxgen.CheckpointError, match=message):
            jaxgen.from_pretrained(d)
    missing = tmp_path / "missing"
    _copy_config(good_dir, missing)
    state = load_file(good_dir / "model.safetensors")
    del state["transformer.h.0.mlp.c_fc.weight"]
    save_file(state, missing / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(jaxgen.CheckpointError, match=f"^'{missing}': checkpoint lacks tensor 'transformer.h.0.mlp"):
        jaxgen.from_pretrained(missing)
    for repo in ("org/na me", "bad id!"):
        with pytest.raises(jaxgen.CheckpointError, match="nor a valid hub id"):
            jaxgen.from_pretrained(repo, local_files_only=True)
    d = tmp_path / "generation"
    shutil.copytree(good_dir, d)
    (d / "generation_config.json").write_text("{not json")
    with pytest.warns(UserWarning, match="using the generation fields of config.json"):
        model = jaxgen.from_pretrained(d)
    assert dict(model.generation_config) == {"eos_token_id": BASE["eos_token_id"]}


def test_dtype_auto_without_a_config_dtype_reads_the_weights(tmp_path, good_dir):
    d = tmp_path / "bf16"
    _copy_config(good_dir, d)
    state = {k: v.to(torch.bfloat16) for k, v in load_file(good_dir / "model.safetensors").items()}
    save_file(state, d / "model.safetensors", metadata={"format": "pt"})
    config = {k: v for k, v in json.loads((d / "config.json").read_text()).items() if k not in ("dtype", "torch_dtype")}
    (d / "config.json").write_text(json.dumps(config))
    assert jaxgen.from_pretrained(d).config.dtype == "bfloat16"
