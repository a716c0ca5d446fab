"""Hugging Face checkpoint (hub id or local directory) -> `CausalLM`, for every family.

Reads ``config.json`` (through transformers' own config class of its ``model_type``, so that
every default and legacy field means what it means there), ``generation_config.json`` when there
is one (the model's generation settings, as transformers' ``model.generation_config``), and the
weights: ``model.safetensors``, sharded safetensors (``model.safetensors.index.json``),
``pytorch_model.bin`` or its sharded index (through ``torch.load(weights_only=True)``; needs
torch). The family's checkpoint table (`jaxgen.models.checkpoint`) says which tensors make each
param; a tensor it does not name, one it names that is missing, or a shape that disagrees with
the config is an error: jaxgen never loads a checkpoint it only half understands.

Memory: tensors are read one at a time, straight into 64-byte-aligned host buffers that JAX's
CPU client adopts without a copy, and converted only when the requested dtype differs, so the
host holds the model about once, plus one tensor. With ``mesh=`` each device receives only its
shard of each tensor.
"""

from __future__ import annotations

import json
import os
import re
import struct as _struct
from pathlib import Path
from typing import Any, Callable

import jax
import ml_dtypes
import numpy as np
from jax.sharding import NamedSharding

from jaxgen import generation_config, quantization, sharding
from jaxgen.models import family_of
from jaxgen.models.checkpoint import Source
from jaxgen.models.config import DTYPES, CheckpointError
from jaxgen.models.model import CausalLM

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_ALIGN = 64


