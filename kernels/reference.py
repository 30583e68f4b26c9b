"""Plain-torch references for every kernel in this package.

They define the math (the kernels must match them to rounding) and are what the public API runs on
non-CUDA tensors. Written for clarity: fp32 (or fp64 where fp32 would not be exact) throughout, one
step per line, no fusion.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .packing import unpack_int4

FP8_BLOCK = 128
FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT8_MAX = 127.0


def resolve_group(group_size: int, k: int) -> int:
    """``-1`` (per-channel) means one group spanning the whole row."""
    if group_size == -1:
        return k
    if group_size <= 0 or k % group_size:
        raise ValueError(f"group_size {group_size} must be -1 or a positive divisor of K={k}")
    return group_size


def dequantize_weight(
    weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, group_size: int
) -> torch.Tensor:
    """fp32 [N, K] from packed int4 (int32 [N, K//8]) or int8 [N, K] weights: w = (q - zp) * scale."""
    q = unpack_int4(weight) if weight.dtype == torch.int32 else weight
    g = resolve_group(group_size, q.shape[-1])
    q = q.float()
    if zero_point is not None:
        q = q - zero_point.float().repeat_interleave(g, dim=-1)
    return q * scale.float().repeat_interleave(g, dim=-1)


def linear_wq_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    group_size: int,
) -> torch.Tensor:
    """W4A16 / W8A16: y = x @ dequant(W).T, fp32 accumulation, output in x's dtype."""
    w = dequantize_weight(weight, scale, zero_point, group_size)
    return (x.float() @ w.T).to(x.dtype)


def _true_div(a: torch.Tensor, b: float) -> torch.Tensor:
    """IEEE a / b. On CUDA, torch divides by a Python scalar as a * (1 / b), which is off by an ulp
    now and then; the kernels divide exactly (div_rn), and a 1-ulp scale moves rounding ties."""
    return a / torch.full_like(a, b)


def quant_fp8_act_ref(x: torch.Tensor, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 activation quantization: one fp32 scale per token per 128-wide K block.

    Returns (fp8 [M, K], scales fp32 [M, ceil(K / block)]) with x ~= q * scale.
    """
    m, k = x.shape
    kb = -(-k // block)
    xp = F.pad(x.float(), (0, kb * block - k)).view(m, kb, block)
    amax = xp.abs().amax(dim=-1).clamp(min=1e-12)
    s = _true_div(amax, FP8_MAX)
    q = (xp / s.unsqueeze(-1)).to(torch.float8_e4m3fn).view(m, kb * block)[:, :k]
    return q, s


def dequantize_fp8_block(w: torch.Tensor, scale_inv: torch.Tensor, block: int = FP8_BLOCK) -> torch.Tensor:
    """fp32 [N, K] from float8 weights and their [ceil(N/128), ceil(K/128)] block scales."""
    n, k = w.shape
    s = scale_inv.float().repeat_interleave(block, 0)[:n].repeat_interleave(block, 1)[:, :k]
    return w.float() * s


def linear_fp8_block_ref(
    x: torch.Tensor, w: torch.Tensor, scale_inv: torch.Tensor, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Block-FP8 linear including the on-the-fly 1x128 activation quantization."""
    q, s = quant_fp8_act_ref(x)
    xd = q.float() * s.repeat_interleave(FP8_BLOCK, 1)[:, : x.shape[1]]
    return (xd @ dequantize_fp8_block(w, scale_inv).T).to(out_dtype or x.dtype)


def round_half_away(y: torch.Tensor) -> torch.Tensor:
    """Round half away from zero (what the int8 quant kernel does; torch.round is half-to-even)."""
    return torch.trunc(y + 0.5 * torch.sign(y))


def quant_int8_act_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric per-token int8 quantization: (int8 [M, K], fp32 scales [M])."""
    xf = x.float()
    s = _true_div(xf.abs().amax(dim=-1).clamp(min=1e-12), INT8_MAX)
    q = round_half_away(xf / s[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, s


def linear_w8a8_ref(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """W8A8-INT8: exact integer GEMM (fp64 holds int32 sums exactly), then both scales."""
    q, s = quant_int8_act_ref(x)
    acc = q.double() @ w.double().T
    return (acc * s.double()[:, None] * w_scale.double().reshape(1, -1)).to(x.dtype)


def expert_linear_ref(
    x: torch.Tensor,
    w: torch.Tensor,
    scale: torch.Tensor | None,
    zero_point: torch.Tensor | None,
    group_size: int,
) -> torch.Tensor:
    """One expert's projection in fp32 for whichever weight format ``w`` is in."""
    if w.dtype == torch.float8_e4m3fn:
        return linear_fp8_block_ref(x, w, scale, out_dtype=torch.float32)
    if w.dtype in (torch.int32, torch.int8):
        return x.float() @ dequantize_weight(w, scale, zero_point, group_size).T
    return x.float() @ w.float().T


def _at(t: torch.Tensor | None, e: int) -> torch.Tensor | None:
    return None if t is None else t[e]


def moe_experts_ref(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    w13_zero_point: torch.Tensor | None = None,
    w2_zero_point: torch.Tensor | None = None,
    group_size: int = 128,
) -> torch.Tensor:
    """Routed-expert MLP, one expert at a time (the HF DeepSeek-V3 ``moe_infer`` loop).

    w13 is [E, 2I, H] (gate rows, then up rows), w2 is [E, H, I]; bf16/fp16, packed int4 (int32,
    last dim / 8, with per-row group scales) or float8 with 128x128 block scales, where w13's scale
    is gate's and up's [ceil(I/128), ceil(H/128)] grids stacked along dim 1. The intermediate
    silu(gate) * up is rounded to x's dtype, as the kernel stores it, before the down projection.
    """
    t, k = topk_ids.shape
    inter = w2.shape[2] * (8 if w2.dtype == torch.int32 else 1)
    srow = -(-inter // FP8_BLOCK) if w13.dtype == torch.float8_e4m3fn else inter
    out = torch.zeros(t, w2.shape[1], dtype=torch.float32, device=x.device)
    flat = topk_ids.reshape(-1)
    for e in torch.unique(flat).tolist():
        rows = (flat == e).nonzero().squeeze(1)
        tok = rows // k
        s13, z13 = _at(w13_scale, e), _at(w13_zero_point, e)
        gate = expert_linear_ref(x[tok], w13[e, :inter], _rows(s13, 0, srow), _rows(z13, 0, srow), group_size)
        up = expert_linear_ref(
            x[tok], w13[e, inter:], _rows(s13, srow, None), _rows(z13, srow, None), group_size
        )
        h = (F.silu(gate) * up).to(x.dtype)
        y = expert_linear_ref(h, w2[e], _at(w2_scale, e), _at(w2_zero_point, e), group_size)
        out.index_add_(0, tok, y * topk_weights.reshape(-1)[rows, None].float())
    return out.to(x.dtype)


def _rows(t: torch.Tensor | None, start: int, stop: int | None) -> torch.Tensor | None:
    return None if t is None else t[start:stop]
