"""A checkpoint's files: where they come from (a local directory, or the Hugging Face hub through
its local cache) and their tensors, read one at a time on demand straight into 64-byte-aligned
host buffers that JAX's CPU client adopts without a copy.

Weights: ``model.safetensors``, sharded safetensors (``model.safetensors.index.json``),
``pytorch_model.bin`` or its sharded index (through ``torch.load(weights_only=True)``; needs
torch), with transformers' ``variant`` names.
"""

from __future__ import annotations

import json
import os
import struct as _struct
from pathlib import Path
from typing import Any, Callable

import ml_dtypes
import numpy as np

from jaxgen.models.config import CheckpointError

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


def aligned(x: np.ndarray, dtype) -> np.ndarray:
    """``x`` as a C-contiguous ``dtype`` array on a 64-byte boundary (which ``jax.device_put``
    adopts without copying on CPU); no copy when it already is one."""
    if x.dtype == dtype and x.flags.c_contiguous and x.ctypes.data % _ALIGN == 0:
        return x
    out = empty_aligned(x.shape, dtype)
    out[...] = x
    return out


def empty_aligned(shape, dtype) -> np.ndarray:
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    buf = np.empty(nbytes + _ALIGN, np.uint8)
    start = (-buf.ctypes.data) % _ALIGN
    return buf[start:start + nbytes].view(dtype).reshape(shape)


# --- where files come from -------------------------------------------------------------------

Fetcher = Callable[..., "Path | None"]


def is_local(name_or_path) -> bool:
    s = str(name_or_path)
    # Hub ids are "name" or "org/name"; anything else that looks like a path is a path.
    return os.path.exists(s) or s.startswith((".", "/", "~")) or s.count("/") > 1 or os.sep != "/" and os.sep in s


def local_fetcher(path, subfolder: str = "") -> Fetcher:
    root = Path(path).expanduser() / subfolder
    if not root.is_dir():
        raise CheckpointError(f"model directory {str(root)!r} does not exist (or is not a directory)")

    def fetch(filename: str, required: bool = False) -> Path | None:
        f = root / filename
        if f.is_file():
            return f
        if required:
            raise CheckpointError(f"{str(root)!r} has no {filename}; is it a Hugging Face model directory?")
        return None

    return fetch


def hub_fetcher(repo_id: str, revision, cache_dir, local_files_only, **download) -> Fetcher:
    """``download``: further `hf_hub_download` arguments (subfolder, token, force_download)."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, HFValidationError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError)

    offline = constants.HF_HUB_OFFLINE if local_files_only is None else local_files_only

    def fetch(filename: str, required: bool = False) -> Path | None:
        try:
            return Path(hf_hub_download(
                repo_id, filename, revision=revision, cache_dir=cache_dir, local_files_only=offline, **download
            ))
        except HFValidationError as e:
            raise CheckpointError(f"{repo_id!r} is neither a local directory nor a valid hub id ({e})") from None
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


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object file, or CheckpointError naming it."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"cannot read {path}: expected a JSON object, found {type(value).__name__}")
    return value


class Tensors:
    """The tensors of a checkpoint's weight files, read one at a time on demand."""

    def __init__(self, files: list[Path]):
        self.files = {}  # name -> reader
        for path in files:
            reader = SafetensorsFile(path) if path.name.endswith(".safetensors") else TorchFile(path)
            self.files.update({name: reader for name in reader.names})

    @property
    def names(self) -> set[str]:
        return set(self.files)

    def floating_dtype(self) -> str | None:
        """The dtype of the first floating tensor in name order (transformers' ``dtype="auto"``
        where the config names none), or None."""
        for name in sorted(self.files):
            dtype = self.files[name].dtype(name)
            if np.issubdtype(dtype, np.floating) or dtype == ml_dtypes.bfloat16:
                return np.dtype(dtype).name
        return None

    def read(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        reader = self.files[name]
        found = reader.shape(name)
        if found != tuple(shape):
            raise CheckpointError(f"{reader.path}: tensor {name!r} has shape {found} but config.json implies "
                                  f"{tuple(shape)}; the weights do not belong to this config")
        return reader.read(name)


def weight_files(variant: str | None, use_safetensors: bool | None) -> tuple[str, ...]:
    """The weight file names to look for, in order (transformers' ``variant`` goes before the
    extension: ``model.fp16.safetensors``, ``model.safetensors.index.fp16.json``)."""
    names = [f for f in WEIGHT_FILES if use_safetensors is None or ("safetensors" in f) == use_safetensors]
    if variant:
        names = [".".join([*f.split(".")[:-1], variant, f.split(".")[-1]]) for f in names]
    return tuple(names)


def open_weights(fetch: Fetcher, name: str, files: tuple[str, ...] = WEIGHT_FILES) -> Tensors:
    for filename in files:
        path = fetch(filename)
        if path is None:
            continue
        if filename.endswith(".index.json"):
            weight_map = read_json(path).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{path} has no weight_map (or an empty one)")
            shards = sorted(set(weight_map.values()))
            for shard in shards:
                if not isinstance(shard, str) or os.path.isabs(shard) or ".." in Path(shard).parts:
                    raise CheckpointError(f"{path} names the shard {shard!r}, which is not a file of the model "
                                          "directory (it points outside it)")
            return Tensors([fetch(shard, required=True) for shard in shards])
        return Tensors([path])
    raise CheckpointError(f"{name!r} has no weights file; looked for {', '.join(files)}")


class SafetensorsFile:
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
                if info["dtype"] not in _SAFETENSORS_DTYPES:
                    raise CheckpointError(f"{path}: tensor {key!r} has dtype {info['dtype']}, which jaxgen does not "
                                          f"load (it loads {', '.join(_SAFETENSORS_DTYPES)}); is this a quantized "
                                          "checkpoint?")
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

    def dtype(self, name):
        return self.entries[name][0]

    def read(self, name) -> np.ndarray:
        dtype, shape, begin = self.entries[name]
        out = empty_aligned(shape, dtype)
        with open(self.path, "rb") as f:
            f.seek(self.start + begin)
            if f.readinto(out.reshape(-1).view(np.uint8)) != out.nbytes:
                raise CheckpointError(f"{self.path}: tensor {name!r} is truncated")
        return out


class TorchFile:
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

    def dtype(self, name):
        import torch

        t = self.state[name]
        return ml_dtypes.bfloat16 if t.dtype == torch.bfloat16 else t.numpy().dtype

    def read(self, name) -> np.ndarray:
        import torch

        t = self.state[name].detach().contiguous()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()
