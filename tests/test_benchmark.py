"""scripts/benchmark.py, run as a user runs it, on a tiny checkpoint: it must get through the
output check, the timings and the fresh-process memory probes, and report numbers that agree
with each other. Speed itself is never asserted (the machine is noisy; the script measures it)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import jaxgen
from tests.conftest import build_checkpoint

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"
WORKLOADS = {"beam4-8": 32}  # name: rows decoded. One workload: each costs two fresh processes (~20 s)
PROMPT, NEW = 8, 5


def load_script():
    spec = importlib.util.spec_from_file_location("benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench")
    build_checkpoint(path / "model", seed=0, vocab_size=500, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                     initializer_range=0.3, bos_token_id=1, eos_token_id=2)
    out = path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", str(path / "model"), "--workloads", *WORKLOADS,
         "--prompt-len", str(PROMPT), "--new-tokens", str(NEW), "--reps", "2", "--threads", "2", "--json", str(out)],
        capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text()), jaxgen.from_pretrained(path / "model")


def test_reports_every_workload_once_outputs_agree(report):
    stdout, data, _ = report
    assert [r["workload"] for r in data["results"]] == list(WORKLOADS)
    assert data["results"][0]["outputs_equal"] is True  # compared with transformers' before any timing
    assert data["results"][0]["steps_equal"] == NEW
    for name in WORKLOADS:
        assert sum(line.startswith(f"| {name} |") for line in stdout.splitlines()) == 1
    assert "outputs differ" not in stdout


def test_numbers_are_consistent(report):
    _, data, model = report
    measurements = data["machine_measurements"]  # before the first workload, then after each
    assert len(measurements) == len(data["results"]) + 1
    step_bound = load_script().step_bound
    for i, r in enumerate(data["results"]):
        machine = r["machine"]  # the better of the measurements right before and right after it
        for key, value in machine.items():
            assert value == max(measurements[i][key], measurements[i + 1][key]) > 0, key
        batch = r["batch"]
        assert r["rows"] == WORKLOADS[r["workload"]]
        for key in ("jax_first_s", "jax_compile_s", "torch_first_s", "jax_ms_per_step", "torch_ms_per_step",
                    "bound_ms_per_step"):
            assert math.isfinite(r[key]) and r[key] > 0, key
        assert r["jax_compile_s"] < r["jax_first_s"]
        assert r["new_tokens"] == NEW
        assert r["speedup"] == pytest.approx(r["torch_ms_per_step"] / r["jax_ms_per_step"])
        assert r["speedup_min"] <= r["speedup_max"]
        assert r["jax_tokens_per_s"] == pytest.approx(batch * 1e3 / r["jax_ms_per_step"])
        assert r["torch_tokens_per_s"] == pytest.approx(batch * 1e3 / r["torch_ms_per_step"])
        assert r["jax_of_bound"] == pytest.approx(r["bound_ms_per_step"] / r["jax_ms_per_step"])
        bound = step_bound(model, r["rows"], PROMPT, NEW, machine)
        assert r["bound_ms_per_step"] == pytest.approx(1e3 * bound)
        assert r["jax_peak_MB"] >= 0 and r["torch_peak_MB"] >= 0


def test_agreeing_steps_counts_generated_steps_equal_in_every_row():
    """What a bfloat16 run reports instead of gating on equal outputs."""
    agreeing_steps = load_script().agreeing_steps
    ours = np.array([[7, 7, 1, 2, 3, 4], [8, 8, 5, 6, 7, 8]])
    assert agreeing_steps(ours, ours.copy(), prompt_len=2) == 4
    theirs = ours.copy()
    theirs[1, 4] = 0  # row 1 parts ways at step 2; a later match does not count
    assert agreeing_steps(ours, theirs, prompt_len=2) == 2
    theirs[0, 2] = 9
    assert agreeing_steps(ours, theirs, prompt_len=2) == 0
    assert agreeing_steps(ours, ours[:, :5], prompt_len=2) is None


def test_milliseconds_keep_three_significant_digits():
    """A GPU step (0.574 ms) keeps its digits in the table, as a CPU step (39.6 ms) does."""
    ms = load_script()._ms
    assert [ms(x) for x in (0.5744, 8.116, 39.62, 132.9, 1234.5)] == ["0.574", "8.12", "39.6", "133", "1234"]


def test_workload_names_give_strategy_beams_and_batch():
    workload = load_script().workload
    assert workload("beam5-3") == ("beam", 5, 3)
    assert workload("greedy-6") == ("greedy", 1, 6)
    assert workload("sample-12") == ("sample", 1, 12)
    assert workload("batch-256") == ("batch", 1, 256)  # 256 requests (scripts/batch_workload.py)
    assert workload("contrastive-2") == ("contrastive", 1, 2)  # against transformers 4.53 (hub_workload.py)
    assert workload("group6x3-4") == ("group", 6, 4)
    assert workload("constrained4-2") == ("constrained", 4, 2)
    assert workload("assisted-8") == ("assisted", 1, 8)  # against jaxgen's greedy search (assisted_workload.py)
    assert workload("lookup-1") == ("lookup", 1, 1)
    for bad in ("beam-3", "greedy-0", "beam4", "topk-8", "beam04-2", "greedy-8 ", "batch-0", "group4-1", "contrastive",
                "assisted-0", "constrained1-1"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected greedy-B, sample-B, beamK-B"):
            workload(bad)


@pytest.mark.parametrize("name", ["assisted-2", "lookup-1"])
def test_assisted_workloads_check_outputs_and_predict(name):
    """The demo model as its own draft: outputs equal greedy search's, every draft kept, and the
    prediction made of the measured parts."""
    import transformers

    from jaxgen.cli import DEMO_MODEL
    script = load_script()
    model = jaxgen.from_pretrained(DEMO_MODEL)
    tokenizer = transformers.AutoTokenizer.from_pretrained(DEMO_MODEL, padding_side="left")
    tokenizer.pad_token = tokenizer.eos_token
    args = argparse.Namespace(new_tokens=12, reps=1, num_assistant_tokens=3, prompt_lookup=4)
    r = script.assisted_workload.run(name, args, model, tokenizer, model, script._seconds_per_call)
    assert r["outputs_equal"] is True
    assert r["speedup"] == pytest.approx(r["assisted_tokens_per_s"] / r["plain_tokens_per_s"])
    if name.startswith("assisted"):
        assert r["acceptance"] == 1.0 and r["expected_tokens_per_iteration"] == 4
        predicted = 4 * r["plain_ms_per_token"] / (3 * r["draft_ms"] + r["verify_ms"])
        assert r["predicted_speedup"] == pytest.approx(predicted)
        assert r["of_predicted"] == pytest.approx(r["speedup"] / predicted)
    else:
        assert 0 < r["acceptance"] <= 1


def test_a_quantized_run_times_the_unquantized_model_beside_it(eos_model, monkeypatch, capsys):
    """``--quantize int8``: jaxgen's model in ``--dtype`` runs in the same turns, and the table
    gives the int8 speedup over it and both weights' size."""
    torch_model, plain = eos_model
    script = load_script()
    monkeypatch.setattr(script, "probe_in_subprocess", lambda *a: 0.0)  # the memory probes: the report fixture's
    args = argparse.Namespace(prompt_len=PROMPT, new_tokens=NEW, reps=2, dtype="float32", quantize="int8",
                              torch_compile=False)
    quantized = jaxgen.quantize(plain, "int8")
    r = script.run_workload("greedy-2", args, quantized, torch_model, plain)
    assert r["quantized_speedup"] == pytest.approx(r["unquantized_ms_per_step"] / r["jax_ms_per_step"])
    assert r["quantized_speedup_min"] <= r["quantized_speedup"] <= r["quantized_speedup_max"]
    assert r["weights_MB"] < r["unquantized_weights_MB"]
    r.update(bound_ms_per_step=1.0, jax_of_bound=1.0)
    script.print_table([r], args)
    header, _, row = capsys.readouterr().out.strip().splitlines()[-3:]
    assert "int8 speedup over float32 (pair range)" in header
    assert row.count("|") == header.count("|")
