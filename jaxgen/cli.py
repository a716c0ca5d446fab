"""The ``jaxgen`` command (also ``python -m jaxgen``).

    jaxgen generate "The meaning of life is" --num-beams 4 --num-return-sequences 2 --show-scores

Prompts are tokenized with left padding (``--chat``: each as a user message, through the
tokenizer's chat template); outputs are decoded without pad tokens. ``--model`` takes a hub id
or a directory of any supported family; without it the small GPT-2 shipped in
``jaxgen/demo_model`` is used, so the command works offline. Status lines (load, compile,
generation speed) go to stderr; ``--json`` prints only JSON on stdout. Bad input exits with
status 2 and one ``jaxgen: error: ...`` line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import warnings
from pathlib import Path

DEMO_MODEL = Path(__file__).resolve().parent / "demo_model"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        raise _UsageError(message)


class _UsageError(Exception):
    pass


def _bool_or_never(value: str):
    table = {"true": True, "false": False, "never": "never"}
    if value.lower() not in table:
        raise argparse.ArgumentTypeError(f"expected true, false or never, got {value!r}")
    return table[value.lower()]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="jaxgen", description="Text generation with jaxgen (Hugging Face generate() in JAX).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    g = sub.add_parser("generate", help="continue one or more prompts",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g.add_argument("prompts", nargs="*", metavar="PROMPT")
    g.add_argument("--model", default=str(DEMO_MODEL), help="hub id or local directory")
    g.add_argument("--max-new-tokens", type=int, default=30, help="tokens to generate per sequence")
    g.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams (1: no beams)")
    g.add_argument("--num-return-sequences", type=int, default=1, help="sequences returned per prompt")
    g.add_argument("--length-penalty", type=float, default=1.0, help="beam score = logprob / length ** this")
    g.add_argument("--early-stopping", type=_bool_or_never, default=False, metavar="{true,false,never}",
                   help="when beam search stops")
    g.add_argument("--do-sample", action="store_true", help="sample instead of greedy or beam search")
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--seed", type=int, help="PRNG seed for sampling (needs --do-sample; default 0)")
    g.add_argument("--repetition-penalty", type=float)
    g.add_argument("--no-repeat-ngram-size", type=int)
    g.add_argument("--stop", action="append", metavar="TEXT",
                   help="end a sequence where its text ends with TEXT (transformers' stop_strings; repeatable)")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="params dtype (default: the checkpoint's, as transformers)")
    g.add_argument("--prompt-lookup", type=int, metavar="K",
                   help="draft K tokens by prompt lookup (the same output, or with --do-sample the same "
                        "distribution; faster where the text copies itself)")
    g.add_argument("--assistant-model", metavar="DIR",
                   help="draft with this smaller model (same tokenizer): the same output, or with --do-sample the "
                        "same distribution (speculative sampling); faster where the drafts agree")
    g.add_argument("--assistant-early-exit", type=int, metavar="N",
                   help="draft with the model's own first N layers and its head, as --assistant-model")
    g.add_argument("--num-assistant-tokens", type=int, metavar="K",
                   help="the most tokens a draft model drafts at once (default: its generation config's, else 20)")
    g.add_argument("--quantize", choices=["int8"], help="store the weights as int8 (jaxgen.quantize)")
    g.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template to each prompt")
    g.add_argument("--show-scores", action="store_true", help="per-token log-probabilities")
    g.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    g.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    g.add_argument("--input", help="requests, one JSON object a line (id, prompt or messages, own settings)")
    g.add_argument("--output", help="with --input: results appended as each finishes; a rerun skips ids already there")
    g.add_argument("--max-rows", type=int, default=8, help="with --input: decode rows, a finished one taking the next")
    g.add_argument("--compile-cache", metavar="DIR",
                   help="keep the compiled programs in DIR, so that a later run of the same command skips XLA's "
                        "compile (jax's persistent compilation cache; also on where JAX_COMPILATION_CACHE_DIR is set)")
    return parser


_CACHE_HITS = {"count": 0, "listening": False}


def _use_compile_cache(directory: str | None) -> None:
    """With ``directory``: jax's persistent compilation cache there, for every program that takes
    0.1 s or more to compile (not the tiny ones of eager operations). Either way the programs read
    from a cache are counted (`_CACHE_HITS`), for the status line."""
    import jax
    import jax.monitoring

    if directory is not None:
        path = os.path.expanduser(directory)
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            raise ValueError(f"--compile-cache {directory}: cannot be a folder here ({e.strerror})") from None
        if not os.access(path, os.W_OK):
            raise ValueError(f"--compile-cache {directory}: the folder is not writable")
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
    if not _CACHE_HITS["listening"]:
        def count(event, **_):
            if event == "/jax/compilation_cache/cache_hits":
                _CACHE_HITS["count"] += 1

        jax.monitoring.register_event_listener(count)
        _CACHE_HITS["listening"] = True


class _Status:
    def __init__(self, quiet: bool):
        self.quiet = quiet

    def __call__(self, message: str):
        if not self.quiet:
            print(f"jaxgen: {message}", file=sys.stderr, flush=True)


class _PrintStreamer:
    """Prints the decoded text of a single row as tokens arrive (transformers' streamer protocol)."""

    def __init__(self, tokenizer, stop_ids):
        self.tokenizer, self.stop_ids = tokenizer, set(stop_ids)
        self.ids: list[int] = []
        self.printed = 0
        self.done = False

    def put(self, value):
        import numpy as np

        value = np.asarray(value).reshape(-1)
        if self.done:
            return
        self.ids.extend(int(t) for t in value)
        if len(value) == 1 and int(value[0]) in self.stop_ids:
            self.done = True
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a character's first bytes: wait for the rest (as TextStreamer)
            return
        print(text[self.printed:], end="", flush=True)
        self.printed = len(text)

    def end(self):
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        print(text[self.printed:], flush=True)


def _generated_lengths(generated, stop_ids):
    """Tokens each row really generated: up to and including the first EOS."""
    lengths = []
    for row in generated:
        hits = [i for i, t in enumerate(row) if int(t) in stop_ids]
        lengths.append(hits[0] + 1 if hits else len(row))
    return lengths


def run_generate(args) -> int:
    import jax
    import numpy as np

    import jaxgen
    from jaxgen.decoding.api import compile_generate
    from jaxgen.models.config import token_ids

    status = _Status(args.json)
    if not args.do_sample and any(v is not None for v in (args.temperature, args.top_k, args.top_p, args.seed)):
        raise ValueError("--temperature / --top-k / --top-p / --seed need --do-sample")
    requests = _check_job(args)
    if not args.input and not args.prompts:
        raise ValueError("give one or more prompts, or --input FILE --output FILE")
    if not all(p.strip() for p in args.prompts):
        raise ValueError("a prompt is empty; give at least one non-blank prompt text")
    for p in args.prompts:
        try:
            p.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"the prompt {p!r} is not valid UTF-8 text") from None
    if args.seed is not None and not 0 <= args.seed < 2**32:
        raise ValueError(f"--seed={args.seed} is not allowed: expected an int in [0, 2**32)")
    if args.stream and (len(args.prompts) > 1 or args.num_beams > 1 or args.num_return_sequences > 1):
        raise ValueError("--stream prints one sequence: use one prompt, no beams, --num-return-sequences 1")
    if args.stream and args.json:
        raise ValueError("--stream and --json cannot be combined")

    _use_compile_cache(args.compile_cache)
    t0 = time.perf_counter()
    model = jaxgen.from_pretrained(args.model, dtype=args.dtype, quantize=args.quantize)
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model, padding_side="left")
    except Exception as e:  # transformers raises OSError, ValueError, ...
        raise ValueError(f"cannot load the tokenizer of {args.model!r}: {str(e).splitlines()[0]}") from None
    weights = model.config.dtype + (", int8 weights" if args.quantize else "")
    status(f"loaded {args.model} ({model.config.model_type}, "
           f"{sum(x.size for x in jax.tree.leaves(model.params)) / 1e6:.1f}M params, {weights}) "
           f"in {time.perf_counter() - t0:.1f}s")

    # The model's stop ids (a Llama 3 checkpoint has several), else the tokenizer's.
    eos = list(token_ids(model.generation_config.get("eos_token_id", model.config.eos_token_id)))
    if not eos and tokenizer.eos_token_id is not None:
        eos = [tokenizer.eos_token_id]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = pad
    if args.input:
        return _run_job(args, requests, model, tokenizer, eos, pad, status)
    texts = args.prompts
    if args.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"--chat: the tokenizer of {args.model!r} has no chat template")
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                               tokenize=False) for p in args.prompts]
    batch = tokenizer(texts, return_tensors="np", padding=True, add_special_tokens=not args.chat)
    if batch.input_ids.shape[1] == 0:
        raise ValueError(f"the tokenizer of {args.model!r} turns the prompts into no tokens: are its tokenizer files "
                         "(tokenizer.json, tokenizer_config.json, ...) missing from the model directory?")
    kwargs = dict(_shared_options(args, eos, pad), num_beams=args.num_beams,
                  num_return_sequences=args.num_return_sequences, output_scores=True, tokenizer=tokenizer)
    if args.num_beams > 1:
        kwargs.update(length_penalty=args.length_penalty, early_stopping=args.early_stopping)
    if args.prompt_lookup is not None:
        kwargs["prompt_lookup_num_tokens"] = args.prompt_lookup
    if args.assistant_model:
        kwargs["assistant_model"] = jaxgen.from_pretrained(args.assistant_model, dtype=args.dtype,
                                                           quantize=args.quantize)
    if args.assistant_early_exit is not None:
        kwargs["assistant_early_exit"] = args.assistant_early_exit
    if args.num_assistant_tokens is not None:
        kwargs["num_assistant_tokens"] = args.num_assistant_tokens
    if args.do_sample:
        kwargs["key"] = jax.random.key(args.seed or 0)
    if args.stream:
        kwargs["streamer"] = _PrintStreamer(tokenizer, eos)

    t0, hits = time.perf_counter(), _CACHE_HITS["count"]
    try:
        run = compile_generate(model, batch.input_ids, batch.attention_mask, **kwargs)
    except ValueError as e:
        raise _as_typed(e, args) from None
    cached = " (read from the compile cache)" if _CACHE_HITS["count"] > hits else ""
    status(f"compiled in {time.perf_counter() - t0:.1f}s{cached}")
    t0 = time.perf_counter()
    out = jax.block_until_ready(run()).trim()
    seconds = time.perf_counter() - t0

    prompt_len = batch.input_ids.shape[1]
    generated = out.sequences[:, prompt_len:]
    lengths = _generated_lengths(generated, set(eos))
    status(f"generated {sum(lengths)} tokens in {seconds:.2f}s ({sum(lengths) / max(seconds, 1e-9):.1f} tokens/s)")

    beams = args.num_beams > 1
    transition = np.asarray(jaxgen.compute_transition_scores(
        out.sequences, out.scores, out.beam_indices, normalize_logits=not beams))
    per_prompt = args.num_return_sequences
    results = []
    for p, prompt in enumerate(args.prompts):
        completions = []
        for r in range(per_prompt):
            row = p * per_prompt + r
            ids = [int(t) for t in generated[row, :lengths[row]]]
            real_prompt = [int(t) for t, m in zip(batch.input_ids[p], batch.attention_mask[p]) if m]
            tokens = [{"id": t, "text": tokenizer.decode([t]), "logprob": float(transition[row, i]),
                       "prob": float(np.exp(transition[row, i]))} for i, t in enumerate(ids)]
            completions.append({
                "text": tokenizer.decode(real_prompt + ids, skip_special_tokens=True),
                "generated_text": tokenizer.decode(ids, skip_special_tokens=True),
                "token_ids": ids,
                "sequence_score": float(out.sequences_scores[row]) if beams else None,
                "tokens": tokens,
            })
        results.append({"prompt": prompt, "completions": completions})

    if args.json:
        print(json.dumps({"model": args.model, "results": results}, indent=1))
        return 0
    for result in results:
        grouped = len(result["completions"]) > 1 or beams
        if grouped:
            print(f"=== {result['prompt']!r}")
        for r, c in enumerate(result["completions"]):
            if grouped:
                score = f"  score {c['sequence_score']:.4f}" if beams else ""
                print(f"[{r + 1}]{score}  {c['text']}")
            elif not args.stream:
                print(c["text"])
            if args.show_scores:
                print(f"    {'token':>6}  {'text':<16} {'log-prob':>9} {'prob':>8}")
                for t in c["tokens"]:
                    print(f"    {t['id']:>6}  {t['text']!r:<16} {t['logprob']:>9.4f} {t['prob']:>8.2%}")
                if beams:
                    print(f"    sequence score: {c['sequence_score']:.4f}")
    return 0


