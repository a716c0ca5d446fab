"""Decoding on a multi-host mesh (TPU pod slices, multi-node GPU): run this same script on
every host; each host feeds its own prompts and gets its own rows back.

    # on host i of N (the coordinator is host 0):
    python scripts/multihost_generate.py --coordinator 10.0.0.1:1234 --num-processes N --process-id i \\
        --model /data/gpt2-xl --model-parallel 8 --prompts "Hello" "I love"

    # one host, 8 simulated CPU devices (what the project's tests do):
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python scripts/multihost_generate.py --model-parallel 2

Steps: `jax.distributed.initialize` joins the hosts; the mesh spans every device of every host,
``(data, model)``; `jaxgen.shard` places the params (tensor-parallel along "model"); each host's
batch becomes one global array with `jax.make_array_from_process_local_data`, split along
"data"; the decoders take ``mesh=`` and keep everything sharded inside the compiled loop; each
host reads back the rows it owns (``addressable_shards``), or all rows with
`multihost_utils.process_allgather`.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxgen
from jaxgen.cli import DEMO_MODEL


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--coordinator", help="host:port of process 0 (omit on a single host)")
    ap.add_argument("--num-processes", type=int, default=1)
    ap.add_argument("--process-id", type=int, default=0)
    ap.add_argument("--model", default=str(DEMO_MODEL))
    ap.add_argument("--model-parallel", type=int, default=1, help="devices per model replica")
    ap.add_argument("--prompts", nargs="+", default=["The meaning of life is", "Never trust a", "I am", "Why"])
    ap.add_argument("--num-beams", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=20)
    args = ap.parse_args()

    if args.num_processes > 1:
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    devices = np.array(jax.devices())  # every device of every host
    mesh = jax.sharding.Mesh(devices.reshape(-1, args.model_parallel), ("data", "model"))

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model, padding_side="left")
    tok.pad_token_id = tok.eos_token_id
    model = jaxgen.shard(jaxgen.from_pretrained(args.model), mesh)

    # This host's prompts: the global batch is the concatenation over hosts, and must split
    # evenly along "data" (pad with extra prompts otherwise). Every host must pad to the same
    # prompt length.
    local = tok(args.prompts, return_tensors="np", padding="max_length", max_length=16)
    per_host = mesh.shape["data"] // jax.process_count()
    reps = max(1, -(-per_host // len(args.prompts)))
    local_ids = np.tile(local.input_ids, (reps, 1))[:max(per_host, len(args.prompts))]
    local_mask = np.tile(local.attention_mask, (reps, 1))[:len(local_ids)]
    rows = NamedSharding(mesh, P("data", None))
    ids = jax.make_array_from_process_local_data(rows, local_ids)
    mask = jax.make_array_from_process_local_data(rows, local_mask)

    out = jaxgen.beam_search(model, ids, mask, mesh=mesh, num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    sequences = multihost_utils.process_allgather(out.sequences, tiled=True)  # [global rows, P + N]
    if jax.process_index() == 0:
        for row in sequences[: len(args.prompts)]:
            print(tok.decode(row, skip_special_tokens=True))


if __name__ == "__main__":
    main()
