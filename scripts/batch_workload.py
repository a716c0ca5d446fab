"""The dataset workload of `benchmark.py`: ``batch-N``, N requests of mixed lengths.

Requests: prompts of 8-128 random tokens, ``max_new_tokens`` drawn from 16-256 (a row also ends
on EOS), greedy. Timed, each after compiling its programs on the same shapes:

- jaxgen ``generate_batch`` over ``--rows`` decode rows (continuous batching);
- jaxgen static batches of ``--rows`` requests in input order, each ``generate`` running to the
  longest ``max_new_tokens`` of its batch (rounded up to 32, so that batches share programs);
- transformers' continuous batching (``init_continuous_batching``, its own scheduling), else its
  static ``generate`` batches like jaxgen's.

Before any time is reported, the continuous results are compared with the static ones (each
row cut at its own ``max_new_tokens`` or EOS). Throughput counts the tokens each request asked
for (up to EOS), not the padding a static batch decodes past it.
"""

from __future__ import annotations

import time

import jax
import numpy as np
import torch

import jaxgen
from jaxgen.decoding.api import compile_generate


def requests(n: int, vocab: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"id": i, "input_ids": rng.integers(3, vocab, rng.integers(8, 129)).tolist(),
             "max_new_tokens": int(rng.integers(16, 257))} for i in range(n)]


def _cut(tokens, new: int, eos: set) -> list[int]:
    tokens = list(tokens[:new])
    ends = [i for i, t in enumerate(tokens) if t in eos]
    return tokens[:ends[0] + 1] if ends else tokens


def static_batches(reqs, rows: int):
    """Consecutive batches of ``rows`` requests: (left-padded ids, mask, new tokens to run)."""
    for start in range(0, len(reqs), rows):
        part = reqs[start:start + rows]
        width = max(len(r["input_ids"]) for r in part)
        ids = np.zeros((len(part), width), np.int32)
        mask = np.zeros((len(part), width), np.int32)
        for i, r in enumerate(part):
            ids[i, width - len(r["input_ids"]):] = r["input_ids"]
            mask[i, width - len(r["input_ids"]):] = 1
        yield part, ids, mask, -(-max(r["max_new_tokens"] for r in part) // 32) * 32


def run(name: str, args, model, torch_model) -> dict:
    n, rows = int(name.split("-")[1]), args.rows
    vocab = model.config.vocab_size
    reqs = requests(n, vocab)
    eos = set(model.config.eos_token_id)
    kw = dict(pad_token_id=0, eos_token_id=list(eos) or None)
    max_length = 128 + 256

    # jaxgen, continuous: compile on a few requests covering every prompt bucket, then time all.
    warm = [dict(r, input_ids=r["input_ids"][:length], max_new_tokens=2) for r, length in zip(reqs, (8, 40, 72, 128))]
    jaxgen.generate_batch(model, warm, max_rows=rows, max_length=max_length, progress=False, **kw)
    t0 = time.perf_counter()
    continuous = jaxgen.generate_batch(model, reqs, max_rows=rows, max_length=max_length, progress=False, **kw)
    jax_continuous_s = time.perf_counter() - t0
    useful = sum(len(c.tokens) for c in continuous)

    # jaxgen, static batches: every program compiled first.
    calls = [(part, ids.shape[1], compile_generate(model, ids, mask, max_new_tokens=new, **kw))
             for part, ids, mask, new in static_batches(reqs, rows)]
    t0 = time.perf_counter()
    static = {}
    for part, width, run_jax in calls:
        seqs = run_jax().trim().sequences
        for r, row in zip(part, seqs):
            static[r["id"]] = _cut(row[width:].tolist(), r["max_new_tokens"], eos)
    jax_static_s = time.perf_counter() - t0
    equal = sum(c.tokens == static[c.id] for c in continuous)
    result = {"workload": name, "requests": n, "rows": rows, "useful_tokens": useful,
              "requests_equal_to_static": equal,
              "jax_continuous_tokens_per_s": useful / jax_continuous_s,
              "jax_static_tokens_per_s": useful / jax_static_s}
    result["torch"], result["torch_tokens_per_s"] = _torch(torch_model, reqs, rows, kw, useful)
    print(f"{name}: {equal} of {n} requests equal between continuous and static batches; jaxgen continuous "
          f"{result['jax_continuous_tokens_per_s']:.0f} tokens/s, static {result['jax_static_tokens_per_s']:.0f}, "
          f"transformers ({result['torch']}) {result['torch_tokens_per_s']:.0f}", flush=True)
    return result


def _torch(torch_model, reqs, rows, kw, useful) -> tuple[str, float]:
    """transformers' continuous batching where it runs here, else its static batches."""
    from transformers import GenerationConfig

    config = GenerationConfig(do_sample=False, max_new_tokens=256, pad_token_id=0, eos_token_id=kw["eos_token_id"])
    try:
        manager = torch_model.init_continuous_batching(generation_config=config)
        manager.start()
        try:
            for r in reqs[:4]:  # warm-up
                manager.add_request(r["input_ids"], request_id=f"w{r['id']}", max_new_tokens=2)
            for r in reqs[:4]:
                manager.get_result(request_id=f"w{r['id']}", timeout=600)
            t0 = time.perf_counter()
            for r in reqs:
                manager.add_request(r["input_ids"], request_id=str(r["id"]), max_new_tokens=r["max_new_tokens"])
            for r in reqs:
                manager.get_result(request_id=str(r["id"]), timeout=3600)
            return "continuous batching", useful / (time.perf_counter() - t0)
        finally:
            manager.stop(block=True)
    except Exception as e:  # noqa: BLE001 (any failure of an optional path: fall back, say so)
        print(f"transformers' continuous batching failed ({type(e).__name__}: {e}); timing its static generate")
    t0 = time.perf_counter()
    with torch.no_grad():
        for part, ids, mask, new in static_batches(reqs, rows):
            torch_model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=new,
                                 do_sample=False, **kw)
    return "static generate", useful / (time.perf_counter() - t0)


def print_table(results) -> None:
    print("\n| workload | requests equal to static | tokens/s jaxgen continuous | jaxgen static | transformers | "
          "continuous / static | continuous / transformers |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['workload']} ({r['rows']} rows) | {r['requests_equal_to_static']} of {r['requests']} | "
              f"{r['jax_continuous_tokens_per_s']:.0f} | {r['jax_static_tokens_per_s']:.0f} | "
              f"{r['torch_tokens_per_s']:.0f} ({r['torch']}) | "
              f"{r['jax_continuous_tokens_per_s'] / r['jax_static_tokens_per_s']:.2f}x | "
              f"{r['jax_continuous_tokens_per_s'] / r['torch_tokens_per_s']:.2f}x |")
    jax.clear_caches()
