"""squeeze.quant building blocks: observers, GPTQ vs RTN on real activations, exact export round trips."""

from __future__ import annotations

import glob
from pathlib import Path

import pytest
import torch
import yaml

from squeeze.checkpoint import CheckpointReader
from squeeze.checkpoint.fp8 import quantize_fp8_block
from squeeze.data import load_text, token_windows
from squeeze.errors import SqueezeError
from squeeze.model.decoder import build_layer
from squeeze.model.rope import RotaryTable
from squeeze.model.runtime import LayerwiseModel
from squeeze.model.tokenizer import load_tokenizer
from squeeze.quant.calibration import InputStats, LayerCalibration, Target, output_error
from squeeze.quant.export import COMPRESSED_TENSORS, export_tensors
from squeeze.quant.gptq import gptq_quantize
from squeeze.quant.linear import QuantLinear
from squeeze.quant.methods import get_method
from squeeze.quant.observers import weight_qparams
from squeeze.quant.rtn import rtn_quantize
from squeeze.quant.scheme import PRESETS, preset, scheme_from_dict
from squeeze.recipe import load_recipe

SCHEMES = ["W4A16", "W4A16_ASYM", "W8A16", "W8A8_INT8", "W8A8_FP8", "FP8_BLOCK"]


@pytest.mark.parametrize("name", SCHEMES)
def test_export_decodes_exactly_with_compressed_tensors(name: str) -> None:
    """Our files, decoded by compressed-tensors' own decompressor, give exactly our dequantized weights."""
    from compressed_tensors.compressors import BaseCompressor

    scheme = PRESETS[name]
    w = torch.randn(200, 256, generator=torch.Generator().manual_seed(0)) * 0.05
    qw = rtn_quantize(w, scheme)
    stored = {k.split(".", 1)[1]: v for k, v in export_tensors("lin", qw, COMPRESSED_TENSORS).items()}
    assert ("weight_packed" in stored) == (scheme.ct_format == "pack-quantized")
    assert ("weight_zero_point" in stored) == (not scheme.weights.symmetric)
    stored["weight_scale"] = stored["weight_scale"].float()
    decoded = BaseCompressor.get_value_from_registry(scheme.ct_format).decompress(stored, scheme.to_ct(["Linear"]))
    assert torch.equal(decoded["weight"].float(), qw.dequantize())
    # the stored integers are within range and reproduce the dequantized weight
    if scheme.weights.type == "int":
        assert int(qw.q.min()) >= scheme.weights.qmin and int(qw.q.max()) <= scheme.weights.qmax


def test_int4_packing_is_compressed_tensors_pack_to_int32() -> None:
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    qw = rtn_quantize(w, preset("W4A16"))
    stored = export_tensors("x", qw, COMPRESSED_TENSORS)
    assert stored["x.weight_packed"].dtype == torch.int32 and stored["x.weight_packed"].shape == (64, 16)
    assert torch.equal(unpack_from_int32(stored["x.weight_packed"], 4, torch.Size([64, 128])), qw.q)
    assert stored["x.weight_shape"].tolist() == [64, 128]


def test_fp8_block_is_bit_identical_to_deepseek_quantizer() -> None:
    w = torch.randn(300, 200, generator=torch.Generator().manual_seed(2))
    qw = rtn_quantize(w, preset("FP8_BLOCK"))
    q, s = quantize_fp8_block(w)
    assert torch.equal(qw.q.view(torch.uint8), q.view(torch.uint8)) and torch.equal(qw.scale, s)


def test_observer_error_bound_and_scheme_errors() -> None:
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(3))
    for name in ("W4A16", "W4A16_ASYM", "W8A16"):
        args = preset(name).weights
        scale, _ = weight_qparams(w, args)
        err = (rtn_quantize(w, preset(name)).dequantize() - w).abs()
        # round to nearest: never more than half a step (plus the clamp of the top level, sym only)
        step = scale.repeat_interleave(args.group_size or 256, 1) if args.strategy == "group" else scale
        assert bool((err <= step * (1.0 if args.symmetric else 0.5) + 1e-6).all())
    with pytest.raises(SqueezeError, match="does not divide"):
        rtn_quantize(torch.randn(8, 100), preset("W4A16"))
    with pytest.raises(SqueezeError, match="unknown scheme"):
        preset("W3A5")
    with pytest.raises(SqueezeError, match="unknown quantization method"):
        get_method("magic")
    assert scheme_from_dict({"preset": "W4A16", "group_size": -1}).weights.strategy == "channel"