def _check_job(args):
    """With ``--input``: its requests, the options checked (before anything loads)."""
    if not args.input:
        if args.output:
            raise ValueError("--output needs --input")
        return None
    from jaxgen import jsonl

    clash = [flag for flag, on in (("PROMPT", args.prompts), ("--output", not args.output), ("--stream", args.stream),
                                   ("--json", args.json), ("--show-scores", args.show_scores),
                                   ("--do-sample with --num-beams", args.do_sample and args.num_beams != 1),
                                   ("--prompt-lookup", args.prompt_lookup),
                                   ("--assistant-model", args.assistant_model),
                                   ("--assistant-early-exit", args.assistant_early_exit is not None),
                                   ("--num-return-sequences", args.num_return_sequences != 1)) if on]
    if clash:
        raise ValueError(f"--input runs a file of requests into --output (greedy, sampling or beam search): "
                         f"{'leave out' if clash[0] != '--output' else 'give'} {clash[0]}")
    if args.max_rows < 1:
        raise ValueError(f"--max-rows={args.max_rows} is not allowed: expected an int >= 1")
    if args.max_rows < args.num_beams:
        raise ValueError(f"--max-rows={args.max_rows} is not allowed: a beam search request takes "
                         f"--num-beams={args.num_beams} rows")
    if Path(args.output).resolve() == Path(args.input).resolve():
        raise ValueError("--output must be another file than --input (results are appended to it)")
    return jsonl.read_requests(args.input)


