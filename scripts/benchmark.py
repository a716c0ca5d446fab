"""jaxgen against transformers generate(), side by side in one process.

    python scripts/benchmark.py                       # GPT-2 124M architecture, random weights
    python scripts/benchmark.py --model path/to/gpt2 --new-tokens 32 --workloads greedy-1 beam4-8
    python scripts/benchmark.py --workloads beam5-1 greedy-6 sample-12   # any strategy-batch
    python scripts/benchmark.py --dtype bfloat16 --quantize int8      # int8 beside bfloat16 and transformers
    python scripts/benchmark.py --workloads contrastive-1 group4x2-1 constrained4-1  # against transformers 4.53
    python scripts/grow_model.py --out ~/.cache/jaxgen-bench/demo-grown-88m   # a target for the demo draft
    python scripts/benchmark.py --model ~/.cache/jaxgen-bench/demo-grown-88m --workloads assisted-1 lookup-1

A workload is ``greedy-B``, ``sample-B`` (top-k 50, top-p 0.9, temperature 0.8) or ``beamK-B``
(K beams) at batch B; the default five are the ones the README and docs/performance.md report.
``batch-N`` (continuous batching) is `batch_workload`'s; ``contrastive-B``, ``groupKxG-B`` and
``constrainedK-B`` (strategies transformers 5.x runs from the hub only) are `hub_workload`'s, timed against
transformers 4.53 in a subprocess; ``assisted-B`` and ``lookup-B`` (assisted decoding against
jaxgen's own greedy search) are `assisted_workload`'s.

For each workload both libraries decode the same left-padded prompts (``--prompt-len`` tokens,
``--new-tokens`` new tokens, every step run: ``min_new_tokens`` keeps EOS away), alternating
repetition by repetition after a warm-up, with the same number of threads. Before any speed is
reported the outputs are compared: in float32 greedy and beam sequences must be equal; in
bfloat16 the two libraries round differently and part ways after some steps, so the table says
for how many steps they agree (both still decode every step). Reported: the first call (trace +
compile + run; jaxgen's compile alone in brackets), steady-state ms per generated step (median;
prefill included), tokens/s, peak memory of one call (measured in a fresh process per library
and workload: peak growth of anonymous RSS over the loaded model on CPU; device memory on a
GPU), the jaxgen / transformers speed ratio (of the medians; in brackets its range over the
back-to-back pairs, which shows how noisy the machine was), and a roofline bound per workload
from this machine's measured memory bandwidth and matmul throughput (weights + KV cache bytes
per step over bandwidth, or FLOPs over throughput, whichever is larger; each measured before and
after every workload, the better of the two kept for it: on a shared machine either rate can
halve or double for minutes at a time).
Optional: transformers with its static cache and ``torch.compile`` (``--torch-compile``). With
``--quantize int8`` jaxgen's int8 model, its model in ``--dtype`` and transformers run in turns,
and the table adds the int8 speedup over ``--dtype`` and the two sizes of the weights.
Writes a markdown table to stdout and JSON to ``--json`` (rewritten after every workload).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

# On a GPU, JAX by default takes 75% of device memory at start; transformers shares the device
# here and the memory probes run in fresh processes beside this one: allocate on demand instead.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its workload modules, when it is imported
import assisted_workload  # noqa: E402
import hub_workload  # noqa: E402
import jaxgen  # noqa: E402
from jaxgen.cli import DEMO_MODEL  # noqa: E402
from jaxgen.decoding.api import compile_generate  # noqa: E402

TORCH_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
WORKLOADS = ("greedy-1", "greedy-8", "beam4-1", "beam4-8", "sample-8")  # the default ones


def workload(name: str) -> tuple[str, int, int]:
    """``"beam4-8"`` -> (strategy, num_beams, batch): ``("beam", 4, 8)``; also ``greedy-B``, ``sample-B``,
    ``batch-N`` (N requests through continuous batching, `batch_workload`), and `hub_workload`'s
    ``contrastive-B``, ``groupKxG-B`` and ``constrainedK-B``."""
    m = re.fullmatch(r"(greedy|sample|batch|beam([1-9]\d*))-([1-9]\d*)", name)
    hub, assisted = hub_workload.parse(name), assisted_workload.parse(name)
    if hub:
        return hub[0], hub[1].get("num_beams", 1), hub[2]
    if assisted:
        return assisted[0], 1, assisted[1]
    if m is None:
        raise argparse.ArgumentTypeError(f"{name!r}: expected greedy-B, sample-B, beamK-B (K beams, batch B), "
                                         "batch-N (N requests), contrastive-B, groupKxG-B (K beams in G groups), "
                                         "constrainedK-B, assisted-B or lookup-B")
    return ("beam" if m.group(2) else m.group(1)), int(m.group(2) or 1), int(m.group(3))


def _workload_name(name: str) -> str:
    workload(name)
    return name


# --- machine limits ------------------------------------------------------------------------------


def measure_machine(dtype=jnp.float32) -> dict:
    """Read bandwidth (a jitted sum over 1 GiB) and matmul throughput (2048^3, random operands)
    in ``dtype``, accumulated in float32 as the model's matmuls are. On an accelerator each
    timing spans 20 calls dispatched back to back, so that the host's dispatch does not count."""
    calls = 1 if jax.default_backend() == "cpu" else 20
    x = jnp.ones((256 * 1024 * 1024,), jnp.float32)
    bandwidth = x.nbytes / _seconds_per_call(jax.jit(jnp.sum), x, calls)
    a = jax.random.normal(jax.random.key(0), (2048, 2048), dtype)
    with jax.default_matmul_precision("highest"):
        mm = jax.jit(lambda a: jnp.matmul(a, a, preferred_element_type=jnp.float32))
        t_mm = _seconds_per_call(mm, a, calls)
    return {"bandwidth_GBps": bandwidth / 1e9, "matmul_GFLOPs": 2 * 2048**3 / t_mm / 1e9}


