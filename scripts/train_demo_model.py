"""Trains the small GPT-2 that ships inside jaxgen (``jaxgen/demo_model``), on the CPU.

Corpus: the fortune cookies of Debian's ``fortunes`` and ``fortunes-min`` packages (fortune-mod,
BSD licence; ``apt-get install fortunes``), read from /usr/share/games/fortunes, without the
ASCII-art files and without the offensive ``off/`` collection. Each fortune is one document,
separated by ``<|endoftext|>``.

Tokenizer: a byte-level BPE (``tokenizers``) with 4096 tokens, saved as a transformers GPT-2
tokenizer. Model: jaxgen's own GPT-2 (``jaxgen.models.model.forward``) trained with optax AdamW
on 128-token windows; saved in Hugging Face layout (``config.json``, ``model.safetensors``
with transformers' names), so that PyTorch ``GPT2LMHeadModel.from_pretrained`` loads it
unchanged. Everything is seeded: the same machine and versions give the same files.

    apt-get install fortunes && python scripts/train_demo_model.py --out jaxgen/demo_model
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import safetensors.numpy

import jaxgen
from jaxgen.models.model import forward, logits, positions_from_mask

EOT = "<|endoftext|>"
FORTUNE_DIR = Path("/usr/share/games/fortunes")
SKIP = {"ascii-art", "art", "translate-me"}


def read_corpus(root: Path) -> list[str]:
    if not root.is_dir():
        sys.exit(f"{root} not found: install the corpus with `apt-get install fortunes`")
    docs = []
    for path in sorted(root.iterdir()):
        if path.is_file() and "." not in path.name and path.name not in SKIP:
            text = path.read_text(encoding="latin-1")
            docs += [d.strip() for d in text.split("\n%\n") if d.strip()]
    return docs


def train_tokenizer(docs: list[str], vocab_size: int, out: Path):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(docs, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT])
    tok = GPT2TokenizerFast(tokenizer_object=bpe, bos_token=EOT, eos_token=EOT, unk_token=EOT,
                            model_max_length=256)
    tok.save_pretrained(out)
    return tok


def init_model(hf_config, key_seed: int, out: Path) -> jaxgen.CausalLM:
    """A GPT-2 with transformers' initialisation (normal(0.02), residual projections scaled
    by 1/sqrt(2 n_layer)), saved to ``out`` and loaded as a jaxgen model."""
    import torch
    from transformers import GPT2LMHeadModel

    torch.manual_seed(key_seed)
    GPT2LMHeadModel(hf_config).save_pretrained(out)
    return jaxgen.from_pretrained(out, dtype="float32")


def to_hf_state_dict(params: dict, config) -> dict[str, np.ndarray]:
    """jaxgen's GPT-2 params -> transformers' GPT2LMHeadModel names and shapes (the inverse of
    `jaxgen.models.gpt2.checkpoint_table`: Conv1D weights [in, out], q/k/v fused as [d, 3d])."""
    d = config.d_model
    def norm(name, p):
        return {name + ".weight": p["scale"], name + ".bias": p["bias"]}

    def conv(name, p):  # [out, in] -> Conv1D's [in, out]
        return {name + ".weight": p["kernel"].T, name + ".bias": p["bias"]}

    out = {"transformer.wte.weight": params["embed"], "transformer.wpe.weight": params["pos_embed"],
           **norm("transformer.ln_f", params["final_norm"])}
    for i, layer in enumerate(params["layers"]):
        pre = f"transformer.h.{i}."
        qkv = layer["attn"]["qkv"]
        out.update({**norm(pre + "ln_1", layer["attn_norm"]), **norm(pre + "ln_2", layer["mlp_norm"]),
                    pre + "attn.c_attn.weight": jnp.moveaxis(qkv["kernel"], 1, 0).reshape(3 * d, d).T,
                    pre + "attn.c_attn.bias": jnp.moveaxis(qkv["bias"], 1, 0).reshape(3 * d),
                    **conv(pre + "attn.c_proj", layer["attn"]["out"]), **conv(pre + "mlp.c_fc", layer["mlp"]["up"]),
                    **conv(pre + "mlp.c_proj", layer["mlp"]["down"])})
    return {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in out.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("jaxgen/demo_model"))
    ap.add_argument("--steps", type=int, default=2500)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--n-embd", type=int, default=192)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-head", type=int, default=6)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--corpus", type=Path, default=FORTUNE_DIR)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    docs = read_corpus(args.corpus)
    tok = train_tokenizer(docs, args.vocab, args.out)
    eot = tok.convert_tokens_to_ids(EOT)
    encoded = tok.backend_tokenizer.encode_batch(docs)  # no length limit: documents are split into windows
    stream = np.concatenate([np.asarray(e.ids + [eot], np.int32) for e in encoded])
    print(f"{len(docs)} fortunes, {len(stream)} tokens, vocab {len(tok)}", flush=True)

    from transformers import GPT2Config

    hf_config = GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=args.n_embd, n_layer=args.n_layer,
                           n_head=args.n_head, bos_token_id=eot, eos_token_id=eot, architectures=["GPT2LMHeadModel"])
    model = init_model(hf_config, args.seed, args.out)
    params, config = model.params, model.config
    warmup = min(100, args.steps // 10)
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, warmup, args.steps, args.lr / 20)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.05))
    opt_state = opt.init(params)
    holdout = len(stream) // 50  # the last 2% for validation

    def loss_fn(p, batch):
        m = model.replace(params=p)
        mask = jnp.ones(batch.shape, jnp.int32)
        hidden, _ = forward(m, batch[:, :-1], positions_from_mask(mask[:, :-1]), mask[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits(m, hidden), batch[:, 1:]).mean()

    @jax.jit
    def train_step(p, s, batch):
        loss, grads = jax.value_and_grad(loss_fn)(p, batch)
        updates, s = opt.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    rng = np.random.default_rng(args.seed)
    train = stream[:-holdout]
    start = time.time()
    for step in range(args.steps):
        offsets = rng.integers(0, len(train) - args.seq - 1, size=args.batch)
        batch = jnp.asarray(np.stack([train[o:o + args.seq + 1] for o in offsets]))
        params, opt_state, loss = train_step(params, opt_state, batch)
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {float(loss):.3f}  {time.time() - start:6.0f}s", flush=True)
    valid = stream[-holdout:]
    windows = np.stack([valid[i:i + args.seq + 1] for i in range(0, len(valid) - args.seq - 1, args.seq)])
    val_loss = float(jax.jit(loss_fn)(params, jnp.asarray(windows)))
    print(f"validation loss {val_loss:.3f} (perplexity {np.exp(val_loss):.1f})", flush=True)

    safetensors.numpy.save_file(to_hf_state_dict(params, config), str(args.out / "model.safetensors"),
                                metadata={"format": "pt"})
    hf_config.save_pretrained(args.out)
    card = (Path(__file__).with_name("demo_model_card.md").read_text()
            .replace("{steps}", str(args.steps)).replace("{tokens}", str(len(stream)))
            .replace("{docs}", str(len(docs))).replace("{val_loss}", f"{val_loss:.3f}")
            .replace("{train_loss}", f"{float(loss):.3f}")
            .replace("{minutes}", f"{(time.time() - start) / 60:.0f}"))
    (args.out / "README.md").write_text(card)
    (args.out / "training.json").write_text(json.dumps({**vars(args), "out": str(args.out),
                                                        "corpus": str(args.corpus), "val_loss": val_loss}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
