"""Round-to-nearest: min/max observer per channel / group / block, no calibration data needed.

Also registered as `fp8-block`: DeepSeek's FP8 scheme has nothing to optimise beyond the block amax.
"""

from __future__ import annotations

import torch
from torch import nn

from squeeze.quant.calibration import LayerCalibration, Target
from squeeze.quant.linear import QuantizedWeight
from squeeze.quant.methods import QuantMethod, register_method
from squeeze.quant.observers import quantize_weight, weight_qparams
from squeeze.quant.scheme import QuantScheme


def rtn_quantize(weight: torch.Tensor, scheme: QuantScheme) -> QuantizedWeight:
    scale, zp = weight_qparams(weight, scheme.weights)
    return QuantizedWeight.from_values(quantize_weight(weight, scale, zp, scheme.weights), scale, zp, scheme)


@register_method
class RTN(QuantMethod):
    name = "rtn"

    def quantize_layer(self, layer: nn.Module, calib: LayerCalibration,
                       targets: list[Target]) -> dict[str, QuantizedWeight]:
        return {t.name: rtn_quantize(t.module.weight.data, t.scheme) for t in targets}  # type: ignore[arg-type]


@register_method
class FP8Block(RTN):
    name = "fp8-block"
