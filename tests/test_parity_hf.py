"""Our DeepSeek modules give transformers' logits on the same checkpoint (fp32, tight tolerance)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from squeeze.checkpoint import CheckpointReader, CheckpointWriter
from squeeze.model.runtime import LayerwiseModel
from squeeze.model.toy import ToySpec, write_random_toy
from tests.conftest import SMALL

transformers = pytest.importorskip("transformers")

SHAPES = {
    "default": SMALL,
    "no-q-lora": dataclasses.replace(SMALL, q_lora_rank=None, dense_layers=0),
    "one-group-top3": dataclasses.replace(SMALL, n_group=1, topk_group=1, top_k=3, experts=6),
    "two-dense-wide-rope": dataclasses.replace(SMALL, layers=4, dense_layers=2, qk_rope_head_dim=16, heads=4),
}


def _hf_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    model = transformers.DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name", list(SHAPES))
def test_bf16_logits_match_transformers(tmp_path: Path, name: str) -> None:
    spec = SHAPES[name]
    write_random_toy(tmp_path / "m", spec, seed=3, bias_std=0.05)
    ids = torch.randint(0, spec.vocab, (2, 23), generator=torch.Generator().manual_seed(0))
    ours = LayerwiseModel(tmp_path / "m").logits(ids)
    ref = _hf_logits(tmp_path / "m", ids)
    assert _rel(ours, ref) < 1e-5
    # Routing must agree exactly, so the argmax tokens agree too.
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_fp8_checkpoint_matches_transformers_on_dequantized_weights(tmp_path: Path) -> None:
    """Our FP8 read path (dequantize per block on read) against HF on the same weights in fp32."""
    write_random_toy(tmp_path / "fp8", SMALL, fp8=True, seed=5, bias_std=0.05)
    reader = CheckpointReader(tmp_path / "fp8")
    assert reader.config.is_fp8_block
    cfg = reader.config.to_dict()
    cfg.pop("quantization_config")
    with CheckpointWriter(tmp_path / "fp32") as w:
        w.add_many(reader.read(reader.names, torch.float32))
        w.set_config(cfg)
    ids = torch.randint(0, SMALL.vocab, (2, 19), generator=torch.Generator().manual_seed(1))
    ours = LayerwiseModel(tmp_path / "fp8").logits(ids)
    assert _rel(ours, _hf_logits(tmp_path / "fp32", ids)) < 1e-5
    # And transformers' own FP8 loader (it dequantizes to bf16 on a CPU) lands close to us.
    pytest.importorskip("accelerate")
    assert _rel(ours, _hf_logits(tmp_path / "fp8", ids)) < 2e-2


def test_fp8_and_bf16_storage_of_one_model_agree(tmp_path: Path) -> None:
    write_random_toy(tmp_path / "a", SMALL, seed=7)
    write_random_toy(tmp_path / "b", SMALL, fp8=True, seed=7)
    ids = torch.randint(0, SMALL.vocab, (1, 17), generator=torch.Generator().manual_seed(2))
    a, b = LayerwiseModel(tmp_path / "a").logits(ids), LayerwiseModel(tmp_path / "b").logits(ids)
    assert 1e-4 < _rel(b, a) < 0.1  # fp8 is lossy but close


def _v2_config(spec: ToySpec, topk_method: str) -> dict:
    return {
        "model_type": "deepseek_v2", "architectures": ["DeepseekV2ForCausalLM"],
        "vocab_size": spec.vocab, "hidden_size": spec.hidden, "intermediate_size": spec.inter,
        "moe_intermediate_size": spec.moe_inter, "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads, "num_key_value_heads": spec.heads,
        "n_shared_experts": 2, "n_routed_experts": spec.experts, "num_experts_per_tok": spec.top_k,
        "first_k_dense_replace": 1, "moe_layer_freq": 1, "kv_lora_rank": spec.kv_lora_rank,
        "q_lora_rank": None, "qk_nope_head_dim": spec.qk_nope_head_dim, "qk_rope_head_dim": spec.qk_rope_head_dim,
        "v_head_dim": spec.v_head_dim, "routed_scaling_factor": 1.5, "scoring_func": "softmax",
        "topk_method": topk_method, "n_group": 4, "topk_group": 2, "norm_topk_prob": False,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 512, "tie_word_embeddings": False,
        "hidden_act": "silu",
    }


@pytest.mark.parametrize("topk_method", ["greedy", "group_limited_greedy"])
def test_deepseek_v2_softmax_router_matches_transformers(tmp_path: Path, topk_method: str) -> None:
    from squeeze.checkpoint import parse_config
    from squeeze.model.toy import init_model, save_model

    config = parse_config(_v2_config(SMALL, topk_method))
    model = init_model(config, seed=11)
    save_model(model, tmp_path / "v2", None)
    assert json.loads((tmp_path / "v2" / "config.json").read_text())["model_type"] == "deepseek_v2"
    ids = torch.randint(0, SMALL.vocab, (2, 15), generator=torch.Generator().manual_seed(4))
    ours = LayerwiseModel(tmp_path / "v2").logits(ids)
    ref_model = transformers.DeepseekV2ForCausalLM.from_pretrained(tmp_path / "v2", dtype=torch.float32).eval()
    with torch.no_grad():
        ref = ref_model(ids).logits
    assert _rel(ours, ref) < 1e-5