def from_pretrained(
    name_or_path: str | os.PathLike,
    *,
    dtype: Any = "auto",
    mesh: jax.sharding.Mesh | None = None,
    data_axis: str | None = "data",
    model_axis: str | None = "model",
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
    quantize: str | None = None,
) -> CausalLM:
    """Loads a checkpoint of any supported family (`jaxgen.models.FAMILIES`) from a local
    directory or the Hugging Face hub.

    Args:
      name_or_path: a local directory in Hugging Face layout, or a hub id such as ``"gpt2"``.
      dtype: params and activations dtype: ``"auto"`` (default, as transformers 5.x: the
        checkpoint's ``dtype`` / ``torch_dtype`` from ``config.json``, float32 where it names
        none), ``"float32"``, ``"bfloat16"`` or ``"float16"`` (names or jnp dtypes). Softmax,
        norm statistics and logits stay float32.
      mesh, data_axis, model_axis: place each param straight onto ``mesh`` as `jaxgen.shard`
        lays it out (tensor-parallel along ``model_axis``), each device receiving only its shard.
      revision, cache_dir: passed to ``huggingface_hub.hf_hub_download`` for hub ids.
      local_files_only: use only the local hub cache; ``None`` follows ``HF_HUB_OFFLINE``.
      quantize: ``"int8"`` stores the products' weights as int8 with per-channel scales
        (`jaxgen.quantize`), each tensor quantized on the host as it is read; None keeps ``dtype``.

    Raises:
      CheckpointError (a ValueError) naming the problem: a missing directory or weights file, an
      unreadable file, an unsupported ``model_type`` or config option, or tensors whose names or
      shapes disagree with the config.
    """
    if quantize is not None:
        quantization.check_method(quantize)
    fetch = _local_fetcher(name_or_path) if _is_local(name_or_path) else _hub_fetcher(
        str(name_or_path), revision, cache_dir, local_files_only
    )
    raw_config = _read_json(fetch("config.json", required=True))
    family = family_of(raw_config.get("model_type"))
    dtype_name = _dtype_name(dtype, raw_config)
    config = family.config_from_hf(_hf_config(raw_config), dtype_name)
    generation_path = fetch("generation_config.json")
    generation = generation_config.from_checkpoint(
        None if generation_path is None else _read_json(generation_path), raw_config)

    place, placed_config = _placer(config, mesh, data_axis, model_axis)
    repeat = placed_config.n_kv_heads // config.n_kv_heads
    tensors = _open_weights(fetch, str(name_or_path))
    table = family.checkpoint_table(config)
    used: set[str] = set()

    def load(path, source: Source):
        arrays = [tensors.read(_resolve(tensors, name, family.PREFIXES, str(name_or_path), used), shape)
                  for name, shape in zip(source.names, source.shapes)]
        value = source.build(*arrays)
        del arrays
        keys = sharding.path_keys(path)
        if repeat > 1 and keys[2:4] == ("attn", "qkv"):
            value = sharding.repeat_kv_heads(value, config.n_heads // config.n_kv_heads, repeat)
        if quantize is not None and quantization.quantizes(keys):  # from the weight in ``dtype``, as quantize()
            w = quantization.int8(_aligned(value, DTYPES[dtype_name]), dtype_name)
            return w.replace(q=place((*keys, "q"), _aligned(w.q, np.int8)),
                             scale=place((*keys, "scale"), _aligned(w.scale, np.float32)))
        return place(keys, _aligned(value, DTYPES[dtype_name]))

    params = jax.tree_util.tree_map_with_path(load, table, is_leaf=lambda x: isinstance(x, Source))
    _check_all_used(tensors.names, used, family, config, str(name_or_path))
    return CausalLM(params=params, config=placed_config, generation_config=generation)


def _hf_config(raw: dict[str, Any]):
    """transformers' config object for ``raw`` (its model_type's class, defaults filled in)."""
    from transformers import CONFIG_MAPPING

    try:
        return CONFIG_MAPPING[raw["model_type"]].from_dict(dict(raw))
    except Exception as e:  # transformers' validators raise several types
        raise CheckpointError(f"config.json is not a valid {raw['model_type']} config: {e}") from None


def _dtype_name(dtype: Any, raw_config: dict[str, Any]) -> str:
    if isinstance(dtype, str) and dtype == "auto":
        dtype = raw_config.get("dtype") or raw_config.get("torch_dtype") or "float32"
        if str(dtype).removeprefix("torch.") not in DTYPES:
            raise CheckpointError(f"config.json gives dtype {dtype!r}; pass dtype= one of {sorted(DTYPES)}")
        return str(dtype).removeprefix("torch.")
    for name, dt in DTYPES.items():
        if dtype == name or (not isinstance(dtype, str) and np.dtype(dtype) == np.dtype(dt)):
            return name
    raise ValueError(f"dtype={dtype!r} is not supported; use 'auto' or one of {sorted(DTYPES)}")


def _placer(config, mesh, data_axis, model_axis) -> tuple[Callable[[tuple, np.ndarray], jax.Array], Any]:
    """(path, host array) -> device array, and the config of the placed model (`sharding.plan`:
    a mesh may replicate kv heads)."""
    if mesh is None:
        return (lambda path, x: jax.device_put(x)), config
    sharding.check_mesh(mesh, data_axis, model_axis)
    mesh = sharding.auto_axes(mesh)
    placed_config, _ = sharding.plan(config, mesh, model_axis)

    def place(path, x):
        target = NamedSharding(mesh, sharding.param_spec(path, x.ndim, model_axis))
        return jax.make_array_from_callback(x.shape, target, lambda index: x[index])

    return place, placed_config


def _aligned(x: np.ndarray, dtype) -> np.ndarray:
    """``x`` as a C-contiguous ``dtype`` array on a 64-byte boundary (which ``jax.device_put``
    adopts without copying on CPU); no copy when it already is one."""
    if x.dtype == dtype and x.flags.c_contiguous and x.ctypes.data % _ALIGN == 0:
        return x
    out = _empty_aligned(x.shape, dtype)
    out[...] = x
    return out


def _empty_aligned(shape, dtype) -> np.ndarray:
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    buf = np.empty(nbytes + _ALIGN, np.uint8)
    start = (-buf.ctypes.data) % _ALIGN
    return buf[start:start + nbytes].view(dtype).reshape(shape)


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


class _Tensors:
    """The tensors of a checkpoint's weight files, read one at a time on demand."""

    def __init__(self, files: list[Path]):
        self.files = {}  # name -> reader
        for path in files:
            reader = _SafetensorsFile(path) if path.name.endswith(".safetensors") else _TorchFile(path)
            self.files.update({name: reader for name in reader.names})

    @property
    def names(self) -> set[str]:
        return set(self.files)

    def read(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        reader = self.files[name]
        found = reader.shape(name)
        if found != tuple(shape):
            raise CheckpointError(f"{reader.path}: tensor {name!r} has shape {found} but config.json implies "
                                  f"{tuple(shape)}; the weights do not belong to this config")
        return reader.read(name)


def _open_weights(fetch: Fetcher, name: str) -> _Tensors:
    for filename in WEIGHT_FILES:
        path = fetch(filename)
        if path is None:
            continue
        if filename.endswith(".index.json"):
            shards = sorted(set(_read_json(path).get("weight_map", {}).values()))
            if not shards:
                raise CheckpointError(f"{path} has an empty weight_map")
            return _Tensors([fetch(shard, required=True) for shard in shards])
        return _Tensors([path])
    raise CheckpointError(f"{name!r} has no weights file; looked for {', '.join(WEIGHT_FILES)}")


class _SafetensorsFile:
    """A .safetensors file: its header parsed and checked at once, each tensor read on demand
    into an aligned buffer (no mapping of the whole file)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        try:
            with open(self.path, "rb") as f:
                (header_len,) = _struct.unpack("<Q", f.read(8))
                if header_len > size - 8:
                    raise ValueError(f"header of {header_len} bytes is longer than the file")
                header = json.loads(f.read(header_len))
            header.pop("__metadata__", None)
            self.start = 8 + header_len
            self.entries = {}
            for key, info in header.items():
                dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
                begin, end = info["data_offsets"]
                shape = tuple(info["shape"])
                if self.start + end > size:
                    raise ValueError(f"tensor {key!r} ends at byte {self.start + end}, past the end of the file")
                if end - begin != int(np.prod(shape)) * dtype.itemsize:
                    raise ValueError(f"tensor {key!r} has {end - begin} bytes for shape {shape} {dtype}")
                self.entries[key] = (dtype, shape, begin)
        except (ValueError, KeyError, TypeError, _struct.error, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path} is not a valid safetensors file (truncated or corrupted?): {e}") from None

    @property
    def names(self):
        return self.entries.keys()

    def shape(self, name):
        return self.entries[name][1]

    def read(self, name) -> np.ndarray:
        dtype, shape, begin = self.entries[name]
        out = _empty_aligned(shape, dtype)
        with open(self.path, "rb") as f:
            f.seek(self.start + begin)
            if f.readinto(out.reshape(-1).view(np.uint8)) != out.nbytes:
                raise CheckpointError(f"{self.path}: tensor {name!r} is truncated")
        return out


class _TorchFile:
    """A PyTorch pickle (``pytorch_model.bin``), memory-mapped by ``torch.load``."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            import torch
        except ImportError:
            raise CheckpointError(f"{path} is a PyTorch pickle; reading it needs torch (`pip install torch`), "
                                  "or convert the checkpoint to safetensors") from None
        try:
            self.state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises many types for bad pickles
            raise CheckpointError(f"cannot read {path} with torch.load(weights_only=True): {e}") from None

    @property
    def names(self):
        return self.state.keys()

    def shape(self, name):
        return tuple(self.state[name].shape)

    def read(self, name) -> np.ndarray:
        import torch

        t = self.state[name].detach().contiguous()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()


def _resolve(tensors: _Tensors, name: str, prefixes: tuple[str, ...], source: str, used: set[str]) -> str:
    """The checkpoint's name for the table's ``name``: with its leading ``prefixes[0]`` (the
    family's usual wrapper, e.g. ``"model."``) or any other of ``prefixes`` in its place (a base
    model saved without the wrapper, a multimodal checkpoint's language model)."""
    head = prefixes[0]
    candidates = [p + name.removeprefix(head) for p in prefixes] if name.startswith(head) else [name]
    for candidate in candidates:
        if candidate in tensors.files:
            used.add(candidate)
            return candidate
    raise CheckpointError(f"{source!r}: checkpoint lacks tensor {name!r}")


def _check_all_used(names: set[str], used: set[str], family, config, source: str) -> None:
    left = {n for n in names - used if not any(re.search(pattern, n) for pattern in family.IGNORED)}
    if config.tie_word_embeddings:  # tied: the head is the embedding
        left = {n for n in left if not n.endswith("lm_head.weight")}
    if left:
        raise CheckpointError(
            f"{source!r}: {len(left)} tensors are not part of {config.model_type} as configured "
            f"(e.g. {sorted(left)[:3]}); is this a {config.model_type} causal LM checkpoint?"
        )
