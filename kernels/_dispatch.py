"""Backend selection shared by every public kernel entry point.

Every op in this package exists twice: a Triton kernel (fast, CUDA or the Triton CPU interpreter)
and a plain-torch reference (any device, slow but obviously right). The choice is made here, once,
so all ops agree on what ``backend="auto"`` means.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch

from .reference import FP8_BLOCK, resolve_group

Backend = Literal["auto", "triton", "torch"]


def interpreting() -> bool:
    """True when Triton was imported with TRITON_INTERPRET=1 (kernels then run on CPU tensors)."""
    from triton import knobs

    return bool(knobs.runtime.interpret)


def use_triton(backend: Backend, *tensors: torch.Tensor) -> bool:
    """Decide whether to launch the Triton kernel.

    ``auto`` runs Triton on CUDA tensors only; CPU tensors get the torch reference, so the
    quantized modules work unchanged on a laptop. ``triton`` forces the kernel and therefore
    needs CUDA tensors or the interpreter (a clear error beats a cryptic driver failure).
    """
    if backend == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "auto":
        return on_cuda
    if backend != "triton":
        raise ValueError(f"unknown backend {backend!r}; expected 'auto', 'triton' or 'torch'")
    if not on_cuda and not interpreting():
        raise RuntimeError(
            "backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is imported"
        )
    return True


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors to fill; a fixed small number in the interpreter."""
    if device.type != "cuda":
        return 4
    return _sms(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def tma_compatible(t: torch.Tensor) -> bool:
    """Whether a TMA descriptor can view ``t`` as rows: 16-byte aligned base and row stride, unit
    inner stride (the copy engine's rules; a violating descriptor fails at launch, not here)."""
    size = t.element_size()
    return (
        t.dim() == 2 and t.stride(1) == 1 and t.data_ptr() % 16 == 0 and (t.stride(0) * size) % 16 == 0
    )


def tile_descriptor(t: torch.Tensor, block: tuple[int, ...]):
    """A TMA descriptor over ``t`` (innermost stride 1) with boxes of shape ``block``; elements past
    the end of any dimension arrive as zeros. Needs :func:`tma_compatible`."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor(t, list(t.shape), list(t.stride()), list(block))


def row_blocks_descriptor(t: torch.Tensor, inner: int, block: tuple[int, int]):
    """A TMA descriptor over a row-major [N, C] tensor viewed as [N, C / inner, inner], with boxes of
    [block[0] rows, block[1] chunks, inner]: one load brings several inner-wide chunks of several rows,
    and rows or chunks past the end arrive as zeros. Needs :func:`tma_compatible` and inner | C."""
    n, c = t.shape
    return tile_descriptor(t.as_strided((n, c // inner, inner), (t.stride(0), inner, 1)), (*block, inner))


def group_blocks(g: int, block_k: int, k: int) -> int:
    """K blocks per scale group (a block's group is ``kb // group_blocks``) for kernels whose K blocks
    never straddle a group.

    Passed as a plain int because Triton compiles an int argument equal to 1 as a constant: with the
    usual 128-wide groups and 128-wide blocks the group index is then the block index itself, where a
    run-time ``k0 // group_size`` cost ~25 instructions of a ~250-instruction step of the int4 plane
    kernel (H100, M = 16 on (18432, 7168): 38.6 -> 37.0 us). Per channel (g = K) every block is in group 0.
    """
    if g == k:
        return -(-k // block_k)
    if g % block_k:
        raise ValueError(f"K block {block_k} must divide the group size {g}")
    return g // block_k


# Argument checks shared by the public entry points. A kernel trusts its shapes: a K that disagrees with the
# weight, or a scale tensor too small for it, reads past the end of a buffer on the GPU (garbage, or an illegal
# address that poisons the CUDA context) instead of failing. The checks touch only shapes and dtypes (no device
# sync, a few microseconds of host time) and raise one ValueError that names what is wrong.


def _shape(t: torch.Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)}"


def check_activations(x: torch.Tensor, k: int, half_only: bool = False) -> None:
    """x [..., K] of floats matching the weight's K; ``half_only``: a kernel that takes bf16 / fp16 only."""
    if x.shape[-1] != k:
        raise ValueError(f"x is {_shape(x)} but the weight takes K = {k} inputs")
    if not x.is_floating_point() or (half_only and x.dtype not in (torch.bfloat16, torch.float16)):
        kinds = "bfloat16 or float16" if half_only else "floating point"
        raise ValueError(f"x must be {kinds}, got {_shape(x)}")


def check_wq_args(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, group_size: int,
    triton_path: bool,
) -> None:
    """W4A16 / W8A16: int32 [N, K/8] (packed int4) or int8 [N, K] weight, [N, K/group] scales and zero points."""
    if weight.dim() != 2 or weight.dtype not in (torch.int32, torch.int8):
        raise ValueError(f"weight must be int32 [N, K/8] (packed int4) or int8 [N, K], got {_shape(weight)}")
    k = weight.shape[1] * (8 if weight.dtype == torch.int32 else 1)
    check_activations(x, k, half_only=triton_path)  # the Triton kernels' int4 / int8 -> float tricks are 16-bit
    groups = k // resolve_group(group_size, k)
    for name, t in (("scale", scale), ("zero_point", zero_point)):
        if t is not None and (t.shape[0] != weight.shape[0] or t.numel() != weight.shape[0] * groups):
            raise ValueError(f"{name} must be [{weight.shape[0]}, {groups}] for this weight and group_size "
                             f"{group_size}, got {_shape(t)}")


def check_fp8_block_args(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor) -> None:
    """Block-FP8: float8_e4m3fn [N, K] weight, [ceil(N/128), ceil(K/128)] scales."""
    if weight.dim() != 2 or weight.dtype != torch.float8_e4m3fn:
        raise ValueError(f"weight must be float8_e4m3fn [N, K], got {_shape(weight)}")
    check_activations(x, weight.shape[1])
    want = [-(-weight.shape[0] // FP8_BLOCK), -(-weight.shape[1] // FP8_BLOCK)]
    if list(scale_inv.shape) != want:
        raise ValueError(f"scale_inv must be {want} (one per 128 x 128 block), got {_shape(scale_inv)}")


def check_w8a8_args(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> None:
    """W8A8: int8 [N, K] weight, one scale per output channel."""
    if weight.dim() != 2 or weight.dtype != torch.int8:
        raise ValueError(f"weight must be int8 [N, K], got {_shape(weight)}")
    check_activations(x, weight.shape[1])
    if weight_scale.numel() != weight.shape[0]:
        raise ValueError(f"weight_scale must hold one scale per output channel ({weight.shape[0]}), got "
                         f"{_shape(weight_scale)}")
