"""jaxgen: Hugging Face ``generate()`` for causal LMs in JAX, compiled, with transformers' numbers."""

from jaxgen.cli import DEMO_MODEL
from jaxgen.decoding.api import beam_search, generate, greedy_search, sample
from jaxgen.decoding.batch import Completion, generate_batch
from jaxgen.models.cache import KVCache
from jaxgen.models.config import CheckpointError
from jaxgen.models.load import from_pretrained
from jaxgen.models.model import CausalLM
from jaxgen.outputs import GenerateOutput, HFOutput
from jaxgen.processors import ProcessorContext
from jaxgen.quantization import Int8Weight, quantize
from jaxgen.scores import compute_transition_scores
from jaxgen.sharding import shard

GPT2 = CausalLM  # deprecated alias: every family loads as a CausalLM

__all__ = [
    "CausalLM", "Completion", "DEMO_MODEL", "GPT2", "KVCache", "CheckpointError", "GenerateOutput", "HFOutput",
    "Int8Weight", "ProcessorContext", "beam_search", "compute_transition_scores", "from_pretrained", "generate",
    "generate_batch", "greedy_search", "quantize", "sample", "shard",
]
__version__ = "0.1.0"
