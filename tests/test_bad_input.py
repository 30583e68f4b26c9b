"""Bad input gives one clear error line, a non-zero exit, no traceback, and no partial output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from squeeze.model.toy import make_toy
from tests.conftest import SMALL


def squeeze(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "squeeze.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    out = tmp_path / "m"
    make_toy(out, SMALL, max_shard_bytes=64 * 1024)
    return out


def _edit_config(ckpt: Path, **changes: object) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k)
        else:
            cfg[k] = v
    (ckpt / "config.json").write_text(json.dumps(cfg))


def _shard(ckpt: Path, i: int) -> Path:
    shards = sorted(ckpt.glob("model-*.safetensors"))
    assert len(shards) >= 3
    return shards[i]


def test_missing_shard(ckpt: Path) -> None:
    shard = _shard(ckpt, 1)
    shard.unlink()
    assert_one_line_error(squeeze("inspect", ckpt), f"missing shard {shard.name}")


def test_truncated_shard(ckpt: Path) -> None:
    shard = _shard(ckpt, 2)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    assert_one_line_error(squeeze("perplexity", ckpt), "corrupt or truncated", shard.name)


def test_corrupt_header(ckpt: Path) -> None:
    shard = _shard(ckpt, 0)
    data = bytearray(shard.read_bytes())
    data[8:40] = b"\x00garbage{not json" + bytes(15)
    shard.write_bytes(bytes(data))
    assert_one_line_error(squeeze("inspect", ckpt), "corrupt or truncated")


def test_config_missing_field(ckpt: Path) -> None:
    _edit_config(ckpt, kv_lora_rank=None)
    assert_one_line_error(squeeze("inspect", ckpt), "missing field kv_lora_rank")


def test_unknown_model_type(ckpt: Path) -> None:
    _edit_config(ckpt, model_type="llama")
    assert_one_line_error(squeeze("inspect", ckpt), "unsupported model_type 'llama'")


def test_shape_disagrees_with_config(ckpt: Path) -> None:
    _edit_config(ckpt, moe_intermediate_size=SMALL.moe_inter * 2)
    proc = squeeze("perplexity", ckpt)
    assert_one_line_error(proc, "has shape", "config.json implies")


def test_missing_checkpoint_dir(tmp_path: Path) -> None:
    assert_one_line_error(squeeze("inspect", tmp_path / "nope"), "not found")


def test_existing_output_dir(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    assert_one_line_error(squeeze("toy", tmp_path / "out"), "already exists")


def test_ctrl_c_while_training_leaves_nothing(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "squeeze.cli", "toy", str(tmp_path / "toy"), "--train-steps",
                             "100000", "--layers", "2", "--hidden", "64", "--vocab", "512"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(10)  # imports, tokenizer training, then the training loop is under way
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert os.listdir(tmp_path) == []
