"""Observers and the quantize / dequantize arithmetic every method shares.

Conventions follow compressed-tensors so that our tensors are exactly what its compressors expect:
`q = clamp(round(x / s + z), qmin, qmax)`, `x̂ = (q - z) * s`; signed zero points; scales shaped
[N, 1] (channel), [N, K/g] (group) or [ceil(N/bn), ceil(K/bk)] (block). Scales are rounded to bf16
before use for integer schemes (the dtype they are stored in), so that the fake-quantized weights used
for calibration and the CPU runtime are bit-identical to what the exported files decode to.
"""

from __future__ import annotations

import torch

from squeeze.checkpoint.fp8 import FP8_DTYPE, FP8_MAX
from squeeze.errors import SqueezeError
from squeeze.quant.scheme import QuantArgs

SCALE_DTYPE = torch.bfloat16
_EPS = 1e-10


def check_shape(weight_shape: tuple[int, ...], args: QuantArgs, name: str = "weight") -> None:
    """Raise a clear error when a scheme cannot apply to a weight (e.g. group size not dividing K)."""
    k = weight_shape[-1]
    if args.strategy == "group" and k % int(args.group_size or 1) != 0:
        raise SqueezeError(f"group size {args.group_size} does not divide the input dimension {k} of {name}")


def minmax_qparams(x: torch.Tensor, args: QuantArgs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point from min/max over the last dim of `x` (keepdim), for one group/channel/token."""
    x = x.float()
    if args.type == "float":  # fp32 scales: DeepSeek's weight_scale_inv is fp32, and exact amax/448
        amax = x.abs().amax(dim=-1, keepdim=True)
        return torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax)), None
    if args.symmetric:
        amax = x.abs().amax(dim=-1, keepdim=True)
        scale = (amax / ((args.qmax - args.qmin) / 2)).clamp_min(_EPS)
        return _round_scale(scale), None
    lo = x.amin(dim=-1, keepdim=True).clamp(max=0)
    hi = x.amax(dim=-1, keepdim=True).clamp(min=0)
    scale = _round_scale(((hi - lo) / (args.qmax - args.qmin)).clamp_min(_EPS))
    zp = torch.round(args.qmin - lo / scale).clamp(args.qmin, args.qmax)
    return scale, zp


def _round_scale(scale: torch.Tensor) -> torch.Tensor:
    return scale.to(SCALE_DTYPE).float().clamp_min(torch.finfo(SCALE_DTYPE).tiny)


def quantize(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None, args: QuantArgs) -> torch.Tensor:
    """Broadcastable quantization: int values (as float) or fp8-rounded values (as float) of x / s + z."""
    if args.type == "float":
        return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).float()
    z = 0.0 if zp is None else zp
    return torch.round(x / scale + z).clamp(args.qmin, args.qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None) -> torch.Tensor:
    return (q - (0.0 if zp is None else zp)) * scale


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None, args: QuantArgs) -> torch.Tensor:
    return dequantize(quantize(x, scale, zp, args), scale, zp)


# ---- whole weights ----------------------------------------------------------------------------------
def _grouped(w: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """View a [N, K] weight so that the last dim is one quantization unit."""
    n, k = w.shape
    if args.strategy == "group":
        return w.reshape(n, k // int(args.group_size or k), int(args.group_size or k))
    if args.strategy in ("channel", "token"):
        return w.reshape(n, 1, k)
    if args.strategy == "tensor":
        return w.reshape(1, 1, n * k)
    raise SqueezeError(f"strategy {args.strategy} has no grouped view")


def _block_view(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
    n, k = w.shape
    bn, bk = block
    nb, kb = -(-n // bn), -(-k // bk)
    padded = torch.zeros(nb * bn, kb * bk, dtype=torch.float32)
    padded[:n, :k] = w
    return padded.view(nb, bn, kb, bk).permute(0, 2, 1, 3).reshape(nb, kb, bn * bk), (nb, kb)


def weight_qparams(w: torch.Tensor, args: QuantArgs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Observe a whole [N, K] weight: scales in compressed-tensors' shapes (see module docstring)."""
    check_shape(tuple(w.shape), args)
    if args.strategy == "block":
        blocks, (nb, kb) = _block_view(w.float(), args.block_structure or (128, 128))
        scale, zp = minmax_qparams(blocks, args)
        return scale.view(nb, kb), None if zp is None else zp.view(nb, kb)
    scale, zp = minmax_qparams(_grouped(w.float(), args), args)
    shape = (1, 1) if args.strategy == "tensor" else (w.shape[0], -1)
    return scale.reshape(shape), None if zp is None else zp.reshape(shape)


def expand_qparam(t: torch.Tensor, weight_shape: tuple[int, int], args: QuantArgs) -> torch.Tensor:
    """Broadcast stored scales / zero points to the weight's [N, K]."""
    n, k = weight_shape
    if args.strategy == "block":
        bn, bk = args.block_structure or (128, 128)
        return t.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    if args.strategy == "group":
        return t.repeat_interleave(int(args.group_size or k), dim=1)
    return t.expand(n, k)


def quantize_weight(w: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None, args: QuantArgs) -> torch.Tensor:
    """Integer (or fp8-valued) weight, as float, for given qparams."""
    shape = tuple(w.shape)
    return quantize(w.float(), expand_qparam(scale, shape, args),
                    None if zp is None else expand_qparam(zp, shape, args), args)


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None, args: QuantArgs) -> torch.Tensor:
    shape = tuple(q.shape)
    return dequantize(q.float(), expand_qparam(scale, shape, args),
                      None if zp is None else expand_qparam(zp, shape, args))


# ---- activations (dynamic) --------------------------------------------------------------------------
def fake_quantize_activations(x: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """Dynamic activation quant-dequant: per token, or per 1xG group (DeepSeek's 1x128 FP8)."""
    shape = x.shape
    if args.strategy == "group":
        # a K that is not a multiple of G gets a short last group (zero padding leaves its amax as is),
        # as DeepSeek FP8 checkpoints have partial 128-blocks on such dimensions
        g = int(args.group_size or shape[-1])
        pad = -shape[-1] % g
        if pad:
            padded = torch.nn.functional.pad(x, (0, pad))
            return fake_quantize_activations(padded, args)[..., : shape[-1]]
        v = x.reshape(-1, shape[-1] // g, g)
    elif args.strategy == "tensor":
        v = x.reshape(1, -1)
    else:
        v = x.reshape(-1, shape[-1])
    v = v.float()
    if args.type == "float" or not args.symmetric:
        scale, zp = minmax_qparams(v, args)
        return fake_quantize(v, scale, zp, args).reshape(shape).to(x.dtype)
    # symmetric int: what W8A8 kernels do at run time (vLLM, squeeze.kernels): fp32 scale = amax / qmax,
    # round half away from zero, no clamp needed
    amax = v.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / args.qmax, torch.ones_like(amax))
    q = torch.sign(v) * torch.floor((v / scale).abs() + 0.5)
    return (q * scale).reshape(shape).to(x.dtype)
