"""Grows a GPT-2 into a wider, deeper one that writes nearly the same text: the target of the
assisted-decoding benchmark (`assisted_workload.py`), with the grown-from model as its draft.

Widening (Net2WiderNet, function-preserving): every hidden unit, attention head and MLP unit is
copied ``--width`` times, each weight reading a copied input divided by ``--width``; LayerNorm
sees the same mean and variance, and the final norm is divided by ``--width`` so that the tied
head gives the same logits. Deepening: ``--extra`` new layers after each original one, random
(GPT-2's init) with their two output projections scaled by ``--extra-scale``, so that each adds
a small change to the residual stream. Then every weight gets Gaussian noise of ``--noise`` times
its tensor's standard deviation, different in every copy. The two knobs set how often the grown
model's greedy token differs from the original's; the benchmark measures that (the acceptance
rate) rather than assuming it. From the shipped demo model (4 layers, n_embd 192, 2.6M
parameters) the defaults make a GPT-2-small shape (12 layers, n_embd 768, 24 heads, 88.5M).

    python scripts/grow_model.py --out ~/.cache/jaxgen-bench/demo-grown-88m
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from jaxgen.cli import DEMO_MODEL


def widen(w: np.ndarray, r: int, rows: bool, cols: bool) -> np.ndarray:
    """A weight read from copied inputs (``rows``: its first axis, divided by ``r``) and written
    to copied outputs (``cols``: its last axis), ``r`` copies each."""
    if rows:
        w = np.concatenate([w / r] * r, axis=0)
    if cols:
        w = np.concatenate([w] * r, axis=-1)
    return w


def widen_qkv(w: np.ndarray, r: int, d: int) -> np.ndarray:
    """c_attn ([d, 3d] or bias [3d]): q, k and v each widened apart (heads copied whole)."""
    parts = np.split(w, 3, axis=-1)
    return np.concatenate([widen(p, r, w.ndim == 2, True) for p in parts], axis=-1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, default=DEMO_MODEL)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--width", type=int, default=4)
    ap.add_argument("--extra", type=int, default=2, help="new layers after each original one")
    ap.add_argument("--extra-scale", type=float, default=0.1)
    ap.add_argument("--noise", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    source = GPT2LMHeadModel.from_pretrained(args.source)
    c, r = source.config, args.width
    sd = {k: v.numpy() for k, v in source.state_dict().items()}
    d = c.n_embd
    config = GPT2Config(**{**c.to_dict(), "n_embd": d * r, "n_head": c.n_head * r, "n_inner": None,
                           "n_layer": c.n_layer * (1 + args.extra)})
    torch.manual_seed(args.seed)
    grown = GPT2LMHeadModel(config).eval()
    fresh = {k: v.numpy().copy() for k, v in grown.state_dict().items()}
    rng = np.random.default_rng(args.seed)
    new = {"transformer.wte.weight": widen(sd["transformer.wte.weight"], r, False, True),
           "transformer.wpe.weight": widen(sd["transformer.wpe.weight"], r, False, True),
           "transformer.ln_f.weight": widen(sd["transformer.ln_f.weight"], r, False, True) / r,
           "transformer.ln_f.bias": widen(sd["transformer.ln_f.bias"], r, False, True) / r}
    for i in range(c.n_layer):
        src, dst = f"transformer.h.{i}.", f"transformer.h.{i * (1 + args.extra)}."
        for name, w in ((k[len(src):], v) for k, v in sd.items() if k.startswith(src)):
            if name.startswith("attn.c_attn"):
                new[dst + name] = widen_qkv(w, r, d)
            elif name.startswith("ln_") or name.endswith(".bias"):
                new[dst + name] = widen(w, r, False, True)
            else:  # the three other projections read and write copied units
                new[dst + name] = widen(w, r, True, True)
        for j in range(1, 1 + args.extra):
            extra = f"transformer.h.{i * (1 + args.extra) + j}."
            for name in ("attn.c_proj.weight", "mlp.c_proj.weight"):
                fresh[extra + name] *= args.extra_scale
    state = {}
    for name, w in fresh.items():
        w = new.get(name, w)
        if name != "lm_head.weight" and w.dtype.kind == "f" and w.ndim:
            w = w + rng.normal(0, args.noise * (w.std() or 1.0), w.shape)
        state[name] = torch.tensor(w, dtype=torch.float32)
    state["lm_head.weight"] = state["transformer.wte.weight"]
    grown.load_state_dict(state)
    args.out.mkdir(parents=True, exist_ok=True)
    grown.save_pretrained(args.out)
    for f in args.source.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy(f, args.out / f.name)
    params = sum(p.numel() for p in grown.parameters())
    print(f"{args.out}: {config.n_layer} layers, n_embd {config.n_embd}, {config.n_head} heads, {params / 1e6:.1f}M "
          f"parameters ({params / sum(p.numel() for p in source.parameters()):.1f}x {args.source.name})")


if __name__ == "__main__":
    main()
