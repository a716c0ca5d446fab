"""Hugging Face GPT-2 checkpoint (hub id or local directory) -> `GPT2` model object.

Reads ``config.json``, ``generation_config.json`` when there is one (the model's generation
settings, as transformers' ``model.generation_config``) and one of, in this order:
``model.safetensors``, sharded safetensors (``model.safetensors.index.json``),
``pytorch_model.bin`` or its sharded index (through ``torch.load(weights_only=True)``; needs
torch). Every GPT-2 naming variant is mapped: with or without the ``transformer.`` prefix, with
a tied, a missing or an untied ``lm_head``, with or without the legacy ``attn.bias`` /
``attn.masked_bias`` mask buffers. Anything else is an error: jaxgen never loads a checkpoint
it only half understands.
"""

from __future__ import annotations

import json
import os
import struct as _struct
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxgen import generation_config
from jaxgen.models.gpt2 import ACTIVATIONS, DTYPES, GPT2, GPT2Config, expected_shapes, unflatten_params

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)

# Buffers some GPT-2 checkpoints carry (the causal mask); not parameters.
_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be found, read, or mapped onto jaxgen's GPT-2."""


def from_pretrained(
    name_or_path: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
) -> GPT2:
    """Loads a GPT-2 checkpoint from a local directory or the Hugging Face hub.

    Args:
      name_or_path: a local directory in Hugging Face layout, or a hub id such as ``"gpt2"``.
      dtype: params and activations dtype: float32 (default), bfloat16 or float16. Softmax,
        LayerNorm statistics and logits stay float32.
      revision, cache_dir: passed to ``huggingface_hub.hf_hub_download`` for hub ids.
      local_files_only: use only the local hub cache; ``None`` follows ``HF_HUB_OFFLINE``.

    Raises:
      CheckpointError (a ValueError) naming the problem: a missing directory or weights file, an
      unreadable file, a non-GPT-2 architecture, an unsupported config option, or tensors whose
      names or shapes disagree with the config.
    """
    dtype_name = _dtype_name(dtype)
    fetch = _local_fetcher(name_or_path) if _is_local(name_or_path) else _hub_fetcher(
        str(name_or_path), revision, cache_dir, local_files_only
    )
    raw_config = _read_json(fetch("config.json", required=True))
    config = config_from_json(raw_config, dtype_name)
    generation_path = fetch("generation_config.json")
    generation = generation_config.from_checkpoint(
        None if generation_path is None else _read_json(generation_path), raw_config)
    flat = _read_weights(fetch, str(name_or_path))
    params = _map_hf_names(flat, config, str(name_or_path))
    target = DTYPES[dtype_name]
    params = jax.tree.map(lambda x: jnp.asarray(x.astype(np.float32), dtype=target), params)
    return GPT2(params=params, config=config, generation_config=generation)


def config_from_json(raw: dict[str, Any], dtype_name: str = "float32") -> GPT2Config:
    """A Hugging Face ``config.json`` dict -> `GPT2Config`, rejecting what jaxgen cannot run."""
    model_type = raw.get("model_type")
    architectures = raw.get("architectures") or []
    if model_type != "gpt2":
        raise CheckpointError(
            f"config.json describes model_type={model_type!r} (architectures={architectures}); "
            "jaxgen's loader supports GPT-2 checkpoints only (model_type 'gpt2')"
        )
    defaults = GPT2Config()
    fields = {f: raw.get(f, getattr(defaults, f)) for f in (
        "vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner",
        "activation_function", "layer_norm_epsilon", "scale_attn_weights",
        "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "tie_word_embeddings",
        "bos_token_id", "eos_token_id",
    )}
    if raw.get("add_cross_attention"):
        raise CheckpointError("config.json sets add_cross_attention=true; jaxgen runs decoder-only GPT-2")
    if fields["activation_function"] not in ACTIVATIONS:
        raise CheckpointError(
            f"config.json activation_function={fields['activation_function']!r} is not supported; "
            f"supported: {sorted(ACTIVATIONS)}"
        )
    if fields["n_head"] <= 0 or fields["n_embd"] % fields["n_head"]:
        raise CheckpointError(
            f"config.json n_embd={fields['n_embd']} is not divisible by n_head={fields['n_head']}"
        )
    if isinstance(fields["eos_token_id"], list):  # GPT-2 configs hold one id; keep the first
        fields["eos_token_id"] = fields["eos_token_id"][0] if fields["eos_token_id"] else None
    return GPT2Config(**fields, dtype=dtype_name)


def _dtype_name(dtype: Any) -> str:
    for name, dt in DTYPES.items():
        if dtype == name or np.dtype(dtype) == np.dtype(dt):
            return name
    raise ValueError(f"dtype={dtype!r} is not supported; use one of {sorted(DTYPES)}")


# --- where files come from -------------------------------------------------------------------

Fetcher = Callable[..., "Path | None"]


def _is_local(name_or_path) -> bool:
    s = str(name_or_path)
    # Hub ids are "name" or "org/name"; anything else that looks like a path is a path.
    return os.path.exists(s) or s.startswith((".", "/", "~")) or s.count("/") > 1 or os.sep != "/" and os.sep in s


def _local_fetcher(path) -> Fetcher:
    root = Path(path).expanduser()
    if not root.is_dir():
        raise CheckpointError(f"model directory {str(path)!r} does not exist (or is not a directory)")

    def fetch(filename: str, required: bool = False) -> Path | None:
        f = root / filename
        if f.is_file():
            return f
        if required:
            raise CheckpointError(f"{str(root)!r} has no {filename}; is it a Hugging Face model directory?")
        return None

    return fetch


