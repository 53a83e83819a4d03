"""phikit: run, quantize, benchmark, fine-tune, evaluate and serve Microsoft Phi-2 on one GPU or a CPU.

``phikit.load(...)`` returns a ``Phi`` with ``.generate`` and ``.stream``; the functions behind them live
in ``phikit.generate`` (not re-exported here, so the module name stays importable).
"""

from phikit.api import Phi, load, save_quantized
from phikit.config import PhiConfig
from phikit.errors import PhikitError
from phikit.generate import Completion, GenerationConfig
from phikit.model import PhiForCausalLM
from phikit.quantize import QuantSpec
from phikit.tokenizer import Tokenizer

__version__ = "0.1.0"

__all__ = [
    "Completion",
    "GenerationConfig",
    "Phi",
    "PhiConfig",
    "PhiForCausalLM",
    "PhikitError",
    "QuantSpec",
    "Tokenizer",
    "load",
    "save_quantized",
]
