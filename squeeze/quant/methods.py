"""The per-layer method interface and the registry the pipeline and recipes look methods up in.

A method chooses the stored numbers of the Linears it is given in one decoder layer:

    class MyMethod(QuantMethod):
        name = "mine"
        needs_hessian = False          # True: the pipeline fills calib.stats[t.name].hessian first
        def quantize_layer(self, layer, calib, targets) -> dict[str, QuantizedWeight]: ...

`layer` is the full-precision DecoderLayer (fp32), `calib` a `LayerCalibration` (inputs to the
layer, Hessians, `run`/`capture_inputs` to re-run it), `targets` the `Target`s the recipe assigned to
this method. A method may also rewrite other parameters of the layer first (AWQ / SmoothQuant fold
scales into norms); the pipeline then quantizes, swaps in `QuantLinear`s, and measures errors.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

from torch import nn

from squeeze.errors import SqueezeError
from squeeze.quant.calibration import LayerCalibration, Target
from squeeze.quant.linear import QuantizedWeight


class QuantMethod(ABC):
    name: ClassVar[str]
    needs_hessian: ClassVar[bool] = False
    # True when one transform spans many Linears (AWQ / SmoothQuant folds): get all targets in one call
    whole_layer: ClassVar[bool] = False

    def __init__(self, **params: Any) -> None:
        self.params = params

    @abstractmethod
    def quantize_layer(self, layer: nn.Module, calib: LayerCalibration,
                       targets: list[Target]) -> dict[str, QuantizedWeight]:
        """Return the QuantizedWeight of every target, keyed by `Target.name`."""


METHODS: dict[str, type[QuantMethod]] = {}


def register_method(cls: type[QuantMethod]) -> type[QuantMethod]:
    METHODS[cls.name] = cls
    return cls


def get_method(name: str, **params: Any) -> QuantMethod:
    _load_builtin()
    if name not in METHODS:
        raise SqueezeError(f"unknown quantization method {name!r} (known: {', '.join(sorted(METHODS))})")
    try:
        return METHODS[name](**params)
    except TypeError as e:
        raise SqueezeError(f"bad parameters for method {name}: {e}") from None


def known_methods() -> list[str]:
    _load_builtin()
    return sorted(METHODS)


def _load_builtin() -> None:
    """Import the method modules so they register themselves (later ones: awq, smoothquant, qat)."""
    import importlib

    for mod in ("rtn", "gptq", "awq", "smoothquant", "qat"):
        try:
            importlib.import_module(f"squeeze.quant.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"squeeze.quant.{mod}":
                raise
