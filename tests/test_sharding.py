"""Data- and tensor-parallel decoding on 8 CPU devices (in a subprocess, so that the other tests
keep one device): meshes 8x1, 4x2, 1x8 give the single-device sequences and scores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import TEST_XLA_FLAGS

EIGHT_DEVICES = {**os.environ, "XLA_FLAGS": f"{TEST_XLA_FLAGS} --xla_force_host_platform_device_count=8",
                 "TRANSFORMERS_VERBOSITY": "error"}

# the strategies run on each mesh: rows split alone (beams padded per device, sampling's keys per
# row), both axes, heads split alone (test_one_prompt_split_by_heads takes each strategy there)
MESH_STRATEGIES = {"8x1": ("beam", "sample"), "4x2": ("greedy", "beam", "sample"), "1x8": ("greedy",)}
# the GQA Llama: greedy on every placement, beams on one of each mesh
GQA_STRATEGIES = {"4x2/shard": ("greedy", "beam"), "4x2/load": ("greedy",), "2x4/shard": ("greedy",),
                  "2x4/load": ("greedy", "beam")}
WEIGHT_SHAPES = {"f32[8,3,8,64]", "f32[64,192]", "f32[64,64]", "f32[64,256]", "f32[256,64]", "f32[64,96]"}


@pytest.fixture(scope="module")
def results():
    proc = subprocess.run([sys.executable, "-m", "tests.sharding_worker"], capture_output=True, text=True,
                          env=EIGHT_DEVICES, cwd=Path(__file__).resolve().parents[1], timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def _assert_same(ours, single, strategy):
    assert ours["sequences"] == single["sequences"]
    assert len(ours["scores"]) == len(single["scores"])
    for a, b in zip(ours["scores"], single["scores"]):
        a, b = np.array(a), np.array(b)
        assert (np.isneginf(a) == np.isneginf(b)).all()
        np.testing.assert_allclose(a[np.isfinite(b)], b[np.isfinite(b)], atol=1e-4)
    if strategy == "beam":
        np.testing.assert_allclose(ours["sequences_scores"], single["sequences_scores"], atol=1e-4)


@pytest.mark.parametrize("mesh, strategy", [(mesh, strategy) for mesh, strategies in MESH_STRATEGIES.items()
                                            for strategy in strategies])
def test_mesh_equals_single_device(results, mesh, strategy):
    _assert_same(results["meshes"][mesh][strategy], results["single"][strategy], strategy)


@pytest.mark.parametrize("mesh", ["default", "explicit"])
def test_make_mesh_with_explicit_axes_equals_single_device(results, mesh):
    ours = results["make_mesh"][mesh]
    if mesh == "explicit":
        assert ours["axis_types"] == ["Explicit", "Explicit"]
    _assert_same(ours, results["single"]["beam"], "beam")


@pytest.mark.parametrize("strategy", ["greedy", "beam", "sample"])
def test_one_prompt_split_by_heads_equals_single_device(results, strategy):
    single, ours = results["one_row"][strategy]
    _assert_same(ours, single, strategy)


def test_params_are_really_split(results):
    specs = results["param_specs"]
    assert specs["4x2"]["c_attn"] == "P('model', None, None, None)" and specs["4x2"]["c_proj"] == "P(None, 'model')"
    assert specs["4x2"]["c_fc"] == "P('model', None)" and specs["4x2"]["wte"] == "P()"
    assert specs["4x2"]["c_attn_shard_shape"] == [4, 3, 8, 64]  # 4 of 8 heads per device
    assert specs["1x8"]["c_attn_shard_shape"] == [1, 3, 8, 64]
    assert specs["8x1"]["c_attn_shard_shape"] == [8, 3, 8, 64]


def test_compiled_program_gathers_no_whole_weight(results):
    gathered = {shape for _, shape in results["all_gathers"]}
    assert not gathered & WEIGHT_SHAPES, gathered


def test_compiled_program_moves_no_row_between_devices(results):
    """Each device pads its own rows for XLA:CPU's GEMM (`kernels.matmul.project`'s ``row_shards``): the
    beam program's 6 rows a device become 8 there, with no collective-permute."""
    assert not results["collective_permutes"], results["collective_permutes"][:3]


def test_clear_errors(results):
    errors = results["errors"]
    assert "divisible by the 4 devices of data_axis='data'" in errors["batch"]
    assert "n_heads=3" in errors["heads"] and "divisible" in errors["heads"]
    assert "not an axis of the mesh" in errors["axes"]
    assert "must be a jax.sharding.Mesh" in errors["not_a_mesh"]
    assert errors["explicit_context"].startswith("mesh cannot be used") and "jax.set_mesh" in errors["explicit_context"]
    for call in ("explicit_inputs", "explicit_inputs_without_mesh", "explicit_inputs_to_the_forward"):
        assert errors[call].startswith("input_ids is sharded over a mesh with Explicit axes inside jax.jit"), call
    assert results["explicit_forward_equal"]


@pytest.mark.parametrize("placement, strategy", [(placement, strategy) for placement, strategies in
                                                 GQA_STRATEGIES.items() for strategy in strategies])
def test_gqa_family_on_a_mesh_equals_single_device(results, placement, strategy):
    """Llama with 8 query and 2 kv heads: 2 model devices hold one kv head each; 4 hold each kv
    head twice, with 2 of its 4 query heads (`sharding.plan`). Placed by `jaxgen.shard`, or by
    the loader straight onto the mesh."""
    gqa = results["gqa"]
    _assert_same(gqa["meshes"][placement][strategy], gqa["single"][strategy], strategy)
    model_devices = int(placement[2])
    assert gqa["kv_heads"][placement] == max(2, model_devices)
    assert gqa["qkv_shard_shape"][placement] == [1, 4 // (model_devices // 2) + 2, 8, 64]


@pytest.mark.parametrize("placement", ["shard", "load"])
def test_int8_model_on_a_mesh_equals_single_device(results, placement):
    """int8 kernels split as their float kernels are, their scales with them (a row-parallel
    kernel's scale, over its output axis, replicated)."""
    int8 = results["gqa"]["int8"]
    _assert_same(int8[placement], int8["single"], "greedy")
    assert int8[f"{placement}_specs"] == ["P('model', None, None)", "P()", "P(None, 'model')"]


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_gemma_on_a_mesh_equals_single_device(results, strategy):
    single, ours = results["gemma"][strategy]
    _assert_same(ours, single, strategy)


def test_constrained_beam_search_on_a_mesh_equals_single_device(results):
    single, ours = results["constrained"]
    _assert_same(ours, single, "beam")


def test_multihost_example_script_runs_on_one_host_with_8_devices():
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "scripts/multihost_generate.py", "--model-parallel", "2",
                           "--max-new-tokens", "6"], capture_output=True, text=True, env=EIGHT_DEVICES, cwd=root,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("The meaning of life is")
