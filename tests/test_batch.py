"""Continuous batching (`jaxgen.generate_batch`) against `jaxgen.generate` per request, and the
command's JSON-lines job: killed, resumed, validated before it compiles."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import torch
import transformers

import jaxgen
from jaxgen.cli import DEMO_MODEL
from tests.conftest import EOS, PAD


def alone(model, request, **shared):
    """What `generate` returns for one request alone: (tokens, normalized log-probs)."""
    own = {k: v for k, v in request.items() if k not in ("id", "input_ids", "seed")}
    if "seed" in request:
        own["key"] = jax.random.key(request["seed"])
    ids = np.asarray([request["input_ids"]])
    out = jaxgen.generate(model, ids, np.ones_like(ids), output_scores=True, **shared, **own).trim()
    logprobs = np.asarray(jaxgen.compute_transition_scores(out.sequences, out.scores, normalize_logits=True))[0]
    tokens = out.sequences[0, ids.shape[1]:].tolist()
    return tokens, logprobs[:len(tokens)]


def assert_equal_alone(model, requests, results, **shared):
    assert [r.id for r in results] == [q["id"] for q in requests]
    for request, result in zip(requests, results):
        tokens, logprobs = alone(model, request, **shared)
        assert result.tokens == tokens, request["id"]
        np.testing.assert_allclose(result.logprobs, logprobs, atol=1e-4)
        assert result.finish_reason == ("stop" if tokens[-1] == EOS else "length")


def mixed_requests(rng, n, vocab, lengths=(1, 40), new=(3, 8, 17)):
    return [{"id": f"r{i}", "input_ids": rng.integers(3, vocab, rng.integers(*lengths)).tolist(),
             "max_new_tokens": int(rng.choice(new))} for i in range(n)]


def test_greedy_batch_equals_each_request_alone(eos_model):
    """30 requests of 1-39 prompt tokens and 3, 8 or 17 new ones (many end on EOS first) through 5
    rows, synced every 4 steps, each favouring its own prompt's tokens: each request's tokens and
    log-probabilities as generate's."""
    _, model = eos_model
    requests = mixed_requests(np.random.default_rng(0), 30, 48)
    shared = dict(eos_token_id=EOS, pad_token_id=PAD, encoder_repetition_penalty=1.5)
    results = jaxgen.generate_batch(model, requests, max_rows=5, steps_per_sync=4, progress=False, **shared)
    assert {r.finish_reason for r in results} == {"stop", "length"}
    assert_equal_alone(model, requests, results, **shared)


def test_sampling_batch_equals_each_request_alone_with_its_own_settings(eos_model):
    """Per-request temperature, top-p, min-p, repetition penalty and seed beside a shared top-k
    and min_new_tokens: each request draws the tokens generate draws for its key."""
    _, model = eos_model
    rng = np.random.default_rng(1)
    requests = mixed_requests(rng, 9, 48)
    for i, r in enumerate(requests):
        r.update(temperature=float(rng.choice([0.6, 1.0, 1.4])), top_p=float(rng.choice([0.8, 1.0])),
                 repetition_penalty=float(rng.choice([1.0, 1.3])), seed=100 + i)
        if i % 2:
            r["min_p"] = 0.05
    shared = dict(do_sample=True, top_k=20, min_new_tokens=2, eos_token_id=EOS, pad_token_id=PAD)
    results = jaxgen.generate_batch(model, requests, max_rows=3, progress=False, **shared)
    assert_equal_alone(model, requests, results, **shared)


def test_beam_batch_equals_each_request_alone(eos_model):
    """14 beam search requests as groups of 3 rows (2 groups and a spare row), each with its own
    length_penalty: each request's best beam, its tokens' log-probabilities and its score as
    generate's beam search gives them alone."""
    _, model = eos_model
    rng = np.random.default_rng(3)
    requests = mixed_requests(rng, 14, 48, new=(5, 12))
    for r in requests:
        r["length_penalty"] = float(rng.choice([0.5, 1.0, 2.0]))
    shared = dict(num_beams=3, eos_token_id=EOS, pad_token_id=PAD)
    results = jaxgen.generate_batch(model, requests, max_rows=7, steps_per_sync=4, progress=False, **shared)
    assert [r.id for r in results] == [q["id"] for q in requests]
    assert {r.finish_reason for r in results} == {"stop", "length"}
    for request, result in zip(requests, results):
        ids = np.asarray([request["input_ids"]])
        own = {k: v for k, v in request.items() if k not in ("id", "input_ids")}
        out = jaxgen.generate(model, ids, np.ones_like(ids), output_scores=True, **shared, **own).trim()
        tokens = out.sequences[0, ids.shape[1]:].tolist()
        tokens = tokens[:tokens.index(EOS) + 1] if EOS in tokens else tokens
        assert result.tokens == tokens, request["id"]
        transition = jaxgen.compute_transition_scores(out.sequences, out.scores, out.beam_indices)
        np.testing.assert_allclose(result.logprobs, np.asarray(transition)[0, :len(tokens)], atol=1e-4)
        assert result.sequence_score == pytest.approx(float(out.sequences_scores[0]), abs=1e-4)
        assert result.finish_reason == ("stop" if tokens[-1] == EOS else "length")


