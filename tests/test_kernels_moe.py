"""Fused MoE expert GEMMs (bf16, int4, block-FP8 experts) against the per-expert reference loop."""

from __future__ import annotations

import pytest
import torch

from squeeze.kernels import moe_experts, pack_int4
from squeeze.kernels.fp8_block import quant_fp8_act
from squeeze.kernels.moe import ACT_FP8, ACT_PLANES, MoeConfig, launch_moe, max_blocks, moe_align, moe_prep
from squeeze.kernels.reference import moe_experts_ref
from squeeze.kernels.w4a16 import x_planes
from tests.conftest_kernels import DEVICE, TOL, gen, rand_scale, randint, randn, rel_err


def routing(t: int, e: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.stack([torch.randperm(e, generator=gen(seed + i))[:k] for i in range(t)])
    weights = torch.softmax(torch.randn(t, k, generator=gen(seed)), dim=-1)
    return ids.to(DEVICE), weights.to(DEVICE)


def experts(fmt: str, e: int, hidden: int, inter: int, group: int, zp: bool, seed: int = 0) -> dict:
    """Random expert weights in one format, as keyword arguments of moe_experts."""
    if fmt == "bf16":
        return dict(
            w13=randn(e, 2 * inter, hidden, seed=seed, std=0.05),
            w2=randn(e, hidden, inter, seed=seed + 1, std=0.05),
        )
    if fmt == "fp8":
        cdiv = lambda a: -(-a // 128)  # noqa: E731
        return dict(
            w13=randn(e, 2 * inter, hidden, dtype=torch.float32, seed=seed).to(torch.float8_e4m3fn),
            w2=randn(e, hidden, inter, dtype=torch.float32, seed=seed + 1).to(torch.float8_e4m3fn),
            w13_scale=rand_scale(e, 2 * cdiv(inter), cdiv(hidden), seed=seed + 2, lo=0.002),
            w2_scale=rand_scale(e, cdiv(hidden), cdiv(inter), seed=seed + 3, lo=0.002),
        )
    g13 = 1 if group == -1 else hidden // group
    g2 = 1 if group == -1 else inter // group
    out = dict(
        w13=pack_int4(randint(-8, 8, e, 2 * inter, hidden, seed=seed)),
        w2=pack_int4(randint(-8, 8, e, hidden, inter, seed=seed + 1)),
        w13_scale=rand_scale(e, 2 * inter, g13, dtype=torch.bfloat16, seed=seed + 2, lo=0.01),
        w2_scale=rand_scale(e, hidden, g2, dtype=torch.bfloat16, seed=seed + 3, lo=0.01),
        group_size=group,
    )
    if zp:
        out |= dict(w13_zero_point=randint(-2, 3, e, 2 * inter, g13, seed=seed + 4),
                    w2_zero_point=randint(-2, 3, e, hidden, g2, seed=seed + 5))
    return out


def cpu(d: dict) -> dict:
    return {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in d.items()}


@pytest.mark.parametrize("t,e,k,block_m,dtype", [(1, 6, 2, 16, torch.int64), (9, 5, 3, 16, torch.int32),
                                               (40, 8, 2, 16, torch.int64), (3, 256, 8, 32, torch.int32)])
def test_align_groups_every_slot_once(t: int, e: int, k: int, block_m: int, dtype: torch.dtype) -> None:
    """Router ids of either integer type (read as given, no conversion pass)."""
    ids, _ = routing(t, e, k, seed=t)
    ids = ids.to(dtype)
    sorted_ids, block_expert, npp = moe_align(ids, e, block_m)
    flat = ids.reshape(-1).cpu()
    sorted_ids, block_expert, n_padded = sorted_ids.cpu(), block_expert.cpu(), int(npp.item())
    assert sorted_ids.numel() == max_blocks(t * k, e, block_m) * block_m
    counts = torch.bincount(flat, minlength=e)
    assert n_padded == int(((counts + block_m - 1) // block_m * block_m).sum())
    used = sorted_ids[:n_padded]
    real = used[used < t * k]
    assert sorted(real.tolist()) == list(range(t * k))  # every (token, slot) exactly once
    assert (sorted_ids[n_padded:] == t * k).all()  # the rest is padding
    for b in range(n_padded // block_m):
        rows = used[b * block_m : (b + 1) * block_m]
        rows = rows[rows < t * k]
        assert (flat[rows.long()] == block_expert[b]).all()


@pytest.mark.parametrize("t,hidden,block_k", [(1, 200, 128), (5, 256, 64), (6, 130, 128)])
def test_prep_makes_the_same_activations_as_the_standalone_passes(t: int, hidden: int, block_k: int) -> None:
    """The prep launch's activation programs write exactly what x_planes / quant_fp8_act write (hidden sizes
    on and off the K blocks, row counts on and off the fp8 pass's 4-row programs), beside the same alignment."""
    ids, _ = routing(t, 7, 2, seed=t)
    x = randn(t, hidden, seed=t + 1)
    want_align = moe_align(ids, 7, 16)
    for act, (want_a, want_s) in ((ACT_PLANES, x_planes(x, block_k)), (ACT_FP8, quant_fp8_act(x))):
        align, a, a_s = moe_prep(ids, 7, 16, x, act, block_k if act == ACT_PLANES else 128)
        assert torch.equal(a.view(torch.uint8), want_a.view(torch.uint8)) and torch.equal(a_s, want_s)
        assert all(torch.equal(g, w) for g, w in zip(align, want_align, strict=True))


CASES = [
    ("bf16", 1, 128, 64, 6, 2, -1, False),
    ("bf16", 7, 96, 48, 5, 3, -1, False),
    ("int4", 1, 128, 64, 6, 2, 32, True),
    ("int4", 6, 256, 64, 8, 2, 64, False),
    ("int4", 5, 64, 40, 4, 2, -1, True),
    ("int4", 3, 384, 192, 4, 2, 192, False),  # groups wider than a 128 block but not a multiple of it
    ("fp8", 1, 128, 64, 6, 2, -1, False),
    ("fp8", 6, 256, 192, 4, 2, -1, False),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "{}_T{}_H{}_I{}_E{}_k{}_g{}_zp{}".format(*c))
def test_moe_matches_reference(case) -> None:
    fmt, t, hidden, inter, e, k, group, zp = case
    x = randn(t, hidden, seed=t)
    ids, weights = routing(t, e, k, seed=7 * t)
    w = experts(fmt, e, hidden, inter, group, zp, seed=t)
    out = moe_experts(x, ids, weights, backend="triton", **w)
    ref = moe_experts_ref(x.cpu(), ids.cpu(), weights.cpu(), **cpu(w))
    assert out.shape == (t, hidden) and out.dtype == x.dtype
    # fp8 re-quantizes the intermediate: a 1-ulp bf16 difference there (summation order) can flip
    # one fp8 rounding, a 6% change of that element, so its bound is looser by design.
    assert rel_err(out, ref) < (3e-2 if fmt == "fp8" else TOL[torch.bfloat16])


@pytest.mark.parametrize("case", [c for c in CASES if c[0] == "int4"],
                         ids=lambda c: "T{1}_H{2}_I{3}_g{6}_zp{7}".format(*c))
def test_int4_plane_mode(case) -> None:
    """Plane mode (16-bit words, activations and the intermediate in plane order), K on and off the block;
    words by TMA where a descriptor can view them (per-expert rows past N read the next expert: masked)."""
    _, t, hidden, inter, e, k, group, zp = case
    x = randn(t, hidden, seed=t) * 3.0  # far from 1, so an offset error shows
    ids, weights = routing(t, e, k, seed=7 * t)
    w = experts("int4", e, hidden, inter, group, zp, seed=t)
    out = launch_moe(x, ids, weights, w["w13"], w["w2"], w["w13_scale"], w["w2_scale"], w.get("w13_zero_point"),
                     w.get("w2_zero_point"), group, MoeConfig(16, 32, 4, 1, 3, tma=True))
    ref = moe_experts_ref(x.cpu(), ids.cpu(), weights.cpu(), **cpu(w))
    assert rel_err(out, ref) < TOL[torch.bfloat16]


@pytest.mark.parametrize("fmt,unpack", [("bf16", 0), ("int4", 0), ("int4", 1), ("int4", 2), ("int4", 3)])
def test_poisoned_scratch_is_fully_overwritten(fmt: str, unpack: int) -> None:
    t, hidden, inter, e, k = 4, 128, 64, 4, 2
    x = randn(t, hidden, seed=11)
    ids, weights = routing(t, e, k, seed=11)
    w = experts(fmt, e, hidden, inter, 64, False, seed=11)
    out = launch_moe(x, ids, weights, w["w13"], w["w2"], w.get("w13_scale"), w.get("w2_scale"), None, None,
                     w.get("group_size", 128), MoeConfig(16, 32, 4, 1, unpack), poison=float("nan"))
    assert rel_err(out, moe_experts_ref(x.cpu(), ids.cpu(), weights.cpu(), **cpu(w))) < TOL[torch.bfloat16]
