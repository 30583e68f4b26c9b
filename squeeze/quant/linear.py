"""`QuantizedWeight` (what a method produces and the exporter writes) and `QuantLinear` (the runtime module).

`QuantLinear.forward` calls `linear_forward`, a module-level hook: on CPU it dequantizes once (cached)
and runs `F.linear`, quantizing activations dynamically when the scheme has them (W8A8, FP8 block). A
CUDA backend replaces the hook with `squeeze.kernels` GEMMs via `set_linear_backend` without touching
the module or the pipeline; `kernel_linear` (registered for 'cuda') maps each scheme to its
`squeeze.kernels` op.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from squeeze.checkpoint.fp8 import FP8_DTYPE
from squeeze.quant.observers import dequantize_weight, fake_quantize_activations
from squeeze.quant.scheme import QuantScheme


@dataclass
class QuantizedWeight:
    """Stored numbers of one Linear: int8-held integers (or fp8) + scales (+ zero points)."""

    q: torch.Tensor  # int8 for int schemes (values in [qmin, qmax]), float8_e4m3fn for float ones
    scale: torch.Tensor  # fp32, compressed-tensors shape
    zero_point: torch.Tensor | None  # int8 or None (symmetric)
    scheme: QuantScheme

    @classmethod
    def from_values(cls, q: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None,
                    scheme: QuantScheme) -> QuantizedWeight:
        dtype = FP8_DTYPE if scheme.weights.type == "float" else torch.int8
        return cls(q.to(dtype), scale.float(), None if zp is None else zp.to(torch.int8), scheme)

    def dequantize(self) -> torch.Tensor:
        zp = None if self.zero_point is None else self.zero_point.float()
        return dequantize_weight(self.q.float(), self.scale, zp, self.scheme.weights)


def _cpu_linear(x: torch.Tensor, module: QuantLinear) -> torch.Tensor:
    if module.scheme.input_activations is not None:
        x = fake_quantize_activations(x, module.scheme.input_activations)
    return F.linear(x, module.dense_weight(x.dtype), module.bias)


def kernel_linear(x: torch.Tensor, module: QuantLinear, backend: str = "auto") -> torch.Tensor:
    """The `squeeze.kernels` GEMM for the module's scheme (registered for CUDA; `backend="torch"` runs
    the kernels' references anywhere, which the tests use to check the argument plumbing on CPU)."""
    from squeeze import kernels

    qw, args, acts = module.qweight, module.scheme.weights, module.scheme.input_activations
    zp = qw.zero_point
    group = int(args.group_size) if args.strategy == "group" else -1
    if args.type == "float" and args.strategy == "block" and tuple(args.block_structure or ()) == (128, 128):
        y = kernels.linear_fp8_block(x, qw.q, qw.scale, backend=backend)
    elif args.type == "int" and acts is None and args.num_bits == 4 and args.strategy in ("group", "channel"):
        packed = module.cached("packed", lambda: kernels.pack_int4(qw.q))
        y = kernels.linear_w4a16(x, packed, qw.scale, zp, group, backend=backend)
    elif args.type == "int" and acts is None and args.num_bits == 8 and args.strategy in ("group", "channel"):
        y = kernels.linear_w8a16(x, qw.q, qw.scale, zp, group, backend=backend)
    elif (args.type == "int" and args.num_bits == 8 and args.strategy == "channel" and zp is None
          and acts is not None and acts.type == "int" and acts.strategy == "token"):
        y = kernels.linear_w8a8(x, qw.q, qw.scale, backend=backend)
    else:
        return _cpu_linear(x, module)
    return y if module.bias is None else y + module.bias


LinearImpl = Callable[[torch.Tensor, "QuantLinear"], torch.Tensor]
_BACKENDS: dict[str, LinearImpl] = {"cpu": _cpu_linear, "cuda": kernel_linear}


def set_linear_backend(device_type: str, impl: LinearImpl) -> None:
    """Route QuantLinear forwards on `device_type` (e.g. 'cuda') to `impl` (e.g. a squeeze.kernels GEMM)."""
    _BACKENDS[device_type] = impl


def linear_forward(x: torch.Tensor, module: QuantLinear) -> torch.Tensor:
    return _BACKENDS.get(x.device.type, _cpu_linear)(x, module)


class QuantLinear(nn.Module):
    """A Linear whose weight is a `QuantizedWeight`; the dense weight is a cache, not state."""

    def __init__(self, qweight: QuantizedWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.qweight = qweight
        self.scheme = qweight.scheme
        self.out_features, self.in_features = qweight.q.shape
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self._dense: torch.Tensor | None = None
        self._cache: dict[str, torch.Tensor] = {}

    def cached(self, key: str, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Backend-specific derived tensors (e.g. packed int4), built once."""
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self._dense is None or self._dense.dtype != dtype:
            self._dense = self.qweight.dequantize().to(dtype)
        return self._dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_forward(x, self)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.scheme.describe()}"