def test_sliding_window_family_batch_equals_each_request_alone(tmp_path):
    """Mistral with a window of 4 (shorter than most sequences): each row masks its own window."""
    torch.manual_seed(0)
    config = transformers.MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, sliding_window=4,
                                        initializer_range=0.3, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    transformers.MistralForCausalLM(config).save_pretrained(tmp_path)
    model = jaxgen.from_pretrained(tmp_path)
    requests = mixed_requests(np.random.default_rng(2), 9, 64, lengths=(2, 12), new=(6, 11))
    results = jaxgen.generate_batch(model, requests, max_rows=3, progress=False, pad_token_id=0)
    for request, result in zip(requests, results):
        assert result.tokens == alone(model, request, pad_token_id=0)[0]


def test_requests_join_while_others_decode(eos_model):
    """A generator is read as rows free up: the later requests enter after the first finished,
    beside ones still decoding, and still equal generate's."""
    _, model = eos_model
    requests = mixed_requests(np.random.default_rng(3), 8, 48, new=(4, 16))
    pulled = []

    def source():
        for r in requests:
            pulled.append(r["id"])
            yield r

    results = []
    for done in jaxgen.decoding.batch.completions(model, source(), max_rows=2, max_length=64, eos_token_id=EOS,
                                                  pad_token_id=PAD):
        results.append((done, len(pulled)))
    assert results[0][1] <= 3  # the first result came before most requests were read
    assert sorted(r.index for r, _ in results) == list(range(8))
    ordered = sorted((r for r, _ in results), key=lambda r: r.index)
    assert_equal_alone(model, requests, ordered, eos_token_id=EOS, pad_token_id=PAD)


@pytest.mark.parametrize("bad, message", [
    ({"temperature": -1.0}, "request 'bad': temperature=-1.0 is not allowed"),
    ({"top_k": 5}, "request 'bad': its arguments change what every request of the batch shares"),
    ({"num_beams": 2}, "request 'bad': num_beams=2 is not allowed with do_sample=True: beam sampling in"),
    ({"assistant_early_exit": 1}, "request 'bad': assistant_early_exit= is not allowed: assisted decoding"),
    ({"max_new_tokens": 0}, "request 'bad': max_new_tokens=0 is not allowed"),
    ({"input_ids": []}, "request 'bad': a prompt must be a non-empty list of token ids"),
    ({"prompt": "text"}, "request 'bad': give exactly one of input_ids, prompt or messages"),
    ({"temperature": 1e-300}, "request 'bad': temperature=1e-300 is not allowed: .* float32"),
])
def test_bad_requests_are_refused_by_id_before_anything_runs(eos_model, bad, message):
    _, model = eos_model
    requests = [{"id": "ok", "input_ids": [3, 4, 5]}, {"id": "bad", "input_ids": [6, 7], **bad}]
    with pytest.raises(ValueError, match=message):
        jaxgen.generate_batch(model, requests, progress=False, do_sample=True, key=jax.random.key(0),
                              pad_token_id=PAD)


def test_batch_wide_arguments_it_cannot_honour_are_refused(eos_model):
    _, model = eos_model
    for kwargs, message in ((dict(output_scores=True), "output_scores= is not allowed"),
                            (dict(prompt_lookup_num_tokens=3), "prompt_lookup_num_tokens= is not allowed"),
                            (dict(max_rows=0), "max_rows=0 is not allowed"),
                            (dict(num_beams=3, max_rows=2), "max_rows=2 is not allowed: a beam search request takes "
                             "num_beams=3 rows"),
                            (dict(num_beams=2, num_beam_groups=2, diversity_penalty=0.5),
                             "num_beams=2 is not allowed with num_beam_groups=2: group beam search in generate_batch")):
        with pytest.raises(ValueError, match=message):
            jaxgen.generate_batch(model, [[3, 4]], progress=False, **kwargs)


# --- the command --------------------------------------------------------------------------------

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
WORDS = "the a friend life love man woman time never always good bad way to be is".split()


def job_input(path, n=36):
    rng = np.random.default_rng(4)
    with open(path, "w") as f:
        for i in range(n):
            obj = {"id": f"q{i}", "prompt": " ".join(rng.choice(WORDS, rng.integers(1, 10)))}
            if i % 4 == 0:
                obj["max_new_tokens"] = int(rng.choice([5, 25]))
            f.write(json.dumps(obj) + "\n")