def _run_job(args, requests, model, tokenizer, eos, pad, status) -> int:
    """``--input`` into ``--output`` through `jaxgen.generate_batch`'s rows, resuming."""
    import jax

    from jaxgen import jsonl
    from jaxgen.decoding import args as decode_args
    from jaxgen.decoding import batch

    objs, lines = requests
    results = jsonl.Results(args.output)
    todo = [i for i, obj in enumerate(objs) if obj["id"] not in results.done]
    status(f"{len(objs)} requests in {args.input}, {len(objs) - len(todo)} already in {args.output}")
    shared = _shared_options(args, eos, pad)
    if args.num_beams > 1:
        shared.update(num_beams=args.num_beams, length_penalty=args.length_penalty, early_stopping=args.early_stopping)
    key = jax.random.key(args.seed or 0)
    try:  # the command's own options, named as typed, before any line is blamed for them
        decode_args.parse(model, [[0]], [[1]], dict(shared, key=key) if args.do_sample else shared)
    except ValueError as e:
        raise _as_typed(e, args) from None
    prompts = [dict(objs[i]) for i in todo]
    if args.do_sample:  # a request's key depends on its line, not on what an earlier run finished
        for i, p in zip(todo, prompts):
            if "seed" not in p:
                p["key"] = jax.random.fold_in(key, i)
    for p in prompts:  # a chat model's prompt through its template, as --chat does
        if args.chat and "prompt" in p:
            p["messages"] = [{"role": "user", "content": p.pop("prompt")}]
    label = lambda index, rid: f"{args.input}:{lines[todo[index]]} (id {rid!r})"  # noqa: E731
    try:
        for done in batch.completions(model, prompts, max_rows=args.max_rows, tokenizer=tokenizer,
                                      progress=True, labels=label, **shared):
            results.write(done)
    finally:
        results.close()
    status(f"wrote {len(todo)} results to {args.output}")
    return 0


