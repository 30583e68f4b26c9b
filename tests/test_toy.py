"""The toy MoE: release-format config and names, a real (tiny) LM after training, balanced routing."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from squeeze.checkpoint import CheckpointReader, parse_config
from squeeze.data import corpus_text, token_windows
from squeeze.model.tokenizer import load_tokenizer, train_bpe
from squeeze.model.toy import ToySpec, init_model, make_toy, toy_config_dict, train_toy
from tests.conftest import SMALL

RELEASE_FIELDS = (
    "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "first_k_dense_replace", "q_lora_rank",
    "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_group", "topk_group",
    "routed_scaling_factor", "scoring_func", "norm_topk_prob", "topk_method", "rope_scaling", "moe_layer_freq",
)


def test_checkpoint_has_release_config_and_tensor_names(tmp_path: Path) -> None:
    make_toy(tmp_path / "t", SMALL, fp8=True, max_shard_bytes=100_000)
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v3"
    for f in RELEASE_FIELDS:
        assert f in cfg, f
    assert cfg["quantization_config"] == {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                          "weight_block_size": [128, 128]}
    r = CheckpointReader(tmp_path / "t")
    names = set(r.raw_names)
    for n in ("model.layers.1.self_attn.q_a_proj.weight", "model.layers.1.self_attn.q_a_layernorm.weight",
              "model.layers.1.self_attn.kv_a_proj_with_mqa.weight", "model.layers.1.self_attn.kv_a_layernorm.weight",
              "model.layers.1.self_attn.kv_b_proj.weight", "model.layers.1.self_attn.kv_b_proj.weight_scale_inv",
              "model.layers.1.mlp.gate.weight", "model.layers.1.mlp.gate.e_score_correction_bias",
              "model.layers.1.mlp.experts.7.down_proj.weight", "model.layers.1.mlp.shared_experts.up_proj.weight",
              "model.layers.0.mlp.gate_proj.weight", "model.embed_tokens.weight", "model.norm.weight",
              "lm_head.weight"):
        assert n in names, n
    assert (tmp_path / "t" / "model.safetensors.index.json").exists()
    assert len(r.shard_files) > 1


def test_tokenizer_loads_in_transformers_with_same_ids(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    make_toy(tmp_path / "t", SMALL)
    ours = load_tokenizer(tmp_path / "t")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "t")
    text = "And God said, Let there be light: and there was light."
    assert hf(text)["input_ids"] == ours.encode(text).ids
    assert ours.decode(ours.encode(text).ids) == text


def test_training_makes_a_language_model_and_keeps_routing_balanced() -> None:
    spec = dataclasses.replace(SMALL, vocab=1024)
    tok = train_bpe(corpus_text("train"), spec.vocab)
    train_ids = torch.tensor(tok.encode(corpus_text("train")[:400_000]).ids)
    heldout = token_windows(tok.encode(corpus_text("heldout")[:40_000]).ids, 64)
    config = parse_config(toy_config_dict(spec))
    results = {}
    for rate in (0.0, 1e-2):
        model = init_model(config, seed=0)
        results[rate] = train_toy(model, train_ids, heldout, steps=120, seq_len=64, batch=8, bias_rate=rate)
    trained = results[1e-2]
    assert trained.heldout_ppl < trained.uniform_ppl / 8, trained
    # Without the bias update the load drifts; DeepSeek's aux-loss-free update evens it out.
    assert trained.expert_load_cv < results[0.0].expert_load_cv, results
    assert trained.expert_load_cv < 0.5, trained
    biases = torch.stack([m.gate.e_score_correction_bias for m in model.moe_layers()])
    assert biases.abs().sum() > 0


def test_default_spec_is_deepseek_shaped() -> None:
    cfg = parse_config(toy_config_dict(ToySpec()))
    assert cfg.moe_layers == [1, 2, 3] and cfg.n_routed_experts == 8 and cfg.n_group == 4
    assert cfg.rope_scaling and cfg.rope_scaling["type"] == "yarn"