def job(input_path, output_path, *extra):
    return [sys.executable, "-m", "jaxgen", "generate", "--input", str(input_path), "--output", str(output_path),
            "--max-rows", "2", "--max-new-tokens", "40", *extra]


def results_of(path):
    lines = path.read_text().splitlines()
    return {r["id"]: (r["tokens"], r["text"], r["finish_reason"]) for r in map(json.loads, lines)}, len(lines)


def test_job_killed_and_resumed_writes_every_id_once_as_an_uninterrupted_run(tmp_path):
    source = tmp_path / "in.jsonl"
    job_input(source)
    whole, resumed = tmp_path / "whole.jsonl", tmp_path / "resumed.jsonl"
    subprocess.run(job(source, whole), check=True, env=ENV, capture_output=True, timeout=300)
    expected, lines = results_of(whole)
    assert lines == len(expected) == len(source.read_text().splitlines())

    proc = subprocess.Popen(job(source, resumed), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and (not resumed.exists() or len(resumed.read_text().splitlines()) < 3):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial, _ = results_of(resumed)
    assert 3 <= len(partial) < len(expected), "the run ended before it could be killed mid-way"
    with open(resumed, "a") as f:
        f.write('{"id": "q0", "tok')  # as if the kill had cut a line short
    rerun = subprocess.run(job(source, resumed), check=True, env=ENV, capture_output=True, text=True, timeout=300)
    assert f"{len(partial)} already in" in rerun.stderr
    got, lines = results_of(resumed)
    assert lines == len(expected) and got == expected


def test_sampled_job_resumed_draws_what_an_uninterrupted_run_draws(tmp_path):
    """A request's key follows its line, not its place among the requests left to run."""
    from jaxgen.cli import main

    source, whole, resumed = tmp_path / "in.jsonl", tmp_path / "whole.jsonl", tmp_path / "resumed.jsonl"
    job_input(source, n=10)
    args = ["generate", "--input", str(source), "--max-rows", "3", "--max-new-tokens", "12", "--do-sample",
            "--seed", "5"]
    assert main([*args, "--output", str(whole)]) == 0
    lines = whole.read_text().splitlines()
    resumed.write_text("\n".join(lines[1::2]) + "\n")  # as if every other request had finished
    assert main([*args, "--output", str(resumed)]) == 0
    assert results_of(resumed)[0] == results_of(whole)[0]


def test_beam_job_writes_each_request_s_best_beam_and_score(tmp_path, capsys):
    from jaxgen.cli import DEMO_MODEL, main

    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    job_input(source, n=3)
    args = ["generate", "--input", str(source), "--output", str(out), "--max-new-tokens", "10", "--num-beams", "2"]
    assert main([*args, "--max-rows", "1"]) == 2
    err = capsys.readouterr().err
    assert "--max-rows=1 is not allowed: a beam search request takes --num-beams=2 rows" in err and "loaded" not in err
    assert main([*args, "--max-rows", "4"]) == 0
    model, tokenizer = jaxgen.from_pretrained(DEMO_MODEL), transformers.AutoTokenizer.from_pretrained(DEMO_MODEL)
    for line, request in zip(out.read_text().splitlines(), map(json.loads, source.read_text().splitlines())):
        result = json.loads(line)
        ids = np.asarray([tokenizer(request["prompt"])["input_ids"]])
        ref = jaxgen.generate(model, ids, max_new_tokens=request.get("max_new_tokens", 10), num_beams=2,
                              output_scores=True, pad_token_id=tokenizer.eos_token_id).trim()
        tokens = ref.sequences[0, ids.shape[1]:].tolist()
        eos = tokenizer.eos_token_id
        assert result["tokens"] == (tokens[:tokens.index(eos) + 1] if eos in tokens else tokens)
        assert result["sequence_score"] == pytest.approx(float(ref.sequences_scores[0]), abs=1e-4)


def test_a_malformed_line_fails_before_compiling_with_its_line_number(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text('{"id": 1, "prompt": "Love is"}\n\n{"id": 2, "prompt": "Never", "temprature": 0.5}\n')
    proc = subprocess.run(job(source, tmp_path / "out.jsonl"), env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert f"{source}:3: unknown field 'temprature'" in proc.stderr and "compiled" not in proc.stderr
    assert "loaded" not in proc.stderr  # the file is read before the model


def test_a_setting_of_the_wrong_type_names_its_line(tmp_path, capsys):
    from jaxgen.cli import main

    source = tmp_path / "in.jsonl"
    source.write_text('{"id": "a", "prompt": "Love is", "seed": "x"}\n')
    assert main(["generate", "--input", str(source), "--output", str(tmp_path / "o.jsonl")]) == 2
    assert f"{source}:1: 'seed' must be an integer, got \"x\"" in capsys.readouterr().err


@pytest.mark.parametrize("option, message", [(("--max-new-tokens", "0"), "--max-new-tokens=0 is not allowed"),
                                             (("--max-rows", "0"), "--max-rows=0 is not allowed")])
def test_a_bad_option_is_named_as_typed_not_blamed_on_a_line(tmp_path, capsys, option, message):
    from jaxgen.cli import main

    source = tmp_path / "in.jsonl"
    source.write_text('{"id": "a", "prompt": "Love is"}\n')
    assert main(["generate", "--input", str(source), "--output", str(tmp_path / "o.jsonl"), *option]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in err and "in.jsonl" not in err


def test_a_bad_setting_names_its_line(tmp_path, capsys):
    from jaxgen.cli import main

    source = tmp_path / "in.jsonl"
    source.write_text('{"id": "a", "prompt": "Love is"}\n{"id": "b", "prompt": "Never", "max_new_tokens": -2}\n')
    assert main(["generate", "--input", str(source), "--output", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err
    assert f"{source}:2 (id 'b'): max_new_tokens=-2 is not allowed" in err and "compiled" not in err


def test_chat_messages_run_through_the_template(tmp_path, capsys):
    """A request of chat messages needs the tokenizer's template; the demo model has none."""
    from jaxgen.cli import main

    source = tmp_path / "in.jsonl"
    source.write_text('{"id": "a", "messages": [{"role": "user", "content": "Hi"}]}\n')
    assert main(["generate", "--input", str(source), "--output", str(tmp_path / "o.jsonl")]) == 2
    assert "messages need a tokenizer with a chat template" in capsys.readouterr().err
    assert DEMO_MODEL.exists()


def test_an_output_file_that_is_not_jaxgen_s_is_left_untouched(tmp_path, capsys):
    """Every line is checked before a partial last one is cut: notes, or another requests file,
    given as --output fail naming their first line, byte for byte as they were."""
    from jaxgen.cli import main

    source = tmp_path / "in.jsonl"
    source.write_text('{"id": "a", "prompt": "Love is"}\n')
    for name, text in (("notes.txt", "my notes\nmy last line, no newline"), ("one.txt", "a single line"),
                       ("requests.jsonl", source.read_text())):
        out = tmp_path / name
        out.write_text(text)
        assert main(["generate", "--input", str(source), "--output", str(out)]) == 2
        assert f"{out}:1: not a result line of jaxgen" in capsys.readouterr().err
        assert out.read_text() == text


def test_requests_that_are_not_text_or_token_ids_name_their_line(tmp_path, capsys):
    from jaxgen.cli import main

    for line, message in (('{"id": 1, "input_ids": "Hello"}', ':1: "input_ids" must be a non-empty list of token'),
                          ('{"id": 1, "prompt": "Hi \\ud800"}', ":1 (id 1): 'Hi \\ud800' is not valid text")):
        source = tmp_path / "in.jsonl"
        source.write_text(line + "\n")
        assert main(["generate", "--input", str(source), "--output", str(tmp_path / "o.jsonl")]) == 2
        assert message in capsys.readouterr().err


def test_generate_batch_checks_max_length_and_takes_no_more_rows_than_requests(eos_model):
    _, model = eos_model
    for bad in (-1, 0, "10", True):
        with pytest.raises(ValueError, match=f"max_length={bad!r} is not allowed"):
            list(jaxgen.generate_batch(model, iter([[3, 4]]), max_length=bad, progress=False, pad_token_id=PAD))
    kw = dict(max_new_tokens=6, pad_token_id=PAD, eos_token_id=EOS)
    few = jaxgen.generate_batch(model, [[3, 4, 5], [6, 7]], max_rows=64, progress=False, **kw)
    for c, ids in zip(few, ([3, 4, 5], [6, 7])):
        ref = jaxgen.generate(model, np.asarray([ids]), **kw).trim().sequences[0, len(ids):].tolist()
        assert c.tokens == (ref[:ref.index(EOS) + 1] if EOS in ref else ref)


def test_a_job_s_warnings_are_lines_of_the_command_naming_the_request(tmp_path, capsys):
    from jaxgen.cli import main

    source = tmp_path / "in.jsonl"
    source.write_text('{"id": "a", "prompt": "Love is", "temperature": 0.5}\n')
    assert main(["generate", "--input", str(source), "--output", str(tmp_path / "o.jsonl"), "--max-new-tokens",
                 "3"]) == 0
    assert (f"jaxgen: warning: {source}:1 (id 'a'): do_sample is not set to True. However, temperature is set to 0.5"
            in capsys.readouterr().err)
