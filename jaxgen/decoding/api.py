"""Public decoders: `generate` (dispatches like transformers), `greedy_search`, `beam_search`, `sample`.

Each call validates its arguments on the host (`args.parse`), left-pads the prompt to its bucket,
and runs one jitted program keyed on the static `DecodeSpec`: a second call with the same
shapes and flags (another prompt of the same bucket, new float knobs) reuses it.
`compile_generate` splits a call into compile and run, for status lines and benchmarks.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import numpy as np

from jaxgen import generation_config, sharding
from jaxgen.decoding import args, beam, constrained, contrastive, engine, greedy, group_beam, lookup
from jaxgen.decoding.engine import DecodeSpec
from jaxgen.models.model import CausalLM
from jaxgen.outputs import GenerateOutput


@functools.partial(jax.jit, static_argnames=("spec",))
def _decode(model, input_ids, attention_mask, prompt_len, processors, key, length_penalty, penalty_alpha, assistant,
            guidance, streamer_id, *, spec: DecodeSpec) -> GenerateOutput:
    if spec.constraints:
        return constrained.decode(model, input_ids, attention_mask, prompt_len, processors, length_penalty, spec)
    if spec.num_beam_groups > 1:
        return group_beam.decode(model, input_ids, attention_mask, prompt_len, processors, length_penalty, spec)
    if spec.beam_search:
        return beam.decode(model, input_ids, attention_mask, prompt_len, processors, key, length_penalty, spec)
    if spec.contrastive:
        return contrastive.decode(model, input_ids, attention_mask, prompt_len, processors, penalty_alpha, streamer_id,
                                  spec)
    if spec.lookup:
        return lookup.decode(model, input_ids, attention_mask, prompt_len, processors, key, streamer_id, spec,
                             assistant)
    return greedy.decode(model, input_ids, attention_mask, prompt_len, processors, key, streamer_id, spec, guidance)


def _operands(req: args.Request):
    return (req.input_ids, req.attention_mask, req.prompt_len, req.processors, req.key, req.length_penalty,
            req.penalty_alpha, req.assistant, req.guidance, req.streamer_id)


def _streaming(req: args.Request, input_ids, run: Callable[[], GenerateOutput]) -> GenerateOutput:
    """Runs ``run`` with ``req.streamer`` registered: ``put(prompt)``, ``put(tokens)`` per step
    from inside the loop, ``end()`` once the result is ready (transformers' streamer protocol)."""
    if req.streamer is None:
        return run()
    with engine.registered(req.streamer) as streamer_id:
        req.streamer_id = streamer_id
        # the prompt once per returned sequence, as transformers expands it before putting it
        req.streamer.put(np.repeat(np.asarray(input_ids), req.spec.num_return_sequences, axis=0))
        out = jax.block_until_ready(run())
    req.streamer.end()
    return out


def _place(model: CausalLM, req: args.Request) -> CausalLM:
    """With a mesh: params onto it (if `jaxgen.shard` was not called) and the batch split along
    the data axis (concrete inputs; traced ones are pinned inside the program)."""
    spec = req.spec
    if spec.mesh is None:
        return model
    if not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(model)) and not sharding.is_on(model, spec.mesh):
        model = sharding.shard(model, spec.mesh, data_axis=spec.data_axis, model_axis=spec.model_axis)
    if args._is_concrete(req.input_ids):  # traced / multi-host global arrays are pinned in the program
        rows = sharding.rows_sharding(spec.mesh, spec.data_axis, 2)
        req.input_ids, req.attention_mask = jax.device_put((req.input_ids, req.attention_mask), rows)
    return model


def _run(model, input_ids, attention_mask, kwargs, beam_search=None) -> GenerateOutput | np.ndarray:
    if "inputs" in kwargs:  # transformers' name for input_ids
        if input_ids is not None:
            raise ValueError("pass the prompt as input_ids or as inputs, not both")
        input_ids = kwargs.pop("inputs")
    req = args.parse(model, input_ids, attention_mask, kwargs, beam_search)
    model = _place(model, req)
    out = _streaming(req, req.prompt, lambda: _decode(model, *_operands(req), spec=req.spec))
    if req.return_dict:
        return out
    if not args._is_concrete(out.sequences):
        raise ValueError("return_dict_in_generate=False is not allowed inside a traced function: the sequences are "
                         "cropped on the host; use the returned GenerateOutput's sequences")
    return out.trim().sequences


def compile_generate(model: CausalLM, input_ids=None, attention_mask=None, **kwargs) -> Callable[[], GenerateOutput]:
    """Validates and compiles a `generate` call without running it; returns a function that
    runs the compiled program (the same one `generate` would use) and returns its output. The
    function's ``compiled`` attribute is XLA's executable (``jax.stages.Compiled``:
    ``as_text()``, ``memory_analysis()``, ``cost_analysis()``)."""
    req = args.parse(model, input_ids, attention_mask, _call(kwargs))
    model = _place(model, req)
    compiled = _decode.lower(model, *_operands(req), spec=req.spec).compile()

    def run() -> GenerateOutput:
        return _streaming(req, req.prompt, lambda: compiled(model, *_operands(req)))

    run.compiled = compiled
    return run


