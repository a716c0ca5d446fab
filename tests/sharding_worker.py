"""Runs in a subprocess with 8 CPU devices (see test_sharding.py); prints JSON results.

Not collected by pytest: the device count must be set before jax is imported.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile

assert "xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", "")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxgen  # noqa: E402
from jaxgen.decoding import api  # noqa: E402
from jaxgen.decoding import args as decode_args  # noqa: E402
from tests.conftest import build_checkpoint, left_padded_batch  # noqa: E402
from tests.test_sharding import GQA_STRATEGIES, MESH_STRATEGIES  # noqa: E402

CONFIG = dict(vocab_size=96, n_positions=64, n_embd=64, n_layer=2, n_head=8, initializer_range=0.4,
              bos_token_id=1, eos_token_id=2)
MESHES = {"8x1": (8, 1), "4x2": (4, 2), "1x8": (1, 8)}
KW = dict(max_new_tokens=8, eos_token_id=2, pad_token_id=0, output_scores=True)
STRATEGIES = {"greedy": dict(), "beam": dict(num_beams=3, num_return_sequences=2),
              "sample": dict(do_sample=True, top_k=20, top_p=0.9)}


def mesh_of(shape):
    return Mesh(np.array(jax.devices()).reshape(shape), ("data", "model"))


def summary(out):
    hf = out.trim()
    return {"sequences": hf.sequences.tolist(), "scores": [s.tolist() for s in hf.scores],
            "sequences_scores": None if hf.sequences_scores is None else hf.sequences_scores.tolist()}


def main():
    assert len(jax.devices()) == 8
    path = tempfile.mkdtemp()
    build_checkpoint(path, seed=0, eos_boost=2.0, **CONFIG)
    model = jaxgen.from_pretrained(path)
    ids, mask = left_padded_batch(np.random.default_rng(0), 8, 6, CONFIG["vocab_size"], [0, 2, 4, 1, 0, 3, 5, 2])
    results = {"single": {}, "meshes": {}, "param_specs": {}, "all_gathers": [], "collective_permutes": [],
               "errors": {}}
    for name, extra in STRATEGIES.items():
        key = {"key": jax.random.key(3)} if extra.get("do_sample") else {}
        results["single"][name] = summary(jaxgen.generate(model, ids, mask, **KW, **extra, **key))
    for mesh_name, shape in MESHES.items():
        mesh = mesh_of(shape)
        sharded = jaxgen.shard(model, mesh)
        results["param_specs"][mesh_name] = {
            "c_attn": str(sharded.params["layers"][0]["attn"]["qkv"]["kernel"].sharding.spec),
            "c_proj": str(sharded.params["layers"][0]["attn"]["out"]["kernel"].sharding.spec),
            "c_fc": str(sharded.params["layers"][0]["mlp"]["up"]["kernel"].sharding.spec),
            "wte": str(sharded.params["embed"].sharding.spec),
            "c_attn_shard_shape": list(sharded.params["layers"][0]["attn"]["qkv"]["kernel"]
                                       .addressable_shards[0].data.shape),
        }
        results["meshes"][mesh_name] = {}
        for name in MESH_STRATEGIES[mesh_name]:
            extra = STRATEGIES[name]
            key = {"key": jax.random.key(3)} if extra.get("do_sample") else {}
            out = jaxgen.generate(sharded, ids, mask, mesh=mesh, **KW, **extra, **key)
            results["meshes"][mesh_name][name] = summary(out)

    # Meshes from jax.make_mesh, as in docs/devices.md: Explicit axes (the default in recent JAX).
    explicit_mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    results["make_mesh"] = {}
    for mesh_name, mesh in (("default", jax.make_mesh((4, 2), ("data", "model"))), ("explicit", explicit_mesh)):
        sharded = jaxgen.shard(model, mesh)
        out = jaxgen.generate(sharded, ids, mask, mesh=mesh, **KW, **STRATEGIES["beam"])
        results["make_mesh"][mesh_name] = {"axis_types": [t.name for t in mesh.axis_types], **summary(out)}

    # Constrained beam search on the 4x2 mesh (its constraint states split with the rows).
    mesh = mesh_of((4, 2))
    constrained = dict(KW, **STRATEGIES["beam"], force_words_ids=[[5, 6], [[7], [8, 9]]])
    results["constrained"] = [summary(jaxgen.generate(m, ids, mask, **constrained, **mesh_kw))
                              for m, mesh_kw in ((model, {}), (jaxgen.shard(model, mesh), {"mesh": mesh}))]

    # One prompt, its heads split over 8 devices (a one-row cache has no batch dim).
    mesh = mesh_of((1, 8))
    sharded = jaxgen.shard(model, mesh)
    results["one_row"] = {}
    for name, extra in STRATEGIES.items():
        key = {"key": jax.random.key(3)} if extra.get("do_sample") else {}
        results["one_row"][name] = [summary(jaxgen.generate(m, ids[:1], mask[:1], **KW, **extra, **key, **mesh_kw))
                                    for m, mesh_kw in ((model, {}), (sharded, {"mesh": mesh}))]

    # The compiled program on the 4x2 mesh: which all-gathers remain, and of what shapes; and
    # whether rows move between devices (beam: 6 rows a device, padded to 8 for the CPU GEMM).
    mesh = mesh_of((4, 2))
    sharded = jaxgen.shard(model, mesh)
    for name, extra in (("greedy", STRATEGIES["greedy"]), ("beam", STRATEGIES["beam"])):
        req = decode_args.parse(sharded, ids, mask, dict(KW, mesh=mesh, **extra))
        api._place(sharded, req)
        hlo = api._decode.lower(sharded, *api._operands(req), spec=req.spec).compile().as_text()
        for shape in re.findall(r"= (\w+\[[\d,]*\])[^\n]*? all-gather\(", hlo):
            results["all_gathers"].append([name, shape])
        for shape in re.findall(r"= (\w+\[[\d,]*\])[^\n]*? collective-permute(?:-start)?\(", hlo):
            results["collective_permutes"].append([name, shape])

    # Errors.
    def error_of(fn):
        try:
            fn()
        except ValueError as e:
            return str(e)
        return None

    odd_ids, odd_mask = ids[:6], mask[:6]
    results["errors"]["batch"] = error_of(lambda: jaxgen.generate(model, odd_ids, odd_mask, mesh=mesh_of((4, 2)), **KW))
    results["errors"]["heads"] = error_of(lambda: jaxgen.shard(
        jaxgen.from_pretrained(_three_heads()), mesh_of((2, 4))))
    results["errors"]["axes"] = error_of(lambda: jaxgen.generate(
        model, ids, mask, mesh=Mesh(np.array(jax.devices()).reshape(4, 2), ("x", "y")), **KW))

    def in_explicit_context():
        with jax.set_mesh(explicit_mesh):
            return jaxgen.generate(model, ids, mask, mesh=explicit_mesh, **KW)

    results["errors"]["explicit_context"] = error_of(in_explicit_context)
    placed = [jax.device_put(x, NamedSharding(explicit_mesh, P("data", None))) for x in (ids, mask)]
    results["errors"]["explicit_inputs"] = error_of(
        lambda: jax.jit(lambda m, i, a: jaxgen.generate(m, i, a, mesh=explicit_mesh, **KW))(model, *placed))
    results["errors"]["explicit_inputs_without_mesh"] = error_of(
        lambda: jax.jit(lambda m, i, a: jaxgen.generate(m, i, a, **KW))(model, *placed))
    results["errors"]["explicit_inputs_to_the_forward"] = error_of(lambda: jax.jit(lambda m, i: m(i))(model, placed[0]))
    # outside jit the forward reads such inputs as any others
    results["explicit_forward_equal"] = bool(np.array_equal(np.asarray(model(*placed)), np.asarray(model(ids, mask))))
    results["errors"]["not_a_mesh"] = error_of(lambda: jaxgen.generate(model, ids, mask, mesh="4x2", **KW))
    results["gqa"] = gqa_family()
    results["gemma"] = gemma_family()
    json.dump(results, sys.stdout)


def gemma_family():
    """Gemma 2 (sliding layers kept in rings, soft-caps, 2 kv heads) on a 4x2 mesh."""
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    path = tempfile.mkdtemp()
    torch.manual_seed(0)
    Gemma2ForCausalLM(Gemma2Config(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=4,
                                   attn_logit_softcapping=5.0, final_logit_softcapping=10.0, initializer_range=0.3,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=0)).save_pretrained(path)
    model = jaxgen.from_pretrained(path)
    ids, mask = left_padded_batch(np.random.default_rng(2), 8, 6, 96, [0, 2, 4, 1, 0, 3, 5, 2])
    mesh = mesh_of((4, 2))
    sharded = jaxgen.shard(model, mesh)
    return {name: [summary(jaxgen.generate(m, ids, mask, **KW, **STRATEGIES[name], **mesh_kw))
                   for m, mesh_kw in ((model, {}), (sharded, {"mesh": mesh}))] for name in ("greedy", "beam")}


def gqa_family():
    """A Llama with 8 query and 2 kv heads: split by kv heads (4x2 mesh), and with each kv head
    replicated on two devices (2x4 mesh), placed by `jaxgen.shard` or straight by the loader."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tempfile.mkdtemp()
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=8, num_key_value_heads=2, initializer_range=0.3,
                                 bos_token_id=1, eos_token_id=2)).save_pretrained(path)
    model = jaxgen.from_pretrained(path)
    ids, mask = left_padded_batch(np.random.default_rng(1), 8, 6, 96, [0, 2, 4, 1, 0, 3, 5, 2])
    out = {"single": {}, "meshes": {}, "kv_heads": {}, "qkv_shard_shape": {}}
    for name in ("greedy", "beam"):
        out["single"][name] = summary(jaxgen.generate(model, ids, mask, **KW, **STRATEGIES[name]))
    for mesh_name in ("4x2", "2x4"):
        mesh = mesh_of(tuple(int(n) for n in mesh_name.split("x")))
        for how, placed in (("shard", jaxgen.shard(model, mesh)), ("load", jaxgen.from_pretrained(path, mesh=mesh))):
            key = f"{mesh_name}/{how}"
            out["kv_heads"][key] = placed.config.n_kv_heads
            out["qkv_shard_shape"][key] = list(placed.params["layers"][0]["attn"]["qkv"]["kernel"]
                                               .addressable_shards[0].data.shape)
            out["meshes"][key] = {name: summary(jaxgen.generate(placed, ids, mask, mesh=mesh, **KW, **STRATEGIES[name]))
                                  for name in GQA_STRATEGIES[key]}
    # int8 weights: each kv head replicated on two devices (2x4), quantized then split, or
    # quantized by the loader straight onto the mesh.
    mesh = mesh_of((2, 4))
    quantized = jaxgen.quantize(model)
    out["int8"] = {"single": summary(jaxgen.generate(quantized, ids, mask, **KW, **STRATEGIES["greedy"]))}
    for how, placed in (("shard", jaxgen.shard(quantized, mesh)),
                        ("load", jaxgen.from_pretrained(path, mesh=mesh, quantize="int8"))):
        out["int8"][how] = summary(jaxgen.generate(placed, ids, mask, mesh=mesh, **KW, **STRATEGIES["greedy"]))
        out["int8"][f"{how}_specs"] = [str(placed.params["layers"][0][m][p]["kernel"].scale.sharding.spec)
                                       for m, p in (("attn", "qkv"), ("attn", "out"), ("mlp", "gate_up"))]
    return out


def _three_heads():
    path = tempfile.mkdtemp()
    build_checkpoint(path, seed=0, **{**CONFIG, "n_head": 3, "n_embd": 36})
    return path


if __name__ == "__main__":
    main()