def cpu_model() -> str:
    """The CPU's name, family and model, and its widest vector and matrix extensions (Linux)."""
    try:
        info = dict(line.split(":", 1) for line in open("/proc/cpuinfo").read().split("\n\n")[0].splitlines()
                    if ":" in line)
    except OSError:
        return platform.processor() or platform.machine()
    info = {k.strip(): v.strip() for k, v in info.items()}
    flags = set(info.get("flags", "").split())
    named = (("avx512f", "AVX-512"), ("avx512_bf16", "AVX512-BF16"), ("amx_bf16", "AMX-BF16"))
    extensions = [name for flag, name in named if flag in flags] or ["AVX2" if "avx2" in flags else "SSE"]
    return (f"{info.get('model name', platform.machine())} (family {info.get('cpu family')} model {info.get('model')}, "
            f"{'/'.join(extensions)})")


def _seconds_per_call(fn, arg, calls: int, tries: int = 5) -> float:
    """Best of ``tries`` timings of ``calls`` back-to-back calls (after one warm-up), per call."""
    fn(arg).block_until_ready()
    best = float("inf")
    for _ in range(tries):
        t0 = time.perf_counter()
        for _ in range(calls):
            out = fn(arg)
        out.block_until_ready()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best


def step_bound(model, rows: int, prompt: int, new: int, machine: dict) -> float:
    """Seconds per decoding step at the roofline: max(bytes / bandwidth, flops / throughput).

    A step reads every weight once (the LM head all of its matrix; of the embedding tables only
    a row per token, counted as nothing, unless the head is the tied embedding) and each row's
    KV cache up to the average context (a sliding layer's up to its window)."""
    c, params = model.config, model.params
    lookups = [params["embed"], params.get("pos_embed")] if "lm_head" in params else [params.get("pos_embed")]
    weights = sum(x.size for x in jax.tree.leaves(params)) - sum(x.size for x in jax.tree.leaves(lookups))
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params)) - sum(x.nbytes for x in jax.tree.leaves(lookups))
    avg_ctx = prompt + new / 2
    slots = sum(min(avg_ctx, w or avg_ctx) for w in (c.layer_windows or (None,) * c.n_layers))  # over layers
    kv_bytes = rows * slots * c.kv_bytes_per_slot / c.n_layers
    flops = 2 * rows * weights + rows * slots * 4 * c.n_heads * c.head_dim
    return max((weight_bytes + kv_bytes) / (machine["bandwidth_GBps"] * 1e9),
               flops / (machine["matmul_GFLOPs"] * 1e9))