def _hub_fetcher(repo_id: str, revision, cache_dir, local_files_only) -> Fetcher:
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    offline = constants.HF_HUB_OFFLINE if local_files_only is None else local_files_only

    def fetch(filename: str, required: bool = False) -> Path | None:
        try:
            return Path(hf_hub_download(
                repo_id, filename, revision=revision, cache_dir=cache_dir, local_files_only=offline
            ))
        except LocalEntryNotFoundError:  # (a subclass of EntryNotFoundError)
            if not required:
                return None
            raise CheckpointError(
                f"cannot load {repo_id!r}: it is not in the local Hugging Face cache and the hub "
                "cannot be reached (offline?). Download it where there is network "
                f"(`hf download {repo_id}`) or pass the path of a local copy."
            ) from None
        except EntryNotFoundError:
            if required:
                raise CheckpointError(f"hub repository {repo_id!r} has no {filename}") from None
            return None
        except RepositoryNotFoundError:
            raise CheckpointError(
                f"{repo_id!r} is neither a local directory nor a model on the Hugging Face hub"
            ) from None
        except OSError as e:  # connection errors and friends
            raise CheckpointError(f"cannot fetch {filename} of {repo_id!r} from the hub: {e}") from None

    return fetch


# --- reading tensors -------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None


def _read_weights(fetch: Fetcher, name: str) -> dict[str, np.ndarray]:
    for filename in WEIGHT_FILES:
        path = fetch(filename)
        if path is None:
            continue
        if filename.endswith(".index.json"):
            shards = sorted(set(_read_json(path).get("weight_map", {}).values()))
            if not shards:
                raise CheckpointError(f"{path} has an empty weight_map")
            flat: dict[str, np.ndarray] = {}
            for shard in shards:
                flat.update(_read_file(fetch(shard, required=True)))
            return flat
        return _read_file(path)
    raise CheckpointError(f"{name!r} has no weights file; looked for {', '.join(WEIGHT_FILES)}")


def _read_file(path: Path) -> dict[str, np.ndarray]:
    return read_safetensors(path) if path.name.endswith(".safetensors") else _read_torch_bin(path)


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Reads a .safetensors file into numpy (bfloat16 through ml_dtypes), checking every offset."""
    path = Path(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (header_len,) = _struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise ValueError(f"header of {header_len} bytes is longer than the file")
            header = json.loads(f.read(header_len))
        data_start = 8 + header_len
        header.pop("__metadata__", None)
        buf = np.memmap(path, dtype=np.uint8, mode="r")
        out = {}
        for key, info in header.items():
            dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
            begin, end = info["data_offsets"]
            shape = tuple(info["shape"])
            if data_start + end > size:
                raise ValueError(f"tensor {key!r} ends at byte {data_start + end}, past the end of the file")
            if end - begin != int(np.prod(shape)) * dtype.itemsize:
                raise ValueError(f"tensor {key!r} has {end - begin} bytes for shape {shape} {dtype}")
            out[key] = np.array(buf[data_start + begin:data_start + end].view(dtype).reshape(shape))
        return out
    except (ValueError, KeyError, TypeError, _struct.error, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not a valid safetensors file (truncated or corrupted?): {e}") from None


def _read_torch_bin(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"{path} is a PyTorch pickle; reading it needs torch (`pip install torch`), "
            "or convert the checkpoint to safetensors"
        ) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for bad pickles
        raise CheckpointError(f"cannot read {path} with torch.load(weights_only=True): {e}") from None
    return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy() for k, v in state.items()}


# --- Hugging Face names -> params pytree ---------------------------------------------------------


def _hf_to_jaxgen_name(key: str) -> str | None:
    """``transformer.h.0.ln_1.weight`` -> ``h.0.ln_1.scale``; ``None`` for buffers to skip."""
    key = key.removeprefix("transformer.")
    if key.endswith(_BUFFER_SUFFIXES):
        return None
    if key in ("wte.weight", "wpe.weight", "lm_head.weight"):
        return key.removesuffix(".weight")
    if key.endswith((".ln_1.weight", ".ln_2.weight")) or key == "ln_f.weight":
        return key.removesuffix("weight") + "scale"
    if key.endswith(".weight"):
        return key.removesuffix("weight") + "kernel"
    return key


def _map_hf_names(flat: dict[str, np.ndarray], config: GPT2Config, name: str) -> dict[str, Any]:
    expected = expected_shapes(config)
    mapped: dict[str, np.ndarray] = {}
    unexpected = []
    for key, value in flat.items():
        new = _hf_to_jaxgen_name(key)
        if new is None:
            continue
        if new == "lm_head" and config.tie_word_embeddings:
            continue  # tied: the head is wte
        if new not in expected:
            unexpected.append(key)
            continue
        if tuple(value.shape) != expected[new]:
            raise CheckpointError(
                f"{name!r}: tensor {key!r} has shape {tuple(value.shape)} but config.json implies "
                f"{expected[new]}; the weights do not belong to this config"
            )
        mapped[new] = value
    if unexpected:
        raise CheckpointError(
            f"{name!r}: {len(unexpected)} tensors are not part of GPT-2 as configured "
            f"(e.g. {unexpected[:3]}); is this a GPT-2 LM checkpoint?"
        )
    missing = sorted(set(expected) - set(mapped))
    if missing:
        raise CheckpointError(f"{name!r}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    return unflatten_params(mapped, config.n_layer)
