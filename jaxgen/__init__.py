"""jaxgen: Hugging Face ``generate()`` for causal LMs in JAX, compiled, with transformers' numbers."""

from jaxgen.decoding.api import beam_search, generate, greedy_search, sample
from jaxgen.models.gpt2 import GPT2, GPT2Config, KVCache
from jaxgen.models.load import CheckpointError, from_pretrained
from jaxgen.outputs import GenerateOutput, HFOutput
from jaxgen.processors import ProcessorContext
from jaxgen.scores import compute_transition_scores
from jaxgen.sharding import shard

__all__ = [
    "GPT2", "GPT2Config", "KVCache", "CheckpointError", "GenerateOutput", "HFOutput", "ProcessorContext",
    "beam_search", "compute_transition_scores", "from_pretrained", "generate", "greedy_search", "sample", "shard",
]
__version__ = "0.1.0"
