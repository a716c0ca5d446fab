"""The jaxgen command on the shipped demo model: driven as a user would (subprocess), and, where
the process boundary changes nothing, by `jaxgen.cli.main` in this process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import jaxgen
from jaxgen.cli import DEMO_MODEL
from tests.conftest import assert_same_generation, hf_generate

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}


def jaxgen_cli(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "jaxgen", "generate", *args], capture_output=True, text=True,
                          env=ENV, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture
def jaxgen_main(capsys, monkeypatch):
    """The command run by `jaxgen.cli.main` inside this process, offline: (exit code, stdout,
    stderr). For what the process boundary does not change; it saves the interpreter start-up
    and shares compiled programs."""
    import huggingface_hub.constants

    from jaxgen.cli import main

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def run(*args):
        code = main(["generate", *args])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_greedy_prints_english_like_continuations():
    proc = jaxgen_cli("The best way to", "A man", "--max-new-tokens", "12")
    out = proc.stdout
    assert out.startswith("The best way to") and "\nA man" in out  # continuations may span lines
    words = out.split()
    assert len(words) >= 10
    assert sum(w.strip(".,;:!?\"'()").isalpha() for w in words) / len(words) > 0.6
    assert "tokens/s" in proc.stderr and "compiled" in proc.stderr


def test_beams_grouped_per_prompt_with_scores_and_a_compile_cache(tmp_path):
    args = ("Love is", "Never", "--num-beams", "4", "--num-return-sequences", "2", "--max-new-tokens", "8",
            "--compile-cache", str(tmp_path))
    proc = jaxgen_cli(*args)
    out = proc.stdout
    assert out.count("=== ") == 2 and out.count("score ") == 4
    scores = [float(line.split("score ")[1].split()[0]) for line in out.splitlines() if "score " in line]
    assert scores[0] >= scores[1] and scores[2] >= scores[3]
    assert list(tmp_path.glob("jit__decode-*")) and "compile cache" not in proc.stderr

    again = jaxgen_cli(*args)  # the program from the cache: the same text
    assert again.stdout == out
    # Some hosts' XLA:CPU rejects every cached program (jax-ml/jax#38445: LLVM tuning attributes
    # taken for CPU features) and compiles again; elsewhere the second run reads it.
    if "Target machine feature" not in again.stderr:
        assert "compiled in" in again.stderr and "(read from the compile cache)" in again.stderr


def test_sampling_is_reproducible_with_a_seed(jaxgen_main):
    args = ("Once upon a time", "--do-sample", "--temperature", "0.9", "--top-k", "40", "--max-new-tokens", "15")
    a = jaxgen_main(*args, "--seed", "1")[1]
    b = jaxgen_main(*args, "--seed", "1")[1]
    c = jaxgen_main(*args, "--seed", "2")[1]
    assert a == b and a != c


def test_show_scores_table_matches_json(jaxgen_main):
    table = jaxgen_main("Money", "--max-new-tokens", "5", "--show-scores")[1]
    doc = json.loads(jaxgen_main("Money", "--max-new-tokens", "5", "--json")[1])
    tokens = doc["results"][0]["completions"][0]["tokens"]
    assert 1 <= len(tokens) <= 5
    for t in tokens:
        assert f"{t['id']:>6}" in table and f"{t['logprob']:.4f}" in table
        assert t["logprob"] <= 0 and abs(np.exp(t["logprob"]) - t["prob"]) < 1e-6


def test_json_is_valid_and_quiet():
    proc = jaxgen_cli("Time", "Work", "--num-beams", "3", "--num-return-sequences", "2", "--max-new-tokens", "6",
                      "--json")
    assert proc.stderr.strip() == ""
    doc = json.loads(proc.stdout)
    assert [r["prompt"] for r in doc["results"]] == ["Time", "Work"]
    for result in doc["results"]:
        assert len(result["completions"]) == 2
        for c in result["completions"]:
            assert c["text"].startswith(result["prompt"]) and isinstance(c["sequence_score"], float)
            assert len(c["token_ids"]) == len(c["tokens"]) <= 6


@pytest.mark.parametrize("args", [("Hello \u2603", "--max-new-tokens", "12"),  # tokens of part of a character
                                  ("The secret of", "--max-new-tokens", "20", "--do-sample", "--seed", "5")])
def test_stream_equals_non_streamed(jaxgen_main, args):
    code, streamed, _ = jaxgen_main(*args, "--stream")
    assert code == 0 and streamed == jaxgen_main(*args)[1]


@pytest.mark.parametrize("args, message", [
    (("x", "--model", "/nonexistent/model"), "does not exist"),
    (("x", "--num-beams", "2", "--num-return-sequences", "3"), "--num-return-sequences=3"),
    (("x", "--max-new-tokens", "-3"), "--max-new-tokens=-3"),
    (("x", "--seed", "3"), "--seed need --do-sample"),
    (("x", "--prompt-lookup", "0"), "--prompt-lookup=0 is not allowed"),
    (("x", "--output", "o.jsonl"), "--output needs --input"),
    (("x", "--input", "i.jsonl", "--output", "o.jsonl"), "--input runs a file of requests into --output"),
    ((), "give one or more prompts, or --input FILE --output FILE"),
    (("",), "prompt is empty"),
    (("x", "--early-stopping", "maybe"), "true, false or never"),
    (("x", "--temperature", "0.5"), "need --do-sample"),
    (("x", "--model", "gpt2"), "not in the local Hugging Face cache"),
    (("x", "--compile-cache", __file__), "cannot be a folder here"),
    (("x", "--do-sample", "--seed", "99999999999999999999"), "--seed=99999999999999999999 is not allowed"),
    (("Hi \udcff",), "is not valid UTF-8 text"),
])
def test_bad_input_one_line_no_traceback(jaxgen_main, args, message):
    code, _, err = jaxgen_main(*args)
    assert code == 2
    err = err.strip()
    assert len(err.splitlines()) == 1 or "error" in err.splitlines()[-1], err
    assert message in err.splitlines()[-1] and "Traceback" not in err


def test_a_model_without_tokenizer_files_is_named(jaxgen_main, tmp_path):
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((DEMO_MODEL / name).read_bytes())
    code, _, err = jaxgen_main("x", "--model", str(tmp_path))
    assert code == 2 and "tokenizer files" in err.splitlines()[-1]


def test_prompt_lookup_prints_greedy_s_text(jaxgen_main):
    args = ("A friend is a friend who is a friend who is", "--max-new-tokens", "20")
    plain = jaxgen_main(*args)[1]
    assert jaxgen_main(*args, "--prompt-lookup", "4")[1] == plain
    # the demo model as its own draft model
    assert jaxgen_main(*args, "--assistant-model", str(DEMO_MODEL), "--num-assistant-tokens", "3")[1] == plain
    assert jaxgen_main(*args, "--assistant-early-exit", "2", "--stream")[1] == jaxgen_main(*args, "--stream")[1]


def test_stop_ends_each_text_where_it_ends_with_it(jaxgen_main):
    """--stop: transformers' stop strings, spelled by the model's tokenizer; each text ends at the
    first place it ends with one, which the plain run's text runs past."""
    args = ("The meaning of life is", "Never", "--max-new-tokens", "24", "--json")

    def generated(*extra):
        return [r["completions"][0]["generated_text"] for r in json.loads(jaxgen_main(*args, *extra)[1])["results"]]

    plain, stopped = generated(), generated("--stop", ".", "--stop", "!")
    for full, text in zip(plain, stopped):
        assert text.endswith((".", "!")) and full.startswith(text) and len(full) > len(text)


