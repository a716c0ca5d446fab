"""The workloads of `benchmark.py` whose strategies transformers 5.x runs from the hub only:
``contrastive-B`` (contrastive search, top_k 4, penalty_alpha 0.6), ``groupKxG-B`` (group beam
search, K beams in G groups, diversity_penalty 0.5) and ``constrainedK-B`` (constrained beam
search, K beams, `FORCED` words: a phrase and a choice of two), at batch B.

The reference is transformers 4.53.3, which still has them in its core, in a virtual environment
of its own (``--hf453``: its python; by default the one tests/test_hf453.py builds in
``~/.cache/jaxgen-tests``), run in a subprocess on the same checkpoint, prompts, dtype, device
and number of threads. Its sequences must equal jaxgen's before any time is reported. Timing: half of
jaxgen's repetitions, then transformers' (all in its process, after one warm-up call), then the
other half of jaxgen's; medians. The reference half of this file runs in that environment,
which has no jax: jax and jaxgen are imported where jaxgen runs.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HF453 = Path.home() / ".cache" / "jaxgen-tests" / "transformers-4.53.3" / "bin" / "python"
FORCED = [[100, 200, 300], [[400], [500, 600]]]  # ids every vocabulary of the benchmark's models holds


def parse(name: str) -> tuple[str, dict, int] | None:
    """``"group4x2-1"`` -> ("group", generate kwargs, batch); None for another workload name."""
    m = re.fullmatch(r"contrastive-([1-9]\d*)", name)
    if m:
        return "contrastive", dict(penalty_alpha=0.6, top_k=4), int(m.group(1))
    m = re.fullmatch(r"group([1-9]\d*)x([1-9]\d*)-([1-9]\d*)", name)
    if m:
        return "group", dict(num_beams=int(m.group(1)), num_beam_groups=int(m.group(2)), diversity_penalty=0.5), int(
            m.group(3))
    m = re.fullmatch(r"constrained([2-9]|[1-9]\d+)-([1-9]\d*)", name)
    if m:
        return "constrained", dict(num_beams=int(m.group(1)), force_words_ids=FORCED), int(m.group(2))
    return None


def _reference(python: str, checkpoint: str, call: dict, args, device: str) -> dict:
    """Runs in 4.53's environment: ``python hub_workload.py --reference`` with the call on stdin."""
    proc = subprocess.run([python, __file__, "--reference", checkpoint, str(args.reps), str(args.threads), args.dtype,
                           device],
                          input=json.dumps(call), capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"transformers 4.53 failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(name: str, args, model, checkpoint: str, prompts, device: str) -> dict:
    import jax

    from jaxgen.decoding.api import compile_generate

    strategy, extra, batch = parse(name)
    new = args.new_tokens
    ids, mask = prompts(batch, args.prompt_len, model.config.vocab_size)
    kw = dict(max_new_tokens=new, min_new_tokens=new, pad_token_id=0, eos_token_id=0, **extra)
    t0 = time.perf_counter()
    with jax.default_matmul_precision("highest"):  # full float32 products on a GPU too, as torch's
        run_jax = compile_generate(model, ids, mask, **kw)
    ours = jax.block_until_ready(run_jax())
    first = time.perf_counter() - t0
    times = []

    def time_jax(n):
        for _ in range(n):
            t0 = time.perf_counter()
            jax.block_until_ready(run_jax())
            times.append(time.perf_counter() - t0)

    time_jax(args.reps // 2)
    ref = _reference(str(args.hf453 or HF453), checkpoint, dict(kw, ids=ids.tolist(), mask=mask.tolist()), args,
                     device)
    time_jax(args.reps - args.reps // 2)
    rows = batch * extra.get("num_beams", extra.get("top_k", 1))  # rows each forward pass runs
    result = {"workload": name, "batch": batch, "rows": rows, "new_tokens": new,
              "outputs_equal": bool(np.array_equal(ours.trim().sequences, np.asarray(ref["sequences"])))}
    if not result["outputs_equal"]:
        print(f"{name}: outputs differ between jaxgen and transformers 4.53; speed not reported", flush=True)
        return result
    jax_t, torch_t = statistics.median(times), statistics.median(ref["times"])
    result.update(jax_first_s=first, torch_first_s=ref["first"], jax_ms_per_step=1e3 * jax_t / new,
                  torch_ms_per_step=1e3 * torch_t / new, jax_tokens_per_s=batch * new / jax_t,
                  torch_tokens_per_s=batch * new / torch_t, speedup=torch_t / jax_t)
    print(f"{name}: jaxgen {result['jax_ms_per_step']:.1f} ms/step, transformers 4.53 "
          f"{result['torch_ms_per_step']:.1f} ms/step, x{result['speedup']:.2f}", flush=True)
    return result


def print_table(results) -> None:
    print("\n| workload (vs transformers 4.53) | outputs equal | ms/step jaxgen | ms/step transformers | "
          "tokens/s jaxgen | tokens/s transformers | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        if "speedup" not in r:
            print(f"| {r['workload']} | no | | | | | |")
            continue
        print(f"| {r['workload']} ({r['rows']} rows) | yes | {r['jax_ms_per_step']:.1f} | "
              f"{r['torch_ms_per_step']:.1f} | {r['jax_tokens_per_s']:.0f} | {r['torch_tokens_per_s']:.0f} | "
              f"{r['speedup']:.2f}x |")


def _reference_main(checkpoint: str, reps: int, threads: int, dtype: str, device: str) -> None:
    import torch
    import transformers

    torch.set_num_threads(threads)
    call = json.load(sys.stdin)
    ids, mask = (torch.tensor(call.pop(name), device=device) for name in ("ids", "mask"))
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, torch_dtype=getattr(torch, dtype))
    model = model.to(device).eval()

    def generate():
        out = model.generate(ids, attention_mask=mask, trust_remote_code=True, **call)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    times = []
    with torch.no_grad():
        t0 = time.perf_counter()
        out = generate()
        first = time.perf_counter() - t0
        for _ in range(reps):
            t0 = time.perf_counter()
            generate()
            times.append(time.perf_counter() - t0)
    print(json.dumps({"sequences": out.cpu().tolist(), "times": times, "first": first}))


if __name__ == "__main__" and sys.argv[1:2] == ["--reference"]:
    _reference_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6])
