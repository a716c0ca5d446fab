"""Hugging Face checkpoint (hub id or local directory) -> `CausalLM`, for every family.

Reads ``config.json`` (through transformers' own config class of its ``model_type``, so that
every default and legacy field means what it means there), ``generation_config.json`` when there
is one (the model's generation settings, as transformers' ``model.generation_config``), and the
weights (`jaxgen.models.files`: safetensors, sharded or not, or PyTorch pickles). The family's
checkpoint table (`jaxgen.models.checkpoint`) says which tensors make each
param; a tensor it does not name, one it names that is missing, or a shape that disagrees with
the config is an error: jaxgen never loads a checkpoint it only half understands.

Memory: tensors are read one at a time, straight into 64-byte-aligned host buffers that JAX's
CPU client adopts without a copy, and converted only when the requested dtype differs, so the
host holds the model about once, plus one tensor. With ``mesh=`` each device receives only its
shard of each tensor.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import warnings
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import NamedSharding

from jaxgen import quantization, sharding
from jaxgen.generation_config import from_checkpoint as generation_settings
from jaxgen.generation_config import set_fields
from jaxgen.models import family_of, files
from jaxgen.models.checkpoint import Source
from jaxgen.models.config import DTYPES, CheckpointError
from jaxgen.models.model import CausalLM

# transformers' from_pretrained arguments that cannot change what jaxgen loads, with the values
# that do not (None: any value): how torch places or runs the model, and remote code (jaxgen runs
# its own families).
INERT_ARGUMENTS = {
    "trust_remote_code": None, "low_cpu_mem_usage": None, "weights_only": None, "disable_mmap": None,
    "attn_implementation": (None, "eager", "sdpa"), "device_map": (None, "auto", "cpu"),
    "ignore_mismatched_sizes": (False,), "output_loading_info": (False,),
}


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
    subfolder: str = "",
    variant: str | None = None,
    use_safetensors: bool | None = None,
    token: str | bool | None = None,
    force_download: bool = False,
    generation_config: Any = None,
    **kwargs,
) -> CausalLM:
    """Loads a checkpoint of any supported family (`jaxgen.models.FAMILIES`) from a local
    directory or the Hugging Face hub.

    Args:
      name_or_path: a local directory in Hugging Face layout, or a hub id such as ``"gpt2"``.
      dtype: params and activations dtype: ``"auto"`` (default, as transformers 5.x: the
        checkpoint's ``dtype`` / ``torch_dtype`` from ``config.json``, else its weights' first
        floating dtype), ``"float32"``, ``"bfloat16"`` or ``"float16"`` (names, jnp, numpy or
        torch dtypes; ``torch_dtype=`` too, transformers' old name). Softmax, norm statistics
        and logits stay float32.
      mesh, data_axis, model_axis: place each param straight onto ``mesh`` as `jaxgen.shard`
        lays it out (tensor-parallel along ``model_axis``), each device receiving only its shard.
      revision, cache_dir, token, force_download: passed to ``huggingface_hub.hf_hub_download``
        for hub ids.
      local_files_only: use only the local hub cache; ``None`` follows ``HF_HUB_OFFLINE``.
      subfolder, variant, use_safetensors: as transformers: the checkpoint's folder inside the
        directory or repository; weight files named ``model.<variant>.safetensors`` (and so on);
        safetensors only (True), PyTorch pickles only (False), or safetensors first (None).
      generation_config: a transformers ``GenerationConfig`` (or a dict of its fields) to use
        instead of the checkpoint's ``generation_config.json``.
      **kwargs: transformers' other loading arguments where they cannot change the result
        (`INERT_ARGUMENTS`: ``trust_remote_code``, ``device_map="auto"``, ...); others raise.
      quantize: ``"int8"`` stores the products' weights as int8 with per-channel scales
        (`jaxgen.quantize`), each tensor quantized on the host as it is read; None keeps ``dtype``.

    Raises:
      CheckpointError (a ValueError) naming the problem: a missing directory or weights file, an
      unreadable file, an unsupported ``model_type`` or config option, or tensors whose names or
      shapes disagree with the config.
    """
    dtype = _transformers_arguments(kwargs, dtype)
    if quantize is not None:
        quantization.check_method(quantize)
    source = str(name_or_path)
    fetch = files.local_fetcher(name_or_path, subfolder) if files.is_local(name_or_path) else files.hub_fetcher(
        source, revision, cache_dir, local_files_only, subfolder=subfolder or None, token=token,
        force_download=force_download)
    raw_config = files.read_json(fetch("config.json", required=True))
    if raw_config.get("quantization_config"):
        method = raw_config["quantization_config"].get("quant_method", "?")
        raise CheckpointError(f"{source!r} is a pre-quantized checkpoint (quantization_config, quant_method "
                              f"{method!r}), which jaxgen does not load; load its full-precision checkpoint "
                              "(quantize='int8' quantizes it as it loads)")
    family = family_of(raw_config.get("model_type"))
    # opened once, on first use: after the config's checks, unless dtype="auto" needs the weights' dtype
    opened = functools.cache(lambda: files.open_weights(fetch, source, files.weight_files(variant, use_safetensors)))
    dtype_name = _dtype_name(dtype, raw_config, lambda: opened().floating_dtype())
    config = family.config_from_hf(_hf_config(raw_config), dtype_name)
    tensors = opened()
    table = family.checkpoint_table(config)
    config, table = _head_as_stored(config, table, family, tensors, source)
    generation = generation_settings(_generation_json(generation_config, fetch), raw_config)

    place, placed_config = _placer(config, mesh, data_axis, model_axis)
    repeat = placed_config.n_kv_heads // config.n_kv_heads
    used: set[str] = set()

    def load(path, entry: Source):
        arrays = [tensors.read(_resolve(tensors, name, family.PREFIXES, source, used), shape)
                  for name, shape in zip(entry.names, entry.shapes)]
        value = entry.build(*arrays)
        del arrays
        keys = sharding.path_keys(path)
        if repeat > 1 and keys[2:4] == ("attn", "qkv"):
            value = sharding.repeat_kv_heads(value, config.n_heads // config.n_kv_heads, repeat)
        if quantize is not None and quantization.quantizes(keys):  # from the weight in ``dtype``, as quantize()
            w = quantization.int8(files.aligned(value, DTYPES[dtype_name]), dtype_name)
            return w.replace(q=place((*keys, "q"), files.aligned(w.q, np.int8)),
                             scale=place((*keys, "scale"), files.aligned(w.scale, np.float32)))
        return place(keys, files.aligned(value, DTYPES[dtype_name]))

    params = jax.tree_util.tree_map_with_path(load, table, is_leaf=lambda x: isinstance(x, Source))
    _check_all_used(tensors.names, used, family, config, source)
    return CausalLM(params=params, config=placed_config, generation_config=generation)


def _hf_config(raw: dict[str, Any]):
    """transformers' config object for ``raw`` (its model_type's class, defaults filled in)."""
    from transformers import CONFIG_MAPPING

    try:
        return CONFIG_MAPPING[raw["model_type"]].from_dict(dict(raw))
    except Exception as e:  # transformers' validators raise several types
        raise CheckpointError(f"config.json is not a valid {raw['model_type']} config: {e}") from None


def _transformers_arguments(kwargs: dict[str, Any], dtype: Any) -> Any:
    """Checks transformers' other from_pretrained arguments (`INERT_ARGUMENTS`; ``torch_dtype``,
    its old name of ``dtype``, warns as there and stands for it); returns the dtype to load."""
    if "torch_dtype" in kwargs:
        warnings.warn("torch_dtype is deprecated! Use dtype instead! (as transformers)", stacklevel=3)
        torch_dtype = kwargs.pop("torch_dtype")
        dtype = torch_dtype if isinstance(dtype, str) and dtype == "auto" else dtype
    if kwargs.get("proxies") is not None:
        warnings.warn("proxies is not used: huggingface_hub reads the HTTP_PROXY / HTTPS_PROXY environment "
                      "variables", stacklevel=3)
    kwargs.pop("proxies", None)
    for name, value in kwargs.items():
        allowed = INERT_ARGUMENTS.get(name, ())
        if name not in INERT_ARGUMENTS or (allowed is not None and value not in allowed):
            simple = isinstance(value, (str, bool, int, float, type(None)))
            shown = repr(value) if simple else f"<{type(value).__name__}>"
            raise ValueError(f"from_pretrained got {name}={shown}, which jaxgen does not support"
                             + (f" (allowed: {allowed})" if name in INERT_ARGUMENTS else ""))
    return dtype


# dtype names transformers takes beside DTYPES' (torch's attribute names)
_DTYPE_ALIASES = {"half": "float16", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _dtype_name(dtype: Any, raw_config: dict[str, Any], weights_dtype: Callable[[], str | None]) -> str:
    """The dtype to load in (a `DTYPES` name), for ``dtype`` as transformers 5.x takes it
    (``weights_dtype()``: the checkpoint's, where ``"auto"`` finds none in the config)."""
    if dtype is None:  # transformers: torch's default dtype
        return "float32"
    if isinstance(dtype, str) and dtype == "auto":
        dtype = raw_config.get("dtype") or raw_config.get("torch_dtype") or weights_dtype() or "float32"
        if str(dtype).removeprefix("torch.") not in DTYPES:
            raise CheckpointError(f"config.json gives dtype {dtype!r}; pass dtype= one of {sorted(DTYPES)}")
        return str(dtype).removeprefix("torch.")
    name = str(dtype).removeprefix("torch.") if isinstance(dtype, str) or type(dtype).__module__ == "torch" else None
    name = _DTYPE_ALIASES.get(name, name)
    if name in DTYPES:
        return name
    if name is None and not isinstance(dtype, dict):
        try:
            return next(n for n, dt in DTYPES.items() if np.dtype(dtype) == np.dtype(dt))
        except (TypeError, StopIteration):
            pass
    raise ValueError(f"dtype={dtype!r} is not supported; use 'auto' or one of {sorted(DTYPES)} (one dtype for the "
                     "whole model)")


def _head_as_stored(config, table: dict, family, tensors: files.Tensors, source: str) -> tuple[Any, dict]:
    """(config, checkpoint table) for the head the checkpoint holds, as transformers 5.x reads a
    tied config: an ``lm_head.weight`` that differs from the embedding unties them (with
    transformers' warning; the config keeps saying tied, as transformers', which DoLa's choice of
    layers reads), and one stored without the embedding stands for both."""
    heads = [n for n in tensors.names if n == "lm_head.weight" or n.endswith(".lm_head.weight")]
    if not config.tie_word_embeddings or len(heads) != 1:
        return config, table
    embed = table["embed"]
    try:
        embed_name = _resolve(tensors, embed.names[0], family.PREFIXES, source, set())
    except CheckpointError:  # the head alone: it is the embedding too
        return config, {**table, "embed": dataclasses.replace(embed, names=(heads[0],))}
    if np.array_equal(tensors.read(embed_name, embed.shapes[0]), tensors.read(heads[0], embed.shapes[0])):
        return config, table
    warnings.warn(f"{source!r}: tie_word_embeddings is set, but {heads[0]} and {embed_name} are both present in the "
                  "checkpoint with different values, so they are not tied (as transformers)", stacklevel=3)
    return config, family.checkpoint_table(dataclasses.replace(config, tie_word_embeddings=False))


def _generation_json(argument: Any, fetch: files.Fetcher) -> dict[str, Any] | None:
    """The generation settings' JSON: a ``generation_config=`` argument's fields, else the
    checkpoint's ``generation_config.json``; None where there is none, or where that file cannot
    be read (transformers then falls back to config.json's fields, with a warning)."""
    if argument is not None:
        return set_fields(argument)
    path = fetch("generation_config.json")
    if path is None:
        return None
    try:
        return files.read_json(path)
    except CheckpointError as e:
        warnings.warn(f"{e}; using the generation fields of config.json (as transformers)", stacklevel=3)
        return None


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


def _resolve(tensors: files.Tensors, name: str, prefixes: tuple[str, ...], source: str, used: set[str]) -> str:
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
