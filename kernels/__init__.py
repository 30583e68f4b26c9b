"""Triton kernels for compressed DeepSeek-V3-style MoE models (see kernels/README.md).

Public API (each runs Triton on CUDA tensors and the torch reference otherwise; pass
``backend="triton"`` or ``"torch"`` to force one):

* :func:`linear_w4a16` / :func:`linear_w8a16`: int4 (pack-quantized) / int8 weights, group scales.
* :func:`linear_fp8_block`: DeepSeek-V3 block-FP8 weights, activations quantized on the fly.
* :func:`linear_w8a8`: int8 weights and dynamically quantized int8 activations.
* :func:`moe_experts`: all routed experts' gate/up and down projections, one launch each.
"""

from __future__ import annotations

from .packing import pack_int4, unpack_int4
from .reference import dequantize_fp8_block, dequantize_weight

__all__ = [
    "dequantize_fp8_block",
    "dequantize_weight",
    "linear_fp8_block",
    "linear_w4a16",
    "linear_w8a16",
    "linear_w8a8",
    "moe_experts",
    "pack_int4",
    "unpack_int4",
]


def __getattr__(name: str):
    """Import the Triton modules lazily: `import squeeze.kernels` must not import triton.

    Keeping triton out of the package import lets the CPU-only parts of squeeze (and tests that
    set TRITON_INTERPRET=1 late) import this package freely.
    """
    if name in ("linear_w4a16", "linear_w8a16"):
        from . import w4a16

        return w4a16.linear_wq
    if name == "linear_fp8_block":
        from .fp8_block import linear_fp8_block

        return linear_fp8_block
    if name == "linear_w8a8":
        from .w8a8 import linear_w8a8

        return linear_w8a8
    if name == "moe_experts":
        from .moe import moe_experts

        return moe_experts
    raise AttributeError(name)
