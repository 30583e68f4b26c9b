"""W4A16 / W8A16 dequant-GEMM against the torch reference (and compressed-tensors' packing)."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from squeeze.kernels import _tuning, dequantize_weight, gemv, linear_w4a16, linear_w8a16, pack_int4, w4a16
from squeeze.kernels._overlap import chunk_bounds
from squeeze.kernels.reference import linear_wq_ref
from squeeze.kernels.w4a16 import WqConfig, dequantize_to, launch_wq
from tests.conftest_kernels import DEVICE, TOL, poisoned, rand_scale, randint, randn, rel_err

# (M, N, K, group, zero point, dtype, bits): M=1 and M>1, N and K on and off the block sizes.
CASES = [
    (1, 40, 256, 128, False, torch.bfloat16, 4),
    (1, 72, 200, -1, True, torch.float16, 4),
    (7, 96, 256, 64, True, torch.bfloat16, 4),
    (33, 50, 128, 32, False, torch.bfloat16, 4),
    (3, 64, 192, 32, True, torch.bfloat16, 8),
    (18, 24, 136, -1, False, torch.float16, 8),
]


def make(m: int, n: int, k: int, group: int, zp: bool, dtype: torch.dtype, bits: int, seed: int = 0):
    groups = 1 if group == -1 else k // group
    q = randint(-8, 8, n, k, seed=seed + 1) if bits == 4 else randint(-128, 128, n, k, seed=seed + 1)
    w = pack_int4(q) if bits == 4 else q
    scale = rand_scale(n, groups, dtype=dtype, seed=seed + 2)
    zero = randint(-3, 4, n, groups, seed=seed + 3) if zp else None
    return randn(m, k, dtype=dtype, seed=seed), w, scale, zero


def case_id(c: tuple) -> str:
    return "M{}_N{}_K{}_g{}_zp{}_{}_int{}".format(*c[:5], str(c[5]).removeprefix("torch."), c[6])


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_linear_matches_reference(case) -> None:
    m, n, k, group, zp, dtype, bits = case
    x, w, scale, zero = make(*case)
    ref = linear_wq_ref(x.cpu(), w.cpu(), scale.cpu(), None if zero is None else zero.cpu(), group)
    fn = linear_w4a16 if bits == 4 else linear_w8a16
    out = fn(x, w, scale, zero, group, backend="triton")
    assert out.shape == (m, n) and out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize(
    "cfg",
    [
        WqConfig(16, 32, 32, 4, 1, split_k=3),
        WqConfig(32, 64, 64, 4, 1),
        WqConfig(16, 32, 64, 4, 1, unpack=1),
        WqConfig(16, 64, 128, 4, 1, split_k=2, unpack=2),
        WqConfig(16, 64, 128, 4, 1, split_k=2, unpack=3),
        WqConfig(16, 32, 64, 4, 1, unpack=3, tma=True),
        WqConfig(dequant_cublas=True),
        WqConfig(1, 32, 128, 4, 3, split_k=3, gemv=True, ng=1),
        WqConfig(1, 16, 128, 4, 2, split_k=2, gemv=True, ng=2),
        WqConfig(16, 32, 32, 4, 1, split_k=2, prefetch=True),
        WqConfig(dequant_cublas=True, chunks=3),
        WqConfig(dequant_cublas=True, chunks=4, first_div=2, contig_out=True),
        WqConfig(dequant_cublas=True, chunks=2, carveout=8, prio=2, dq_block_n=32, dq_warps=2),
    ],
    ids=["splitk3", "bm32_bn64", "join_unpack", "permuted_k_splitk2", "planes_splitk2",
         "planes_bk64_tma", "dequant_then_matmul", "gemv_splitk3",
         "gemv_splitk2", "prefetch_splitk2", "overlap3", "overlap4_first_half_contig",
         "overlap2_dq32"],
)
@pytest.mark.parametrize("m,group,k", [(1, 128, 512), (37, 64, 512), (3, -1, 200)])
def test_every_strategy_writes_every_element(cfg: WqConfig, m: int, group: int, k: int) -> None:
    x, w, scale, zero = make(m, 80, k, group, True, torch.bfloat16, 4, seed=m)
    out = launch_wq(x, w, scale, zero, group, cfg, out=poisoned(m, 80, dtype=torch.bfloat16))
    ref = linear_wq_ref(x.cpu(), w.cpu(), scale.cpu(), zero.cpu(), group)
    assert rel_err(out, ref) < TOL[torch.bfloat16]


@pytest.mark.parametrize(
    "dtype,zp,group,k",
    [(torch.float16, True, 128, 384), (torch.float16, False, -1, 200), (torch.bfloat16, True, 64, 448),
     (torch.bfloat16, False, 192, 384)],
)
def test_plane_kernel(dtype: torch.dtype, zp: bool, group: int, k: int) -> None:
    """_w4_planes_kernel (16-bit words, x in plane order) for both float dtypes, K off the block size; with
    128-wide blocks asked for, 192-wide groups run 64-wide blocks, three to a group."""
    x, w, scale, zero = make(9, 48, k, group, zp, dtype, 4, seed=k)
    x = x * 3.0  # values far from 1 so an offset error shows
    cfg = WqConfig(16, 32, 128, 4, 1, split_k=2, unpack=3, tma=k % 32 == 0)
    out = launch_wq(x, w, scale, zero, group, cfg, out=poisoned(9, 48, dtype=dtype))
    ref = linear_wq_ref(x.cpu(), w.cpu(), scale.cpu(), None if zero is None else zero.cpu(), group)
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize(
    "n,k,group,zp,dtype,ng,split",
    [
        (80, 512, 128, True, torch.bfloat16, 4, 0),
        (72, 384, -1, False, torch.float16, 2, 0),  # per channel, last step half full
        (50, 384, 32, True, torch.bfloat16, 2, 2),  # small groups, split-K
        (40, 1280, 128, False, torch.bfloat16, 4, 0),  # last step half full (TMA zero-fills past K)
        (33, 1024, 64, False, torch.float16, 1, 3),
        (24, 1024, 256, True, torch.bfloat16, 4, 0),  # two sub-blocks per scale group
    ],
)
def test_phase_gemv(n: int, k: int, group: int, zp: bool, dtype: torch.dtype, ng: int, split: int) -> None:
    """The M = 1 nibble-phase GEMV (gemv.w4_gemv_tma_kernel) on random data, N and K off its blocks."""
    x, w, scale, zero = make(1, n, k, group, zp, dtype, 4, seed=n)
    x = x * 3.0  # values far from 1 so an offset error shows
    assert w4a16._gemv_tma_ok(w, group)
    cfg = WqConfig(1, 16, 128, 4, 3, split_k=split, gemv=True, ng=ng)
    out = launch_wq(x, w, scale, zero, group, cfg, out=poisoned(1, n, dtype=dtype))
    ref = linear_wq_ref(x.cpu(), w.cpu(), scale.cpu(), None if zero is None else zero.cpu(), group)
    assert rel_err(out, ref) < TOL[dtype]


@triton.jit
def _nibbles_kernel(w_ptr, out_ptr, N: tl.constexpr, MASK_EVEN, MASK_ODD, MAGIC):
    p = tl.load(w_ptr + tl.arange(0, N))
    for i in tl.static_range(8):
        tl.store(out_ptr + i * N + tl.arange(0, N), gemv._nibble(p, i, MASK_EVEN, MASK_ODD, MAGIC))


def test_nibble_floats_are_exact() -> None:
    """gemv._nibble turns nibble i of a word into exactly 16 + u / c_i (c_i = 8 even, 128 odd), for
    every nibble value at every position (words with the sign bit set included), as x_phase_kernel's
    pre-scaling and offsets assume."""
    words = randint(-(2**31), 2**31 - 1, 256, dtype=torch.int32, seed=5)
    words[:16] = torch.arange(16, dtype=torch.int32) * 0x11111111  # all nibbles u, for each u
    out = torch.empty(8, 256, dtype=torch.float32, device=DEVICE)
    _nibbles_kernel[(1,)](words, out, 256, *w4a16._NIBBLE_BITS)
    u = torch.stack([(words.cpu().long() >> (4 * i)) & 0xF for i in range(8)]).double()
    c = torch.tensor([8.0 if i % 2 == 0 else 128.0 for i in range(8)], dtype=torch.float64)[:, None]
    assert torch.equal(out.double().cpu(), 16 + u / c)


@pytest.mark.parametrize("k,group,sliced", [(200, -1, False), (512, 16, False), (512, 128, True)])
def test_gemv_falls_back_where_tma_cannot_describe_the_weight(k: int, group: int, sliced: bool) -> None:
    """Per-channel K off 128 values, 16-value groups (8-byte boxes) and a weight view whose base is not
    16-byte aligned must not reach the TMA GEMV; the GEMV config then runs the MMA kernel, exactly."""
    x, w, scale, zero = make(1, 40, k, group, True, torch.bfloat16, 4, seed=k)
    if sliced:  # a view starting one word into a wider packed tensor: base 4 bytes off alignment
        wide = torch.cat([w[:, :1], w], dim=1)
        w = wide[:, 1:]
    assert not w4a16._gemv_tma_ok(w, group)
    cfg = WqConfig(1, 16, 128, 4, 3, gemv=True, ng=2)
    out = launch_wq(x, w, scale, zero, group, cfg, out=poisoned(1, 40, dtype=torch.bfloat16))
    ref = linear_wq_ref(x.cpu(), w.cpu().contiguous(), scale.cpu(), zero.cpu(), group)
    assert rel_err(out, ref) < TOL[torch.bfloat16]


@pytest.mark.parametrize("bits,zp", [(4, True), (4, False), (8, True)])
def test_dequantize_kernel_exact(bits: int, zp: bool) -> None:
    _, w, scale, zero = make(1, 48, 192, 64, zp, torch.float32, bits, seed=7)
    out = dequantize_to(w, scale, zero, 64, torch.float32)
    assert rel_err(out, dequantize_weight(w.cpu(), scale.cpu(), None if zero is None else zero.cpu(), 64)) < 1e-6


def test_batched_input_and_torch_backend() -> None:
    x, w, scale, zero = make(6, 40, 256, 128, True, torch.bfloat16, 4, seed=3)
    x3 = x.reshape(2, 3, 256)
    fast = linear_w4a16(x3, w, scale, zero, 128, backend="triton")
    slow = linear_w4a16(x3, w, scale, zero, 128, backend="torch")
    assert fast.shape == slow.shape == (2, 3, 40)
    assert rel_err(fast, slow) < TOL[torch.bfloat16]


def test_auto_backend_uses_reference_on_cpu() -> None:
    x, w, scale, _ = make(2, 16, 64, 32, False, torch.bfloat16, 4, seed=4)
    out = linear_w4a16(x.cpu(), w.cpu(), scale.cpu(), None, 32)
    assert torch.equal(out, linear_wq_ref(x.cpu(), w.cpu(), scale.cpu(), None, 32))
    assert DEVICE.type in ("cpu", "cuda")


@pytest.mark.parametrize(
    "n,chunks,first_div,align,want",
    [
        (80, 3, 1, 16, [(0, 32), (32, 48), (48, 80)]),
        (80, 4, 2, 16, [(0, 16), (16, 32), (32, 64), (64, 80)]),
        (18432, 4, 1, 128, [(0, 4608), (4608, 9216), (9216, 13824), (13824, 18432)]),
        (2048, 8, 2, 128, None),
        (100, 4, 1, 128, [(0, 100)]),  # too small to cut at the alignment: one chunk
        (300, 6, 1, 128, [(0, 128), (128, 256), (256, 300)]),
    ],
)
def test_chunk_bounds(n: int, chunks: int, first_div: int, align: int, want) -> None:
    got = chunk_bounds(n, chunks, first_div, align)
    if want is not None:
        assert got == want
    assert got[0][0] == 0 and got[-1][1] == n and len(got) <= chunks
    assert all(a < b and b == c for (a, b), (c, _) in zip(got, got[1:] + [(n, n)], strict=True))
    assert all(b % align == 0 for _, b in got[:-1])
    if first_div > 1 and len(got) > 2:
        assert got[0][1] - got[0][0] <= got[1][1] - got[1][0]


@pytest.mark.parametrize("chunks,first_div,bits", [(2, 1, 4), (5, 2, 4), (3, 1, 8)])
def test_overlapped_path_zero_point_fp16(chunks: int, first_div: int, bits: int) -> None:
    """Chunked dequant + matmul (streams only on CUDA) with zero points, fp16, M and N off the blocks."""
    x, w, scale, zero = make(19, 272, 256, 64, True, torch.float16, bits, seed=11)
    cfg = WqConfig(dequant_cublas=True, chunks=chunks, first_div=first_div)
    out = launch_wq(x, w, scale, zero, 64, cfg, out=poisoned(19, 272, dtype=torch.float16))
    ref = linear_wq_ref(x.cpu(), w.cpu(), scale.cpu(), zero.cpu(), 64)
    assert rel_err(out, ref) < TOL[torch.float16]


def test_tuner_skips_candidates_that_fail_the_check(monkeypatch) -> None:
    """The fastest candidate is not picked when its output is wrong; none passing keeps the first."""
    monkeypatch.setattr(_tuning, "_time", lambda fn, extra=(): fn())
    times = {"a": 3.0, "b": 1.0, "c": 2.0}
    pick = lambda key, check: _tuning.pick(key, lambda: list(times), times.__getitem__, True, check)  # noqa: E731
    assert pick(("test-tuner", 1), lambda c: c != "b") == "c"
    assert pick(("test-tuner", 2), None) == "b"
    with pytest.warns(RuntimeWarning, match="no candidate"):
        assert pick(("test-tuner", 3), lambda c: False) == "a"
    assert _tuning.timings()[("test-tuner", 1)][1] == ("b", float("inf"), False)


@pytest.mark.parametrize("m", [1, 16, 40])
def test_tuner_check_accepts_right_and_rejects_wrong_outputs(m: int, monkeypatch) -> None:
    """The tuner's reference check passes a correct launch at any M (it raised for M < 16, so every
    decode candidate was rejected and the first one kept) and fails one that leaves rows unwritten."""
    x, w, scale, zero = make(m, 48, 256, 128, True, torch.bfloat16, 4, seed=m)
    check = w4a16._checker(x, w, scale, zero, 128)
    cfg = WqConfig(1, 16, 128, 4, 3, gemv=True, ng=2) if m == 1 else WqConfig(16, 32, 128, 4, 1)
    assert check(cfg)
    real = w4a16.launch_wq

    def last_row_missed(x, *args, out=None):
        real(x, *args, out=out)
        out[-1, :] = float("nan")

    monkeypatch.setattr(w4a16, "launch_wq", last_row_missed)
    assert not check(cfg)


def test_tuner_times_each_candidate_on_the_cold_copies_too(monkeypatch) -> None:
    """``cold`` launchers (other weight copies) are built once per tuned key and timed with the candidate
    they are given, alongside the main launch."""
    monkeypatch.setattr(_tuning, "_time", lambda fn, extra=(): fn() + sum(f() for f in extra))
    times = {"a": 3.0, "b": 1.0, "c": 2.0}
    built = []

    def cold():
        built.append(1)
        return [lambda c: {"a": 0.0, "b": 100.0, "c": 0.0}[c], lambda c: {"a": 0.0, "b": 0.0, "c": 0.5}[c]]

    assert _tuning.pick(("test-tuner-cold", 1), lambda: list(times), times.__getitem__, True, None, cold) == "c"
    assert [t for _, t, _ in _tuning.timings()[("test-tuner-cold", 1)]] == [3.0, 101.0, 2.5]
    assert _tuning.pick(("test-tuner-cold", 1), lambda: list(times), times.__getitem__, True, None, cold) == "c"
    assert len(built) == 1


def test_tuner_builds_the_candidate_list_only_on_a_miss(monkeypatch) -> None:
    """A tuned key answers from the cache without calling the candidate factory: building the configs
    per call was ~40 us of host time per eager W4A16 decode call."""
    monkeypatch.setattr(_tuning, "_time", lambda fn, extra=(): fn())
    times = {"a": 3.0, "b": 1.0}
    built = []

    def cands() -> list[str]:
        built.append(1)
        return list(times)

    for _ in range(3):
        assert _tuning.pick(("test-tuner-lazy", 1), cands, times.__getitem__, True) == "b"
    assert len(built) == 1
