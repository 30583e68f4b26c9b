"""QAT: the fake-quantized student starts at its PTQ numbers, trains, lowers perplexity, exports like PTQ."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from squeeze import api
from squeeze.checkpoint import CheckpointReader
from squeeze.cli import app
from squeeze.data import load_text, token_windows
from squeeze.errors import SqueezeError
from squeeze.model.tokenizer import load_tokenizer
from squeeze.quant import qat as qat_mod
from squeeze.quant.qat import FakeQuantLinear
from squeeze.quant.rtn import rtn_quantize
from squeeze.quant.runtime import QuantizedRuntime
from squeeze.quant.scheme import preset
from squeeze.recipe import Calibration, Recipe, Rule, recipe_from_flags
from tests.test_quant_awq import one_thread  # noqa: F401 - autouse fixture

CAL = {"num_samples": 8, "seq_len": 128}


@pytest.mark.parametrize("scheme", [preset("W4A16").with_weights(num_bits=3, group_size=32),
                                    preset("W4A16_ASYM").with_weights(group_size=32), preset("W8A8_INT8")])
def test_fake_quant_linear_starts_at_ptq_and_exports_exactly(scheme) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    w = torch.randn(24, 64) * 0.1
    qw = rtn_quantize(w, scheme)
    fq = FakeQuantLinear(qw, None)
    assert torch.equal(fq.fake_weight(), qw.dequantize())
    x = torch.randn(5, 64)
    loss = fq(x).pow(2).sum()
    loss.backward()
    assert fq.weight.grad is not None and fq.weight.grad.abs().sum() > 0  # straight-through rounding
    assert fq.scale.grad is not None and fq.scale.grad.abs().sum() > 0  # learnable scales
    with torch.no_grad():
        fq.weight.add_(torch.randn_like(fq.weight) * 0.02)
        fq.scale.mul_(1.03)
    exported = fq.export()
    assert torch.equal(exported.dequantize(), fq.fake_weight().detach())
    assert int(exported.q.int().abs().max()) <= 2 ** (scheme.weights.num_bits - 1)


def heldout_ppl(ckpt: Path, windows: torch.Tensor) -> float:
    total, count = QuantizedRuntime(ckpt).nll(windows, 12)
    return math.exp(total / count)


@pytest.mark.slow
def test_qat_closes_the_w3_gap(trained_toy: Path, tmp_path: Path) -> None:
    windows = token_windows(load_tokenizer(trained_toy).encode(load_text("corpus:heldout")).ids, 128, 24)
    api.quantize(trained_toy, tmp_path / "rtn", method="rtn", bits=3, group_size=128, **CAL)
    report = api.quantize(trained_toy, tmp_path / "qat", method="qat", bits=3, group_size=128, start="rtn",
                          steps=60, lr=1e-3, **CAL)
    base, start, qat = (heldout_ppl(p, windows) for p in (trained_toy, tmp_path / "rtn", tmp_path / "qat"))
    print(f"W3 g128: base {base:.2f}, RTN {start:.2f}, QAT {qat:.2f}; loss {report.qat}")
    assert start > base * 1.002  # there is a gap to close
    assert qat < start - 0.5 * (start - base)  # QAT closes at least half of it
    summary = json.loads((tmp_path / "qat" / "squeeze_quantize_summary.json").read_text())
    assert summary["qat"]["steps"] == 60 and summary["quantized_modules"] == report.quantized_modules > 0
    qc = json.loads((tmp_path / "qat" / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized" and next(iter(qc["config_groups"].values()))["weights"]["num_bits"] == 3


def test_cli_qat_gptq_start_and_readback(trained_toy: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli-qat"
    r = CliRunner().invoke(app, ["quantize", str(trained_toy), str(out), "--method", "qat", "--bits", "4",
                                 "--steps", "3", "--lr", "1e-4", "--start", "gptq", "--num-samples", "4",
                                 "--seq-len", "64"])
    assert r.exit_code == 0, r.output
    assert "qat: 3 steps from gptq" in r.output
    reader = CheckpointReader(out)
    name = "model.layers.2.mlp.experts.5.gate_proj"
    assert f"{name}.weight_packed" in reader.weight_map
    w = reader.read_one(f"{name}.weight")
    scale = reader.read_raw([f"{name}.weight_scale"])[f"{name}.weight_scale"].float()
    q = w.reshape(w.shape[0], -1, 128) / scale[..., None]
    assert torch.allclose(q, q.round(), atol=1e-3) and q.abs().max() <= 8
    assert "qat" in (out / "squeeze_recipe.yaml").read_text()
    # unquantized tensors are carried over: the router's weight and bias are there, in their dtypes
    assert reader.stored_dtype("model.layers.1.mlp.gate.e_score_correction_bias") == "F32"


def test_qat_bad_input(trained_toy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "never"
    with pytest.raises(SqueezeError, match="apply to --method qat only"):
        recipe_from_flags("gptq", 4, steps=10)
    with pytest.raises(SqueezeError, match="start must be"):
        api.quantize(trained_toy, out, method="qat", bits=4, start="qat")
    with pytest.raises(SqueezeError, match="lr must be"):
        api.quantize(trained_toy, out, method="qat", bits=4, lr=-1.0)
    mixed = Recipe([Rule(["self_attn"], preset("W4A16"), "gptq"), Rule(["mlp"], preset("W4A16"), "qat")],
                   calibration=Calibration(num_samples=2, seq_len=32))
    with pytest.raises(SqueezeError, match="every rule"):
        qat_mod.quantize_qat(trained_toy, out, mixed)
    monkeypatch.setattr(qat_mod, "available_memory_bytes", lambda: 16 * 1024**2)
    with pytest.raises(SqueezeError, match="holds the whole model in memory"):
        api.quantize(trained_toy, out, method="qat", bits=4)
    assert not out.exists() and not list(tmp_path.glob(".never*"))


@pytest.mark.parametrize("name,method", [("w4a16-awq", "awq"), ("w8a8-smoothquant", "smoothquant"),
                                         ("w4a16-qat", "qat")])
def test_recipes_load_and_validate(name: str, method: str) -> None:
    from squeeze.quant.methods import get_method
    from squeeze.recipe import load_recipe

    rec = load_recipe(Path(__file__).parents[1] / "recipes" / f"{name}.yaml")
    assert [r.method for r in rec.rules] == [method]
    m = get_method(method, **rec.rules[0].params)  # every param is one the method knows, with a valid value
    if method == "qat":
        assert qat_mod.qat_settings(rec).start == "gptq" and m.steps > 0
