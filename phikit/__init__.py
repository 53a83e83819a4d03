"""phikit: run, quantize, benchmark, fine-tune, evaluate and serve Microsoft Phi-2 on one GPU or a CPU."""

from phikit.config import PhiConfig
from phikit.errors import PhikitError
from phikit.generate import Completion, GenerationConfig, Phi, generate, load, stream
from phikit.model import PhiForCausalLM
from phikit.tokenizer import Tokenizer

__version__ = "0.1.0"

__all__ = [
    "Completion",
    "GenerationConfig",
    "Phi",
    "PhiConfig",
    "PhiForCausalLM",
    "PhikitError",
    "Tokenizer",
    "generate",
    "load",
    "stream",
]