def _real_inputs(ckpt: Path, names: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Weights and input activations of some Linears of layer 1 of a trained toy, on held-out text."""
    model = LayerwiseModel(ckpt)
    ids = token_windows(load_tokenizer(ckpt).encode(load_text("corpus:calibration")).ids, 128, 16, seed=0)
    acts: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    weights: dict[str, torch.Tensor] = {}

    def on_layer(i: int, layer: torch.nn.Module) -> None:
        if i != 1:
            return
        for n in names:
            mod = layer.get_submodule(n)
            weights[n] = mod.weight.detach().clone()
            mod.register_forward_pre_hook(lambda _m, a, n=n: acts[n].append(a[0].reshape(-1, a[0].shape[-1])))

    model.hidden_states([ids], on_layer)
    return weights, {n: torch.cat(v) for n, v in acts.items()}


def test_gptq_beats_rtn_on_real_activations(trained_toy: Path) -> None:
    names = ["self_attn.q_b_proj", "self_attn.o_proj", "mlp.shared_experts.down_proj", "mlp.experts.0.up_proj"]
    weights, acts = _real_inputs(trained_toy, names)
    schemes = [preset("W4A16"), preset("W4A16_ASYM").with_weights(group_size=32), preset("W8A16")]
    for n in names:
        x = acts[n]
        stats = InputStats(x.T @ x, x.shape[0])
        for scheme in schemes:
            w = weights[n]
            rtn = output_error(w, rtn_quantize(w, scheme).dequantize(), stats)
            gptq = output_error(w, gptq_quantize(w, stats.hessian, scheme).dequantize(), stats)
            gptq_ao = output_error(w, gptq_quantize(w, stats.hessian, scheme, act_order=True).dequantize(), stats)
            # the definition, checked directly on the activations: ‖XWᵀ − XŴᵀ‖² / ‖XWᵀ‖²
            direct = float(((x @ w.T - x @ rtn_quantize(w, scheme).dequantize().T) ** 2).sum() / ((x @ w.T) ** 2).sum())
            assert rtn == pytest.approx(direct, rel=1e-3)
            assert gptq < 0.8 * rtn, (n, scheme.describe(), gptq, rtn)
            assert gptq_ao < 0.8 * rtn, (n, scheme.describe(), gptq_ao, rtn)


def test_bf16_statistics_pass_matches_fp32(trained_toy: Path) -> None:
    """The default bf16 statistics pass (autocast matmuls, fp32 xᵀx) gives the Hessians and the GPTQ results
    of a full fp32 pass, on every Linear of a real MoE layer."""
    reader = CheckpointReader(trained_toy)
    cfg = reader.config
    ids = token_windows(load_tokenizer(trained_toy).encode(load_text("corpus:calibration")).ids, 64, 8, seed=0)
    rope = RotaryTable(cfg)
    layer0 = build_layer(cfg, 0, reader.read(reader.names_with_prefix("model.layers.0."))).eval()
    with torch.no_grad():
        emb = torch.nn.functional.embedding(ids, reader.read_one("model.embed_tokens.weight"))
        hs = [layer0(emb, *rope.get(0, ids.shape[1]))]
    stats = {}
    for dtype in (torch.float32, torch.bfloat16):
        layer = build_layer(cfg, 1, reader.read(reader.names_with_prefix("model.layers.1."))).eval()
        targets = [Target(f"model.layers.1.{n}", n, m, preset("W4A16"), "gptq") for n, m in layer.named_modules()
                   if isinstance(m, torch.nn.Linear)]
        calib = LayerCalibration(1, hs, lambda n: rope.get(0, n))
        stats[dtype] = calib.collect_hessians(layer, targets, compute_dtype=dtype)
    assert len(stats[torch.float32]) > 20  # attention, every expert, the shared expert
    rels = {}
    for name, ref in stats[torch.float32].items():
        got = stats[torch.bfloat16][name]
        assert got.tokens == ref.tokens
        rels[name] = float((got.hessian - ref.hessian).norm() / ref.hessian.norm())
    assert max(rels.values()) < 2e-2, rels
    assert rels["model.layers.1.mlp.experts.3.down_proj"] > 0  # bf16 really ran (a down proj sees bf16 products)
    for local in ("self_attn.kv_b_proj", "mlp.experts.3.down_proj", "mlp.shared_experts.gate_proj"):
        name = f"model.layers.1.{local}"
        w = layer.get_submodule(local).weight.data
        ref = stats[torch.float32][name]
        errs = [output_error(w, gptq_quantize(w, s.hessian, preset("W4A16")).dequantize(), ref)
                for s in (ref, stats[torch.bfloat16][name])]
        assert errs[1] <= 1.02 * errs[0], (local, errs)  # not worse (it may land either side: bf16 sums vary)


def test_quant_linear_cpu_path_matches_fake_quant() -> None:
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(4))
    x = torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(5))
    qw = rtn_quantize(w, preset("W8A8_INT8"))
    y = QuantLinear(qw)(x)
    xq = x.reshape(-1, 128)
    s = xq.abs().amax(-1, keepdim=True) / 127  # per-token dynamic, as W8A8 kernels do at run time
    xq = (torch.round(xq / s) * s).reshape(x.shape)
    torch.testing.assert_close(y, xq @ qw.dequantize().T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["W4A16", "W4A16_ASYM", "W8A16", "W8A8_INT8", "FP8_BLOCK"])
def test_kernel_dispatch_matches_cpu_path(name: str) -> None:
    """QuantLinear's CUDA route (squeeze.kernels ops, here their torch references) computes what the
    CPU path (dequantize + F.linear, activations fake-quantized) computes."""
    pytest.importorskip("squeeze.kernels")
    from squeeze.quant.linear import _cpu_linear, kernel_linear

    m = QuantLinear(rtn_quantize(torch.randn(192, 256, generator=torch.Generator().manual_seed(6)) * 0.05,
                                 preset(name)))
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(7))
    ref = _cpu_linear(x, m)
    assert float((kernel_linear(x, m, backend="torch") - ref).norm() / ref.norm()) < 1e-6


def test_shipped_recipes_parse() -> None:
    files = sorted(glob.glob(str(Path(__file__).parents[1] / "recipes" / "*.yaml")))
    assert any(f.endswith("w4a16-gptq.yaml") for f in files)
    quant = [f for f in files if "quantize" in yaml.safe_load(Path(f).read_text())]  # distill-*.yaml are not
    assert len(quant) >= 7
    for f in quant:
        assert load_recipe(f).rules, f