# --- memory ------------------------------------------------------------------------------------


def _rss() -> int:
    """Anonymous resident memory (Linux): what the process allocated, without the file pages of
    a memory-mapped checkpoint, which transformers reads in at its first call (~500 MB for GPT-2
    124M, which total RSS would count as that call's memory)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


def peak_memory(fn) -> int:
    """Peak growth (bytes) of anonymous RSS during ``fn()``, sampled every 0.5 ms (CPU)."""
    base, peak, stop = _rss(), [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.0005)

    thread = threading.Thread(target=sample)
    thread.start()
    try:
        fn()
    finally:
        stop.set()
        thread.join()
    return max(peak[0], _rss()) - base


# --- the two libraries -------------------------------------------------------------------------


# Architectures with random weights (--arch): transformers config class and its arguments.
# initializer_range above the usual 0.02 makes next-token distributions peaked enough for greedy
# and beam outputs of both libraries to agree exactly (no float-noise near-ties).
ARCHS = {
    "gpt2-124m": ("GPT2Config", dict(initializer_range=0.1)),
    "qwen2.5-0.5b": ("Qwen2Config", dict(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151643, initializer_range=0.1)),
    "llama-3.2-1b": ("LlamaConfig", dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, rms_norm_eps=1e-5,
        rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192), rope_theta=500000.0,
        tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001, initializer_range=0.1)),
    "gemma-3-1b": ("Gemma3TextConfig", dict(
        vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=512, sliding_window_pattern=6,
        max_position_embeddings=32768, rope_theta=1000000.0, rope_local_base_freq=10000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True, bos_token_id=2, eos_token_id=1, pad_token_id=0, initializer_range=0.1)),
}


def default_checkpoint(cache: Path, arch: str, layers: int | None = None) -> Path:
    """``arch``'s architecture (`ARCHS`; ``layers`` overrides its depth) with random weights,
    saved once under ``cache``."""
    import transformers

    config_class, kwargs = ARCHS[arch]
    if layers is not None:
        kwargs = {**kwargs, ("n_layer" if arch.startswith("gpt2") else "num_hidden_layers"): layers}
    path = cache / f"{arch}{'' if layers is None else f'-{layers}L'}-random"
    if not (path / "config.json").exists():
        torch.manual_seed(0)
        config = getattr(transformers, config_class)(**kwargs)
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def load(args, library: str, quantize: bool = True):
    """The checkpoint (``--model``, else ``--arch`` with random weights) in ``--dtype``: a jaxgen
    model (its weights in int8 with ``--quantize int8``, unless ``quantize`` is False), or a
    transformers one in eval mode on ``TORCH_DEVICE``."""
    path = args.model or default_checkpoint(args.cache, args.arch, args.layers)
    if library == "jaxgen":
        return jaxgen.from_pretrained(path, dtype=args.dtype, quantize=args.quantize if quantize else None)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).to(TORCH_DEVICE).eval()


def hf_kwargs(strategy: str, num_beams: int, new: int, pad: int) -> dict:
    kw = dict(max_new_tokens=new, min_new_tokens=new, pad_token_id=pad, eos_token_id=pad)
    if strategy == "beam":
        kw.update(num_beams=num_beams)
    elif strategy == "sample":
        kw.update(do_sample=True, top_k=50, top_p=0.9, temperature=0.8)
    else:
        kw.update(do_sample=False)
    return kw


def prompts(batch: int, length: int, vocab: int, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(batch, length))
    mask = np.ones_like(ids)
    for row in range(1, batch):  # some left padding, as real batches have
        pad = int(rng.integers(0, length // 4))
        ids[row, :pad], mask[row, :pad] = 0, 0
    return ids, mask


def workload_calls(name: str, args, model, torch_model=None):
    """A workload's prompts and generate() arguments, and its calls: ``(jaxgen, torch)``, the
    compiled jaxgen program (sampling with a fixed key) and transformers' ``generate`` (taking
    extra keyword arguments); each is None without its model."""
    strategy, num_beams, batch = workload(name)
    vocab = (model if model is not None else torch_model).config.vocab_size
    ids, mask = prompts(batch, args.prompt_len, vocab)
    kw = hf_kwargs(strategy, num_beams, args.new_tokens, 0)
    run_jax = run_torch = None
    if model is not None:
        jkw = dict(kw, key=jax.random.key(0)) if strategy == "sample" else kw
        with jax.default_matmul_precision("highest"):  # full float32 matmuls on a GPU too, as torch's
            run_jax = compile_generate(model, ids, mask, **jkw)
    if torch_model is not None:
        t_ids, t_mask = torch.tensor(ids, device=TORCH_DEVICE), torch.tensor(mask, device=TORCH_DEVICE)

        def run_torch(**model_kwargs):
            with torch.no_grad():
                out = torch_model.generate(t_ids, attention_mask=t_mask, **kw, **model_kwargs)
            if TORCH_DEVICE == "cuda":
                torch.cuda.synchronize()
            return out

    return run_jax, run_torch


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint directory of any family (default: --arch with random weights)")
    ap.add_argument("--arch", choices=sorted(ARCHS), default="gpt2-124m",
                    help="architecture of the random-weight default checkpoint (saved to --cache)")
    ap.add_argument("--layers", type=int, help="override --arch's number of layers")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "jaxgen-bench")
    ap.add_argument("--workloads", nargs="+", type=_workload_name, default=list(WORKLOADS), metavar="WORKLOAD",
                    help=f"greedy-B, sample-B, beamK-B, batch-N, contrastive-B or groupKxG-B (default: "
                    f"{' '.join(WORKLOADS)})")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--quantize", choices=["int8"], help="jaxgen's weights in int8 (transformers' stay in --dtype); "
                    "jaxgen's model in --dtype is timed beside it")
    ap.add_argument("--torch-compile", action="store_true", help="also time transformers static cache + torch.compile")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rows", type=int, default=8, help="decode rows of the batch-N workloads")
    ap.add_argument("--hf453", type=Path, help="python of a venv with transformers 4.53.3, for contrastive-B and "
                    f"groupKxG-B (default: {hub_workload.HF453}, which tests/test_hf453.py builds)")
    ap.add_argument("--assistant-model", type=Path, default=DEMO_MODEL,
                    help="the draft model of assisted-B (default: the shipped demo model)")
    ap.add_argument("--num-assistant-tokens", type=int, default=5, help="K of assisted-B")
    ap.add_argument("--prompt-lookup", type=int, default=10, help="K of lookup-B")
    ap.add_argument("--json", type=Path, default=Path("bench-results/benchmark.json"))
    ap.add_argument("--memory-probe", nargs=2, metavar=("LIBRARY", "WORKLOAD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_probe:
        return memory_probe(args, *args.memory_probe)

    torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision("highest")  # its default; as jaxgen's below (no TF32 on a GPU)
    torch_model, model = load(args, "torch"), load(args, "jaxgen")
    unquantized = load(args, "jaxgen", quantize=False) if args.quantize else None
    measurements = [measure_machine(model.dtype)]
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, jax {jax.__version__} "
          f"on {jax.devices()[0].device_kind}, torch {torch.__version__} on {TORCH_DEVICE} ({args.threads} threads); "
          f"{_limits(measurements[0])}", flush=True)

    args.json.parent.mkdir(parents=True, exist_ok=True)
    results, batch_results, hub_results, assisted_results = [], [], [], []
    if any(assisted_workload.parse(name) for name in args.workloads):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model or DEMO_MODEL, padding_side="left")
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
        draft = jaxgen.from_pretrained(args.assistant_model, dtype=args.dtype)
    if any(name.startswith("batch-") for name in args.workloads):
        import batch_workload  # beside this script (its directory is on sys.path when run as one)
    for name in args.workloads:
        if name.startswith("batch-"):
            batch_results.append(batch_workload.run(name, args, model, torch_model))
            continue
        if assisted_workload.parse(name):
            assisted_results.append(assisted_workload.run(name, args, model, tokenizer, draft, _seconds_per_call))
            continue
        if hub_workload.parse(name):
            path = args.model or default_checkpoint(args.cache, args.arch, args.layers)
            hub_results.append(hub_workload.run(name, args, model, str(path), prompts, TORCH_DEVICE))
            continue
        r = run_workload(name, args, model, torch_model, unquantized)
        measurements.append(measure_machine(model.dtype))
        # The rates of a shared machine move for minutes at a time: each workload's bound uses
        # the better of the measurements taken right before and right after it.
        r["machine"] = {k: max(m[k] for m in measurements[-2:]) for k in measurements[-1]}
        print(f"  machine after {name}: {_limits(measurements[-1])}", flush=True)
        if "jax_ms_per_step" in r:
            bound = step_bound(model, r["rows"], args.prompt_len, args.new_tokens, r["machine"])
            r.update(bound_ms_per_step=1e3 * bound, jax_of_bound=1e3 * bound / r["jax_ms_per_step"])
        results.append(r)
        args.json.write_text(json.dumps({"machine_measurements": measurements,  # after each workload
                                         "args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                        indent=1))
    if results:
        print_table(results, args)
    if batch_results:
        batch_workload.print_table(batch_results)
        args.json.with_name("batch.json").write_text(json.dumps(batch_results, indent=1))
    if hub_results:
        hub_workload.print_table(hub_results)
        args.json.with_name("hub.json").write_text(json.dumps(hub_results, indent=1))
    if assisted_results:
        assisted_workload.print_table(assisted_results)
        args.json.with_name("assisted.json").write_text(json.dumps(assisted_results, indent=1))
    print(f"\nJSON: {args.json}")


def _limits(machine: dict) -> str:
    return f"read bandwidth {machine['bandwidth_GBps']:.1f} GB/s, matmul {machine['matmul_GFLOPs']:.0f} GFLOP/s"


def run_workload(name, args, model, torch_model, unquantized=None) -> dict:
    """Times ``name`` on jaxgen's ``model`` and transformers' ``torch_model`` in turns (and on
    jaxgen's ``unquantized`` model, where given, beside a quantized ``model``)."""
    strategy, num_beams, batch = workload(name)
    new = args.new_tokens
    t0 = time.perf_counter()
    run_jax, run_torch = workload_calls(name, args, model, torch_model)
    jax_compile = time.perf_counter() - t0  # trace, lower and compile
    first_out = jax.block_until_ready(run_jax())
    jax_first = time.perf_counter() - t0
    run_plain = None if unquantized is None else workload_calls(name, args, unquantized)[0]
    if run_plain is not None:
        jax.block_until_ready(run_plain())
    t0 = time.perf_counter()
    torch_out = run_torch()
    torch_first = time.perf_counter() - t0

    result = {"workload": name, "batch": batch, "rows": batch * num_beams, "new_tokens": new}
    if strategy != "sample":
        steps = agreeing_steps(first_out.trim().sequences, torch_out.cpu().numpy(), args.prompt_len)
        result.update(outputs_equal=steps == new, steps_equal=steps)
        if steps is None or (steps < new and args.dtype == "float32" and not args.quantize):
            print(f"{name}: outputs differ between jaxgen and transformers; speed not reported", flush=True)
            return result
        if steps < new:
            print(f"{name}: {_precision(args)} outputs equal transformers' for the first {steps} of {new} steps (the "
                  "two libraries round differently); timed anyway, both decode every step", flush=True)

    runs = {"torch": run_torch, "jax": lambda: jax.block_until_ready(run_jax())}
    if run_plain is not None:
        runs["plain"] = lambda: jax.block_until_ready(run_plain())
    times = {who: [] for who in runs}
    for _ in range(args.reps):  # alternate, so that machine noise hits all alike
        for who, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[who].append(time.perf_counter() - t0)
    jax_t, torch_t = statistics.median(times["jax"]), statistics.median(times["torch"])
    if run_plain is not None:  # the quantized model against jaxgen's own in --dtype
        result.update(unquantized_ms_per_step=1e3 * statistics.median(times["plain"]) / new,
                      **_speedup("quantized_speedup", times["plain"], times["jax"]),
                      weights_MB=_params_MB(model), unquantized_weights_MB=_params_MB(unquantized))
    result.update(
        jax_first_s=jax_first, jax_compile_s=jax_compile, torch_first_s=torch_first,
        jax_ms_per_step=1e3 * jax_t / new, torch_ms_per_step=1e3 * torch_t / new,
        jax_tokens_per_s=batch * new / jax_t, torch_tokens_per_s=batch * new / torch_t,
        **_speedup("speedup", times["torch"], times["jax"]),
        jax_peak_MB=probe_in_subprocess(args, "jaxgen", name), torch_peak_MB=probe_in_subprocess(args, "torch", name),
    )
    if args.torch_compile:
        result.update(torch_compiled(run_torch, new, args.reps))
    print(f"{name}: jaxgen {result['jax_ms_per_step']:.1f} ms/step, transformers {result['torch_ms_per_step']:.1f} "
          f"ms/step, x{result['speedup']:.2f}", flush=True)
    return result


def _speedup(key: str, slower: list[float], faster: list[float]) -> dict:
    """``key``: the ratio of the medians of two lists of seconds taken in turns; ``key_min`` /
    ``key_max``: its range over the back-to-back pairs (`_ratio` prints all three)."""
    pairs = [s / f for s, f in zip(slower, faster)]
    return {key: statistics.median(slower) / statistics.median(faster), key + "_min": min(pairs),
            key + "_max": max(pairs)}


def _params_MB(model) -> float:
    return sum(x.nbytes for x in jax.tree.leaves(model.params)) / 2**20


def agreeing_steps(ours: np.ndarray, theirs: np.ndarray, prompt_len: int) -> int | None:
    """How many generated steps, from the first, are equal in every row of the two
    ``[rows, prompt_len + steps]`` token arrays; None when their shapes differ."""
    if ours.shape != theirs.shape:
        return None
    differs = (ours[:, prompt_len:] != theirs[:, prompt_len:]).any(0)
    return int(differs.argmax()) if differs.any() else differs.size


def probe_in_subprocess(args, library: str, workload: str) -> float:
    """Peak MB of one call, measured in a fresh process (allocator caches of earlier runs
    would otherwise hide it)."""
    cmd = [sys.executable, __file__, "--memory-probe", library, workload, "--prompt-len", str(args.prompt_len),
           "--new-tokens", str(args.new_tokens), "--dtype", args.dtype, "--threads", str(args.threads),
           "--cache", str(args.cache), "--arch", args.arch] + (["--model", args.model] if args.model else []) + (
               ["--layers", str(args.layers)] if args.layers else []) + (
               ["--quantize", args.quantize] if args.quantize else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"memory probe {library} {workload} failed:\n{proc.stderr[-2000:]}")
    return float(proc.stdout.strip().splitlines()[-1])


def memory_probe(args, library: str, workload: str):
    print(probe_bytes(args, library, workload) / 2**20)


def probe_bytes(args, library: str, workload: str) -> int:
    """Loads one library's model (and compiles the jaxgen program, without running it), then
    returns the peak bytes of the first call over the memory in use. On CPU: anonymous RSS
    growth, after garbage was collected and freed memory went back to the OS. On a GPU: for
    transformers, the peak of PyTorch's allocator; for jaxgen, the temporaries plus outputs of the
    compiled program (XLA allocates them for the call; the device allocator's own peak would also
    count loading and autotuning)."""
    torch.set_num_threads(args.threads)
    model = load(args, library)
    if library == "jaxgen":
        run_jax, _ = workload_calls(workload, args, model)  # the timed program, compiled, not run
        if jax.default_backend() != "cpu":
            m = run_jax.compiled.memory_analysis()
            return m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
        fn = lambda: jax.block_until_ready(run_jax())  # noqa: E731
    else:
        _, fn = workload_calls(workload, args, None, model)
        if TORCH_DEVICE == "cuda":
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            fn()
            return torch.cuda.max_memory_allocated() - before
    # Free the garbage of loading and compiling now, not during the call (a collection there
    # shrank RSS by more than the call grew it: -80 MB; the probe's process ends after it), and
    # return freed memory to the OS.
    gc.collect()
    gc.disable()
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return peak_memory(fn)


def torch_compiled(run_torch, new, reps) -> dict:
    """transformers with a static cache and torch.compile (generate's auto-compile; on CPU it
    must be asked for with ``_compile_all_devices``)."""
    from transformers import CompileConfig

    config = CompileConfig()
    config._compile_all_devices = True  # a class attribute, not an __init__ argument
    extra = dict(cache_implementation="static", compile_config=config)
    try:
        t0 = time.perf_counter()
        run_torch(**extra)
        first = time.perf_counter() - t0
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            run_torch(**extra)
            times.append(time.perf_counter() - t0)
        return {"torch_compiled_first_s": first, "torch_compiled_ms_per_step": 1e3 * statistics.median(times) / new}
    except Exception as e:  # torch.compile needs a working toolchain; report, do not fail
        return {"torch_compiled_error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"}


def _ms(ms: float) -> str:
    """Three significant digits (at least the units): a GPU step of 0.574 ms, a CPU one of 39.6."""
    return f"{ms:.{max(0, 2 - math.floor(math.log10(ms)))}f}"


def _ratio(r: dict, key: str) -> str:
    """A ratio of medians with its range over the back-to-back pairs: ``1.54x (1.52-1.66)``."""
    return f"{r[key]:.2f}x ({r[key + '_min']:.2f}-{r[key + '_max']:.2f})"


def _precision(args) -> str:
    return args.dtype + (f", jaxgen's weights {args.quantize}" if args.quantize else "")


def print_table(results, args):
    print(f"\nprompt {args.prompt_len} tokens, {args.new_tokens} new tokens, {_precision(args)}, median of "
          f"{args.reps}\n")
    cols = ["workload", "first call jaxgen (its compile) / hf (s)", "ms/step jaxgen", "ms/step hf", "tokens/s jaxgen",
            "tokens/s hf", "speedup (pair range)", "bound ms/step", "jaxgen % of bound", "peak MB jaxgen / hf"]
    if args.torch_compile:
        cols.append("ms/step hf static+compile")
    if args.dtype != "float32" or args.quantize:
        cols.append("steps equal to hf")
    if args.quantize:
        cols += [f"ms/step jaxgen {args.dtype}", f"{args.quantize} speedup over {args.dtype} (pair range)",
                 f"weights MB {args.quantize} / {args.dtype}"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in results:
        if "speedup" not in r:
            print(f"| {r['workload']} | outputs differ | " + " | ".join([""] * (len(cols) - 2)) + " |")
            continue
        cells = [r["workload"], f"{r['jax_first_s']:.1f} ({r['jax_compile_s']:.1f}) / {r['torch_first_s']:.1f}",
                 _ms(r["jax_ms_per_step"]), _ms(r["torch_ms_per_step"]), f"{r['jax_tokens_per_s']:.0f}",
                 f"{r['torch_tokens_per_s']:.0f}",
                 _ratio(r, "speedup"),
                 _ms(r["bound_ms_per_step"]), f"{100 * r['jax_of_bound']:.0f}%",
                 f"{r['jax_peak_MB']:.0f} / {r['torch_peak_MB']:.0f}"]
        if args.torch_compile:
            cells.append(_ms(r["torch_compiled_ms_per_step"]) if "torch_compiled_ms_per_step" in r
                         else r.get("torch_compiled_error", "n/a"))
        if args.dtype != "float32" or args.quantize:
            cells.append(f"{r['steps_equal']} of {r['new_tokens']}" if "steps_equal" in r else "n/a (sampled)")
        if args.quantize:
            cells += [_ms(r["unquantized_ms_per_step"]),
                      _ratio(r, "quantized_speedup"),
                      f"{r['weights_MB']:.0f} / {r['unquantized_weights_MB']:.0f}"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
