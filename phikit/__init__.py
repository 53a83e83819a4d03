"""phikit: run, quantize, benchmark, fine-tune, evaluate and serve Microsoft's Phi models on one GPU or a CPU.

``phikit.load(...)`` returns a ``Phi`` with ``.generate`` and ``.stream``; the functions behind them live
in ``phikit.generate`` (not re-exported here, so the module name stays importable).

The names below import on first use (PEP 562), so ``import phikit.errors`` or the ``phikit`` command's
first lines do not wait for PyTorch: a Ctrl-C while it imports ends the command with one line.
"""

import importlib as _importlib
from typing import TYPE_CHECKING as _TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {  # name -> the module that defines it
    "Phi": "phikit.api",
    "load": "phikit.api",
    "save_quantized": "phikit.api",
    "PhiConfig": "phikit.config",
    "Phi3Config": "phikit.config",
    "PhikitError": "phikit.errors",
    "Completion": "phikit.generate",
    "GenerationConfig": "phikit.generate",
    "CausalLM": "phikit.models",
    "PhiForCausalLM": "phikit.models.phi",
    "Phi3ForCausalLM": "phikit.models.phi3",
    "QuantSpec": "phikit.quantize",
    "Tokenizer": "phikit.tokenizer",
}

__all__ = sorted(_EXPORTS, key=str.lower)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(_importlib.import_module(_EXPORTS[name]), name)
    elif name in _submodules():  # not imported yet (phikit.kernels, ...): as an eager package would have it
        value = _importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def _submodules() -> set[str]:
    """phikit's modules and packages, by name (``__main__``, the command, is none of them)."""
    import pkgutil

    return {m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")}


def __dir__() -> list[str]:
    return sorted({*_EXPORTS, *_submodules(), "__version__"})


if _TYPE_CHECKING:  # what editors and type checkers see (`X as X`: re-exported)
    from phikit.api import Phi as Phi
    from phikit.api import load as load
    from phikit.api import save_quantized as save_quantized
    from phikit.config import Phi3Config as Phi3Config
    from phikit.config import PhiConfig as PhiConfig
    from phikit.errors import PhikitError as PhikitError
    from phikit.generate import Completion as Completion
    from phikit.generate import GenerationConfig as GenerationConfig
    from phikit.models import CausalLM as CausalLM
    from phikit.models.phi import PhiForCausalLM as PhiForCausalLM
    from phikit.models.phi3 import Phi3ForCausalLM as Phi3ForCausalLM
    from phikit.quantize import QuantSpec as QuantSpec
    from phikit.tokenizer import Tokenizer as Tokenizer
