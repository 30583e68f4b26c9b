"""The writer: shards + index round-trip bit-exactly, and publishing is all-or-nothing."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch

from squeeze.checkpoint import CheckpointReader, CheckpointWriter
from squeeze.checkpoint import writer as writer_mod
from squeeze.errors import SqueezeError
from squeeze.model.toy import write_random_toy
from tests.conftest import SMALL


def _copy(src: CheckpointReader, out: Path) -> None:
    """Copy shard by shard: what a user does to re-publish a checkpoint unchanged."""
    with CheckpointWriter(out, max_shard_bytes=2**40) as w:
        for shard in src.shard_files:
            w.add_many(src.read_raw(src.names_in_shard(shard)))
            w.flush()
        w.set_config(src.config.to_dict())


@pytest.mark.parametrize("fp8", [False, True])
def test_round_trip_is_bit_exact(tmp_path: Path, fp8: bool) -> None:
    write_random_toy(tmp_path / "a", SMALL, fp8=fp8, max_shard_bytes=50_000)
    a = CheckpointReader(tmp_path / "a")
    assert len(set(a.weight_map.values())) > 2  # really sharded
    _copy(a, tmp_path / "b")
    b = CheckpointReader(tmp_path / "b")
    assert a.weight_map == b.weight_map
    ta, tb = a.read_raw(a.raw_names), b.read_raw(b.raw_names)
    for name in a.raw_names:
        assert ta[name].dtype == tb[name].dtype
        assert torch.equal(ta[name].view(torch.uint8), tb[name].view(torch.uint8)), name
    # Same sharding, same bytes: every file of the copy is identical to the original.
    for f in sorted(p.name for p in (tmp_path / "a").iterdir()):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    index = json.loads((tmp_path / "b" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tb.values())


def test_failure_midway_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"), CheckpointWriter(out, max_shard_bytes=1000) as w:
        for i in range(10):
            w.add(f"t{i}", torch.randn(100, 10))  # several shards already on disk
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_midway_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt), CheckpointWriter(tmp_path / "out", max_shard_bytes=1000) as w:
        w.add("t", torch.randn(1000))
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_disk_full_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer_mod, "save_file", full)
    with pytest.raises(SqueezeError, match="disk full"), CheckpointWriter(tmp_path / "out") as w:
        w.add("t", torch.randn(10))
        w.set_config({"model_type": "deepseek_v3"})
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_refused_and_overwrite_replaces(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(SqueezeError, match="already exists"):
        CheckpointWriter(out)
    assert (out / "keep").exists()
    with CheckpointWriter(out, overwrite=True) as w:
        w.add("t", torch.ones(3))
        w.set_config({"model_type": "deepseek_v3"})
    assert not (out / "keep").exists()
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "model-00001-of-00001.safetensors", "model.safetensors.index.json"]


def _mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """Address ranges of this process's memory maps of `path` (from /proc/self/maps)."""
    out = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and Path(parts[5]) == path.resolve():
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            out.append((lo, hi))
    return out


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc to see file mappings")
def test_read_returns_tensors_that_own_their_memory(tmp_path: Path) -> None:
    """A tensor read in its stored dtype must not be a view of safetensors' file mapping: a view keeps every
    page read so far resident while it lives (the quantize pipeline kept one fp32 router bias per layer and
    its resident set grew by a layer of bf16 weights per layer)."""
    write_random_toy(tmp_path / "a", SMALL)
    r = CheckpointReader(tmp_path / "a")
    shard = tmp_path / "a" / r.shard_files[0]
    for dtype in (torch.bfloat16, torch.float32):
        got = r.read(r.names_in_shard(r.shard_files[0]), dtype)
        assert any(r.stored_dtype(n) == ("BF16" if dtype == torch.bfloat16 else "F32") for n in got)
        live = _mapped_ranges(shard)  # mappings still alive after the read: only views could hold them
        for name, t in got.items():
            assert t.dtype == dtype
            assert not any(lo <= t.data_ptr() < hi for lo, hi in live), (name, dtype)
