"""Peak host memory of `jaxgen.from_pretrained` against the checkpoint's size.

    python scripts/load_memory.py path/to/checkpoint [--dtype auto]
    python scripts/load_memory.py --arch llama-3.2-1b --save-dtype bfloat16   # random weights, saved once

Loads the checkpoint in a fresh process and reports the growth of its peak resident memory
(``VmHWM``, reset just before the call) over the memory in use then, as a multiple of the weight
files' bytes. ``--warm`` starts JAX's CPU client and imports transformers' config class first,
so that their one-time start-up (some 300 MB) is not counted.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def measure(path: str, dtype: str, warm: bool) -> dict:
    import jax
    import numpy as np

    import jaxgen

    if warm:
        from transformers import CONFIG_MAPPING

        jax.device_put(np.zeros(16, np.float32)).block_until_ready()
        CONFIG_MAPPING[json.loads((Path(path) / "config.json").read_text())["model_type"]]

    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM, the peak so far, to the current RSS
        f.write("5")
    before = _status_kb("VmRSS")
    model = jaxgen.from_pretrained(path, dtype=dtype)
    jax.block_until_ready(model.params)
    peak = _status_kb("VmHWM")
    files = sum(f.stat().st_size for f in Path(path).glob("*.safetensors")) or sum(
        f.stat().st_size for f in Path(path).glob("*.bin"))
    params = sum(x.nbytes for x in jax.tree.leaves(model.params))
    return {"checkpoint_bytes": files, "params_bytes": params, "peak_growth_bytes": (peak - before) * 1024,
            "peak_over_checkpoint": (peak - before) * 1024 / files, "dtype": model.config.dtype, "warm": warm}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", nargs="?", help="checkpoint directory (default: --arch with random weights)")
    ap.add_argument("--arch", default="llama-3.2-1b", help="an architecture of scripts/benchmark.py's ARCHS")
    ap.add_argument("--save-dtype", default="bfloat16", help="dtype the random checkpoint is saved in")
    ap.add_argument("--dtype", default="auto", help="dtype to load in")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "jaxgen-bench")
    ap.add_argument("--warm", action="store_true", help="leave JAX's and transformers' start-up out")
    ap.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.path, args.dtype, args.warm)))
        return
    path = args.path or str(_random_checkpoint(args))
    cmd = [sys.executable, __file__, path, "--dtype", args.dtype, "--measure"] + (["--warm"] if args.warm else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{path}: checkpoint {result['checkpoint_bytes'] / 1e9:.2f} GB, loaded as {result['dtype']} "
          f"({result['params_bytes'] / 1e9:.2f} GB of params); peak memory growth during from_pretrained "
          f"{result['peak_growth_bytes'] / 1e9:.2f} GB = {result['peak_over_checkpoint']:.2f}x the checkpoint"
          f"{' (start-up excluded)' if args.warm else ' (JAX and transformers start-up included)'}")


def _random_checkpoint(args) -> Path:
    import torch
    import transformers

    sys.path.insert(0, str(Path(__file__).parent))
    from benchmark import ARCHS

    path = args.cache / f"{args.arch}-random-{args.save_dtype}"
    if not (path / "config.json").exists():
        config_class, kwargs = ARCHS[args.arch]
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, config_class)(**kwargs))
        model.to(getattr(torch, args.save_dtype)).save_pretrained(path)
    return path


if __name__ == "__main__":
    main()
