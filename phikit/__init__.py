"""phikit: run, quantize, benchmark, fine-tune, evaluate and serve Microsoft's Phi models on one GPU or a CPU.

``phikit.load(...)`` returns a ``Phi`` with ``.generate`` and ``.stream``; the functions behind them live
in ``phikit.generate`` (not re-exported here, so the module name stays importable).
"""

from phikit.api import Phi, load, save_quantized
from phikit.config import Phi3Config, PhiConfig
from phikit.errors import PhikitError
from phikit.generate import Completion, GenerationConfig
from phikit.models import CausalLM
from phikit.models.phi import PhiForCausalLM
from phikit.models.phi3 import Phi3ForCausalLM
from phikit.quantize import QuantSpec
from phikit.tokenizer import Tokenizer

__version__ = "0.1.0"

__all__ = [
    "Completion",
    "GenerationConfig",
    "CausalLM",
    "Phi",
    "Phi3Config",
    "Phi3ForCausalLM",
    "PhiConfig",
    "PhiForCausalLM",
    "PhikitError",
    "QuantSpec",
    "Tokenizer",
    "load",
    "save_quantized",
]