def _shared_options(args, eos, pad) -> dict:
    """generate() arguments from the options every mode shares; those left out leave the model's
    generation_config.json in charge, as in transformers."""
    optional = dict(repetition_penalty=args.repetition_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size,
                    temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, stop_strings=args.stop)
    return dict(max_new_tokens=args.max_new_tokens, eos_token_id=eos, pad_token_id=pad, do_sample=args.do_sample,
                **{name: value for name, value in optional.items() if value is not None})


def _as_typed(error: ValueError, args) -> ValueError:
    """``error`` with generate()'s argument names as the command's options: max_new_tokens=-5 ->
    --max-new-tokens=-5."""
    return ValueError(re.sub(r"\b([a-z_]+)=", lambda m: _flag(m.group(1), args), str(error)))


_OPTION_OF = {"prompt_lookup_num_tokens": "prompt_lookup"}  # generate() names the command spells otherwise


def _flag(name: str, args) -> str:
    """``name=`` as the command's option (``--max-new-tokens=``) where it has one."""
    option = _OPTION_OF.get(name, name)
    if option in vars(args) and option not in ("prompts", "command"):
        return f"--{option.replace('_', '-')}="
    return f"{name}="


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """A warning as one line of the command's own (not Python's file:line and source line)."""
    print(f"jaxgen: warning: {message}", file=sys.stderr)


def main(argv=None) -> int:
    # transformers advises at import that PyTorch is missing; the command never needs it.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            args = build_parser().parse_args(argv)
            return run_generate(args)
    except (_UsageError, ValueError) as e:
        print(f"jaxgen: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