def _call(kwargs: dict[str, Any], fn: str | None = None, **fixed) -> dict[str, Any]:
    """A call's arguments: a ``generation_config=`` expanded under the others
    (`generation_config.with_argument`), then the values that ``fn`` fixes."""
    kwargs = generation_config.with_argument(kwargs, args.DEFAULTS)
    for name, value in fixed.items():
        if name in kwargs and kwargs[name] != value:
            raise ValueError(f"{fn} runs with {name}={value!r}; got {name}={kwargs[name]!r} (use jaxgen.generate)")
    return {**kwargs, **fixed}


def generate(model: CausalLM, input_ids=None, attention_mask=None, **kwargs) -> GenerateOutput:
    """transformers ``generate()`` for a jaxgen model, compiled.

    Args:
      model: from `jaxgen.from_pretrained` (a pytree: may be traced, sharded, jitted over).
      input_ids: int[batch, prompt_len], left-padded (None: one row of bos_token_id; also as
        ``inputs=``). attention_mask: {0,1}[batch, prompt_len], any mask transformers takes (right
        padding warns, as there). Without it, transformers' inferred
        mask: ``input_ids != pad_token_id`` where the pad id occurs in input_ids and is no EOS id,
        else all ones.
      **kwargs: transformers' names and defaults: max_new_tokens / max_length (default: 20 new
        tokens, at most up to the model's max_position_embeddings), min_new_tokens / min_length, num_beams,
        num_return_sequences, length_penalty, early_stopping (True / False / "never"),
        eos_token_id (int or list; default the model's), pad_token_id, do_sample with key (a jax
        PRNG key), temperature, top_h, top_k (default 50 when sampling), top_p, min_p, typical_p,
        epsilon_cutoff, eta_cutoff, repetition_penalty, no_repeat_ngram_size, bad_words_ids,
        encoder_repetition_penalty and encoder_no_repeat_ngram_size (over the prompt as passed),
        sequence_bias, suppress_tokens, begin_suppress_tokens, forced_bos_token_id,
        forced_eos_token_id, exponential_decay_length_penalty, renormalize_logits,
        remove_invalid_values, logits_processor (JAX callables ``fn(scores, ctx)``),
        penalty_alpha (contrastive search), num_beam_groups and diversity_penalty (group beam
        search), force_words_ids and constraints (constrained beam search), stop_strings with
        tokenizer (transformers' stop-string criterion), output_scores, output_logits,
        output_attentions, output_hidden_states; and jaxgen's prompt_bucket (default 32; None
        disables).
        ``generation_config``: a transformers ``GenerationConfig`` (or a dict of its fields) whose
        set fields act as arguments, under those passed by name. An argument not passed takes the
        value of ``model.generation_config`` (the checkpoint's), as in transformers.

    Dispatch: ``num_beams > 1`` -> beam search (beam sampling with ``do_sample``, group beam
    search with ``num_beam_groups > 1``, constrained beam search with ``force_words_ids`` or
    ``constraints``); otherwise contrastive search with ``penalty_alpha > 0``
    and ``top_k > 1``, else greedy search or sampling. Returns a `GenerateOutput`; ``.trim()``
    gives transformers' shapes.
    """
    return _run(model, input_ids, attention_mask, _call(kwargs))


def greedy_search(model: CausalLM, input_ids=None, attention_mask=None, **kwargs) -> GenerateOutput:
    """Greedy decoding (``generate`` with ``num_beams=1, do_sample=False`` and no ``penalty_alpha``,
    which would select contrastive search)."""
    return _run(model, input_ids, attention_mask,
                _call(kwargs, "greedy_search", num_beams=1, do_sample=False, penalty_alpha=None), False)


def beam_search(model: CausalLM, input_ids=None, attention_mask=None, **kwargs) -> GenerateOutput:
    """Beam search (``generate`` with ``num_beams`` beams, ``do_sample=False``); always runs the
    beam algorithm, also for ``num_beams=1``. ``num_beams`` may come from the model's
    ``generation_config``."""
    kwargs = _call(kwargs, "beam_search", do_sample=False)
    if kwargs.get("num_beams", getattr(model, "generation_config", {}).get("num_beams")) is None:
        raise ValueError("beam_search needs num_beams (an int >= 1)")
    return _run(model, input_ids, attention_mask, kwargs, True)


def sample(model: CausalLM, input_ids=None, attention_mask=None, *, key=None, **kwargs) -> GenerateOutput:
    """Multinomial sampling (``generate`` with ``do_sample=True``); with ``num_beams > 1``, beam
    sampling. ``key``: a ``jax.random.key``; the same key gives the same output."""
    return _run(model, input_ids, attention_mask, {**_call(kwargs, "sample", do_sample=True), "key": key})