def test_help_shows_defaults(jaxgen_main, capsys):
    from jaxgen.cli import main

    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = capsys.readouterr().out
    assert "tokens to generate per sequence (default: 30)" in " ".join(out.split())


def test_shipped_model_equals_transformers():
    """The demo model is also a realistic parity fixture: greedy and beam search on real text."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(DEMO_MODEL, padding_side="left")
    tok.pad_token_id = tok.eos_token_id
    batch = tok(["The meaning of life", "Do not", "If you can't be good, be"], return_tensors="np", padding=True)
    torch_model = GPT2LMHeadModel.from_pretrained(DEMO_MODEL).eval()
    model = jaxgen.from_pretrained(DEMO_MODEL)
    eos = tok.eos_token_id
    for kw in (dict(), dict(num_beams=4, num_return_sequences=2)):
        kw.update(max_new_tokens=16, eos_token_id=eos, pad_token_id=eos)
        ref = hf_generate(torch_model, batch.input_ids, batch.attention_mask, do_sample=False, **kw)
        out = jaxgen.generate(model, batch.input_ids, batch.attention_mask, output_scores=True, **kw).trim()
        assert_same_generation(out, ref, beams="num_beams" in kw)
    assert isinstance(torch_model, torch.nn.Module)


def test_options_left_out_come_from_the_checkpoints_generation_config(jaxgen_main, tmp_path):
    import shutil

    model_dir = tmp_path / "demo"
    shutil.copytree(DEMO_MODEL, model_dir)
    settings = dict(repetition_penalty=1.8, no_repeat_ngram_size=2)
    (model_dir / "generation_config.json").write_text(json.dumps(settings))

    def cli_ids(model, *extra):
        code, out, _ = jaxgen_main("Love is", "--model", str(model), "--max-new-tokens", "12", "--json", *extra)
        assert code == 0
        return json.loads(out)["results"][0]["completions"][0]["token_ids"]

    ids = cli_ids(model_dir)
    assert ids == cli_ids(DEMO_MODEL, "--repetition-penalty", "1.8", "--no-repeat-ngram-size", "2")
    from transformers import AutoTokenizer

    prompt = AutoTokenizer.from_pretrained(DEMO_MODEL)(["Love is"], return_tensors="np").input_ids
    plain = jaxgen.greedy_search(jaxgen.from_pretrained(DEMO_MODEL), prompt, max_new_tokens=12, pad_token_id=0)
    assert ids != plain.trim().sequences[0, prompt.shape[1]:].tolist()  # the settings matter


# Gemma's own chat template, and a plain one.
GEMMA_TEMPLATE = ("{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
                  "{{ m['content'] }}<end_of_turn>\n{% endfor %}<start_of_turn>model\n")
PLAIN_TEMPLATE = "{% for m in messages %}User: {{ m['content'] }}\n{% endfor %}Assistant:"


@pytest.mark.parametrize("family, template, shown", [
    ("Llama", PLAIN_TEMPLATE, "User: Hi there\nAssistant:"),
    ("Gemma2", GEMMA_TEMPLATE, "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n"),
])
def test_any_family_and_a_chat_template(jaxgen_main, tmp_path, family, template, shown):
    """``--model`` of a Llama or a Gemma 2 checkpoint; ``--chat`` runs each prompt through the
    tokenizer's chat template (here the demo tokenizer given one) before generating."""
    import transformers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(DEMO_MODEL)
    tok.chat_template = template
    tok.save_pretrained(tmp_path)
    torch.manual_seed(0)
    config = getattr(transformers, f"{family}Config")(
        vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    code, out, err = jaxgen_main("Hi there", "--model", str(tmp_path), "--chat", "--max-new-tokens", "6", "--json")
    assert code == 0, err
    completion = json.loads(out)["results"][0]["completions"][0]
    assert completion["text"].startswith(shown.rstrip("\n"))
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi there"}], add_generation_prompt=True,
                                  return_tensors="np", return_dict=True)["input_ids"]
    assert tok.decode(ids[0]).rstrip("\n") == shown.rstrip("\n")
    expected = jaxgen.generate(jaxgen.from_pretrained(tmp_path), ids, max_new_tokens=6, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.eos_token_id).trim().sequences[0, ids.shape[1]:]
    assert completion["token_ids"] == [int(t) for t in expected][:len(completion["token_ids"])]
    code, _, err = jaxgen_main("x", "--chat", "--max-new-tokens", "2")
    assert code == 2 and "has no chat template" in err
