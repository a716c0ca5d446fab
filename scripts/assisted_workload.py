"""The assisted-decoding workloads of `benchmark.py`: ``assisted-B`` (greedy with a draft model's
drafts, ``--assistant-model``, K = ``--num-assistant-tokens``, no confidence stop) and
``lookup-B`` (prompt lookup, K = ``--prompt-lookup``), at batch B, against jaxgen's plain greedy
search on the same prompts. The model needs its tokenizer: the prompts are text (openings of
fortune-cookie sayings for ``assisted``; for ``lookup``, a phrase repeated, which a model that
copies its input continues verbatim: the demo-grown target does on some, and the acceptance
rate says how much). A draft pair: ``scripts/grow_model.py`` grows the shipped
demo model into a 33x larger target that writes nearly the same text.

The outputs must equal greedy search's before any time is reported. Reported: tokens/s of both
(medians, alternating repetitions), the speed-up, the acceptance rate (draft tokens kept over
drafted), and the speed-up that the measured parts predict: ``E * t_plain / (K * t_draft +
t_verify)`` with ``E = (1 - a^(K+1)) / (1 - a)`` the expected tokens an iteration at acceptance
``a``, ``t_plain`` greedy search's time a token, ``t_draft`` one draft step (a forward of one
token, its head and argmax) and ``t_verify`` the model's forward over ``K + 1`` tokens, each timed
alone at the batch's rows. Rows of a batch wait for the slowest, which the prediction ignores.
"""

from __future__ import annotations

import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

SAYINGS = ["A friend is", "The best way to", "Love is", "If you want to", "Never trust a", "Life is", "Money is",
           "The man who"]
COPIED = ["No, no, no, no, no, no,", "la la la la la la", "I love you. I love you. I love you. I love you.",
          "Ha ha ha ha ha ha ha", "Run, run, run, run,", "Love is love is love is love is", "Go, go, go, go, go,",
          "More, more, more, more,"]


def parse(name: str) -> tuple[str, int] | None:
    """``"assisted-8"`` -> ("assisted", 8); None for another workload name."""
    m = re.fullmatch(r"(assisted|lookup)-([1-9]\d*)", name)
    return (m.group(1), int(m.group(2))) if m else None


def step_seconds(model, rows: int, tokens: int, slots: int, seconds_per_call) -> float:
    """One forward of ``tokens`` tokens a row at slot ``slots // 2`` of a ``slots``-slot cache, its
    head over every token and their argmax: a draft step (1 token) or a verify step (K + 1)."""
    from jaxgen.models.model import forward, logits

    ids, at = jnp.zeros((rows, tokens), jnp.int32), slots // 2
    positions, kv_mask = jnp.broadcast_to(at + jnp.arange(tokens), (rows, tokens)), jnp.ones((rows, slots), bool)

    @jax.jit
    def step(cache):  # the tokens chosen (the cache it writes is dropped: the next call starts alike)
        hidden, _ = forward(model, ids, positions, kv_mask, cache, at)
        return jnp.argmax(logits(model, hidden), -1)

    return seconds_per_call(step, model.init_cache(rows, slots), 1, tries=10)


def run(name: str, args, model, tokenizer, draft, seconds_per_call) -> dict:
    from jaxgen.decoding.api import compile_generate

    kind, batch = parse(name)
    texts = SAYINGS if kind == "assisted" else COPIED
    texts = (texts * batch)[:batch]
    enc = tokenizer(texts, return_tensors="np", padding=True)
    ids, mask, new = enc["input_ids"], enc["attention_mask"], args.new_tokens
    kw = dict(max_new_tokens=new, min_new_tokens=new, pad_token_id=0, eos_token_id=0)
    k = args.num_assistant_tokens if kind == "assisted" else args.prompt_lookup
    drafting = (dict(assistant_model=draft, num_assistant_tokens=k, assistant_confidence_threshold=0.0)
                if kind == "assisted" else dict(prompt_lookup_num_tokens=k))
    plain = compile_generate(model, ids, mask, **kw)
    assisted = compile_generate(model, ids, mask, **kw, **drafting)
    out, ref = assisted(), plain()
    result = {"workload": name, "batch": batch, "k": k, "new_tokens": new,
              "outputs_equal": bool(np.array_equal(np.asarray(out.sequences), np.asarray(ref.sequences)))}
    if not result["outputs_equal"]:
        print(f"{name}: outputs differ from greedy search's; speed not reported", flush=True)
        return result
    times = {"plain": [], "assisted": []}
    for _ in range(args.reps):  # alternate, so that machine noise hits both alike
        for label, fn in (("plain", plain), ("assisted", assisted)):
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[label].append(time.perf_counter() - t0)
    t_plain, t_assisted = (statistics.median(times[label]) for label in ("plain", "assisted"))
    a = float(np.asarray(out.num_accepted).sum() / max(1, np.asarray(out.num_drafted).sum()))
    result.update(plain_tokens_per_s=batch * new / t_plain, assisted_tokens_per_s=batch * new / t_assisted,
                  speedup=t_plain / t_assisted, acceptance=a)
    if kind == "assisted":
        slots = ids.shape[1] + new + k + 1
        t_draft = step_seconds(draft, batch, 1, slots, seconds_per_call)
        t_verify = step_seconds(model, batch, k + 1, slots, seconds_per_call)
        expected = (k + 1) if a == 1 else (1 - a ** (k + 1)) / (1 - a)
        predicted = expected * (t_plain / new) / (k * t_draft + t_verify)
        result.update(draft_ms=1e3 * t_draft, verify_ms=1e3 * t_verify, plain_ms_per_token=1e3 * t_plain / new,
                      expected_tokens_per_iteration=expected, predicted_speedup=predicted,
                      of_predicted=result["speedup"] / predicted)
    print(f"{name}: {result['assisted_tokens_per_s']:.1f} tokens/s against greedy's {result['plain_tokens_per_s']:.1f} "
          f"(x{result['speedup']:.2f}) at acceptance {a:.2f}", flush=True)
    return result


def print_table(results: list[dict]) -> None:
    print("\n| workload | K | outputs = greedy's | acceptance | greedy tokens/s | assisted tokens/s | speed-up | "
          "draft step ms | verify step ms | predicted speed-up | of predicted |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if not r["outputs_equal"]:
            print(f"| {r['workload']} | {r['k']} | no | | | | | | | | |")
            continue
        parts = [f"{r['draft_ms']:.2f}", f"{r['verify_ms']:.2f}", f"{r['predicted_speedup']:.2f}x",
                 f"{100 * r['of_predicted']:.0f}%"] if "predicted_speedup" in r else ["", "", "", ""]
        print(f"| {r['workload']} | {r['k']} | yes | {r['acceptance']:.2f} | {r['plain_tokens_per_s']:.1f} | "
              f"{r['assisted_tokens_per_s']:.1f} | {r['speedup']:.2f}x | " + " | ".join(parts) + " |")
