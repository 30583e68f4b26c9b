"""Rotary position embedding as DeepSeek uses it: interleaved pairs, optional YaRN scaling.

DeepSeek rotates consecutive pairs (x0, x1), (x2, x3), ... of the `qk_rope_head_dim` slice. We keep
that layout (the checkpoint's q_b_proj / kv_a_proj_with_mqa rows are trained for it). YaRN follows
the published formula: blend interpolated and extrapolated frequencies with a linear ramp between the
beta_fast / beta_slow correction dims, and scale the softmax by mscale².
"""

from __future__ import annotations

import math

import torch

from squeeze.checkpoint.config import ModelConfig


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def inverse_frequencies(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Per-pair inverse frequencies and the cos/sin amplitude (YaRN's attention factor)."""
    dim = config.qk_rope_head_dim
    base = config.rope_theta
    pos = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    rs = config.rope_scaling or {}
    if rs.get("type", rs.get("rope_type")) != "yarn":
        return 1.0 / pos, 1.0
    factor = float(rs["factor"])
    orig = float(rs["original_max_position_embeddings"])
    beta_fast, beta_slow = float(rs.get("beta_fast") or 32), float(rs.get("beta_slow") or 1)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos)) * (1 - extrapolation) + (1.0 / pos) * extrapolation
    mscale, mscale_all = rs.get("mscale"), rs.get("mscale_all_dim")
    if mscale and mscale_all:
        amplitude = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
    else:
        amplitude = _yarn_mscale(factor)
    return inv_freq, float(amplitude)


def softmax_scale(config: ModelConfig) -> float:
    """1/sqrt(d), times YaRN's mscale² when the checkpoint asks for it (DeepSeek-V3 does)."""
    scale = config.qk_head_dim**-0.5
    rs = config.rope_scaling or {}
    if rs.get("type", rs.get("rope_type")) == "yarn" and rs.get("mscale_all_dim"):
        m = _yarn_mscale(float(rs["factor"]), float(rs["mscale_all_dim"]))
        scale *= m * m
    return scale


class RotaryTable:
    """cos/sin for positions 0..n-1, grown on demand and shared by every layer of a model."""

    def __init__(self, config: ModelConfig) -> None:
        self.inv_freq, self.amplitude = inverse_frequencies(config)
        self._cos = torch.empty(0, self.inv_freq.numel())
        self._sin = torch.empty(0, self.inv_freq.numel())

    def get(self, start: int, length: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        end = start + length
        if self._cos.shape[0] < end:
            n = max(end, 2 * self._cos.shape[0], 256)
            freqs = torch.outer(torch.arange(n, dtype=torch.float32), self.inv_freq)
            self._cos, self._sin = freqs.cos() * self.amplitude, freqs.sin() * self.amplitude
        if self._cos.device != torch.device(device):
            self._cos, self._sin = self._cos.to(device), self._sin.to(device)
        return self._cos[start:end], self._sin[start:end]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of the last dim of x [..., T, d] by per-position angles [T, d/2]."""
    x1, x2 = x[..., 0::2].float(), x[..., 1::2].float()
    out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.flatten(-2).to(x.dtype)
