"""Runs ``generate`` calls in transformers 4.53.3, the last release with contrastive search and
group beam search in its core (transformers 5.x loads them from the hub). Run by
tests/test_hf453.py in its own virtual environment: ``python hf453_reference.py CHECKPOINT OUT``
with a JSON list of calls on stdin (``{"ids", "mask", **generate kwargs}``); writes one npz per
call, ``OUT/<index>.npz``, holding sequences, scores and, for beams, sequences_scores and
beam_indices; a call with ``output_attentions`` / ``output_hidden_states`` runs eager attention
and adds them as ``attentions_<step>_<layer>`` / ``hidden_states_<step>_<index>``."""

import json
import sys

import numpy as np
import torch
import transformers

torch.set_num_threads(1)
checkpoint, out = sys.argv[1], sys.argv[2]
model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint).eval()
eager = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, attn_implementation="eager").eval()
for index, call in enumerate(json.load(sys.stdin)):
    ids, mask = torch.tensor(call.pop("ids")), torch.tensor(call.pop("mask"))
    layers = call.get("output_attentions") or call.get("output_hidden_states")
    with torch.no_grad():
        result = (eager if layers else model).generate(ids, attention_mask=mask, return_dict_in_generate=True,
                                                      output_scores=True, trust_remote_code=True, **call)
    fields = {"sequences": result.sequences.numpy(), "scores": torch.stack(result.scores).numpy()}
    for name in ("sequences_scores", "beam_indices"):
        if getattr(result, name, None) is not None:
            fields[name] = getattr(result, name).numpy()
    for name in ("attentions", "hidden_states"):
        for step, entries in enumerate(getattr(result, name, None) or ()):
            fields.update({f"{name}_{step}_{i}": x.numpy() for i, x in enumerate(entries)})
    np.savez(f"{out}/{index}.npz", **fields)
