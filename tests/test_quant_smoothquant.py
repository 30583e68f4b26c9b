"""SmoothQuant: exact folding, outliers handled better than plain W8A8, the +GPTQ form, CLI and bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from squeeze.checkpoint import CheckpointReader
from squeeze.cli import app
from squeeze.data import load_text, token_windows
from squeeze.distill.models import load_causal_lm
from squeeze.errors import SqueezeError
from squeeze.model.decoder import build_layer
from squeeze.model.rope import RotaryTable
from squeeze.model.tokenizer import load_tokenizer
from squeeze.quant.calibration import LayerCalibration, Target
from squeeze.quant.folding import inject_outliers
from squeeze.quant.methods import get_method
from squeeze.quant.rtn import rtn_quantize
from squeeze.quant.runtime import QuantizedRuntime
from squeeze.quant.scheme import preset
from squeeze.quant.smoothquant import SmoothQuant, parse_alpha
from squeeze.recipe import recipe_from_flags
from tests.test_quant_awq import assert_same_function, fold_only, one_thread  # noqa: F401 - autouse fixture

RECIPES = Path(__file__).parents[1] / "recipes"
W8A8 = preset("W8A8_INT8")


@pytest.mark.parametrize("alpha", [0.5, "search"])
def test_smoothquant_folding_is_exact(small_ckpt: Path, alpha: float | str) -> None:
    ref, model = fold_only(small_ckpt, "smoothquant", bits=None, group_size=None, alpha=alpha, n_grid=4)
    assert_same_function(ref, model, ref.config.vocab_size, changed=alpha != "search")
    if alpha == "search":
        assert not torch.equal(ref.model.layers[1].post_attention_layernorm.weight,
                               model.model.layers[1].post_attention_layernorm.weight)


def test_alpha_validation() -> None:
    assert parse_alpha("search") is None and parse_alpha("0.75") == 0.75
    for bad in (1.5, -0.1, float("nan"), "strong"):
        with pytest.raises(SqueezeError, match="alpha"):
            get_method("smoothquant", alpha=bad)
    with pytest.raises(SqueezeError, match="--bits must be 8"):
        recipe_from_flags("smoothquant", 4)
    with pytest.raises(SqueezeError, match="weights must be"):
        get_method("smoothquant", weights="awq")


def outlier_layer_error(trained_toy: Path, method: str, alpha: float | str = 0.5) -> tuple[float, LayerCalibration,
                                                                                       torch.nn.Module, list]:
    """Relative output error of MoE layer 1 of the trained toy, W8A8-INT8, with 4 outlier channels x64."""
    reader = CheckpointReader(trained_toy)
    model = load_causal_lm(reader).eval()
    ids = token_windows(load_tokenizer(trained_toy).encode(load_text("corpus:calibration")).ids, 64, 16, seed=0)
    with torch.no_grad():
        cos, sin = model.rope.get(0, 64)
        hs = [model.model.layers[0](model.model.embed_tokens(b), cos, sin) for b in ids.split(8)]
    layer = build_layer(reader.config, 1, reader.read(reader.names_with_prefix("model.layers.1."))).eval()
    inject_outliers(layer, torch.tensor([5, 40, 77, 101]), 64.0)
    rope = RotaryTable(reader.config)
    calib = LayerCalibration(1, hs, lambda n: rope.get(0, n))
    reference = calib.run(layer, observe_all_experts=False)
    targets = [Target(f"model.layers.1.{n}", n, m, W8A8, method) for n, m in layer.named_modules()
               if isinstance(m, torch.nn.Linear)]
    calib.collect_hessians(layer, targets)
    if method == "smoothquant":
        chosen = SmoothQuant(alpha=alpha, n_grid=10).quantize_layer(layer, calib, targets)
    else:
        chosen = {t.name: rtn_quantize(t.module.weight.data, W8A8) for t in targets}
    from squeeze.quant.linear import QuantLinear

    for t in targets:  # W8A8 at run time: int8 weights and per-token int8 activations
        parent, _, child = t.local.rpartition(".")
        setattr(layer.get_submodule(parent), child, QuantLinear(chosen[t.name]))
    out = calib.run(layer, observe_all_experts=False)
    err = sum(float((o - r).pow(2).sum()) for o, r in zip(out, reference, strict=True))
    return err / sum(float(r.pow(2).sum()) for r in reference), calib, layer, targets


@pytest.mark.slow
def test_smoothquant_beats_plain_w8a8_with_outliers(trained_toy: Path) -> None:
    plain = outlier_layer_error(trained_toy, "rtn")[0]
    smooth, calib, layer, targets = outlier_layer_error(trained_toy, "smoothquant", 0.5)
    search = outlier_layer_error(trained_toy, "smoothquant", "search")[0]
    print(f"W8A8 layer error with outliers: plain {plain:.3e}, smoothquant a=0.5 {smooth:.3e}, search {search:.3e}")
    assert smooth < 0.5 * plain and search < 0.5 * plain


def test_hessians_follow_the_fold(trained_toy: Path) -> None:
    """After smoothing, the pipeline's Hessians (used by GPTQ and the error report) are those of the
    smoothed inputs."""
    reader = CheckpointReader(trained_toy)
    layer = build_layer(reader.config, 1, reader.read(reader.names_with_prefix("model.layers.1."))).eval()
    inject_outliers(layer, torch.tensor([3, 9]), 64.0)
    rope = RotaryTable(reader.config)
    hs = [torch.randn(2, 32, reader.config.hidden_size, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    calib = LayerCalibration(1, hs, lambda n: rope.get(0, n))
    targets = [Target(f"model.layers.1.{n}", n, m, W8A8, "smoothquant") for n, m in layer.named_modules()
               if isinstance(m, torch.nn.Linear)]
    calib.collect_hessians(layer, targets)
    before = calib.stats["model.layers.1.self_attn.q_a_proj"].hessian.clone()
    SmoothQuant().quantize_layer(layer, calib, targets)
    moved = calib.stats["model.layers.1.self_attn.q_a_proj"].hessian
    fresh = LayerCalibration(1, hs, lambda n: rope.get(0, n))
    fresh.collect_hessians(layer, targets[:1])
    again = fresh.stats[targets[0].name].hessian
    assert not torch.allclose(before, moved)
    assert torch.allclose(moved, again, rtol=1e-3, atol=1e-3 * float(again.abs().max()))


@pytest.mark.slow
def test_cli_smoothquant_gptq_and_recipe(trained_toy: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    outs = {"cli": ["--method", "smoothquant+gptq", "--bits", "8", "--alpha", "0.5"],
            "recipe": ["--recipe", str(RECIPES / "w8a8-smoothquant.yaml")]}
    w = token_windows(load_tokenizer(trained_toy).encode(load_text("corpus:heldout")).ids, 128, 16)
    total, count = QuantizedRuntime(trained_toy).nll(w, 8)
    base = math.exp(total / count)
    for name, extra in outs.items():
        out = tmp_path / name
        r = runner.invoke(app, ["quantize", str(trained_toy), str(out), "--num-samples", "8", "--seq-len", "64",
                                *extra])
        assert r.exit_code == 0, r.output
        qc = json.loads((out / "config.json").read_text())["quantization_config"]
        group = next(iter(qc["config_groups"].values()))
        assert qc["format"] == "int-quantized" and group["input_activations"]["strategy"] == "token"
        assert "smoothquant" in (out / "squeeze_recipe.yaml").read_text()
        assert CheckpointReader(out).read_one("model.layers.1.mlp.experts.0.down_proj.weight").shape == (128, 128)
        total, count = QuantizedRuntime(out).nll(w, 8)
        assert abs(math.exp(total / count) / base - 1) < 0.01
    for extra, msg in ((["--alpha", "1.5"], "alpha must be in [0, 1]"), (["--alpha", "nan"], "alpha must be in"),
                       (["--bits", "4"], "--bits must be 8")):
        bad = tmp_path / "bad"
        r = runner.invoke(app, ["quantize", str(trained_toy), str(bad), "--method", "smoothquant", *extra])
        assert r.exit_code != 0 and msg in r.output, r.output
        assert not bad.exists()
