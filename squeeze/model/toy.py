"""The built-in toy MoE: a DeepSeek-V3-shaped model small enough to train on a laptop CPU.

Every architectural feature of the real model is present (MLA with q/kv LoRA and decoupled RoPE with
YaRN, dense first layers, sigmoid router with correction bias and group-limited top-k, routed
scaling, shared experts), with the real release's config fields and tensor names. Training on the
bundled corpus makes it a real (tiny) language model, so compression has something to lose; the
router is kept balanced with DeepSeek's auxiliary-loss-free bias update.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from squeeze.checkpoint.config import ModelConfig, parse_config
from squeeze.checkpoint.fp8 import quantize_fp8_block
from squeeze.checkpoint.writer import CheckpointWriter, check_output_dir
from squeeze.data import corpus_text, token_windows
from squeeze.model.decoder import CausalLM
from squeeze.model.tokenizer import BOS, EOS, TOKENIZER_FILES, save_tokenizer, train_bpe

FP8_QUANTIZATION_CONFIG = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": [128, 128],
}


@dataclass
class ToySpec:
    """Sizes of the toy. Defaults train in a few minutes on 2 CPU cores."""

    layers: int = 4
    dense_layers: int = 1
    hidden: int = 256
    heads: int = 4
    experts: int = 8
    top_k: int = 2
    n_group: int = 4
    topk_group: int = 2
    shared_experts: int = 1
    moe_inter: int = 128
    inter: int = 512
    vocab: int = 4096
    q_lora_rank: int | None = 128
    kv_lora_rank: int = 128
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 32
    v_head_dim: int = 32
    routed_scaling_factor: float = 2.5
    max_position_embeddings: int = 1024


def toy_config_dict(spec: ToySpec, bos_id: int = 0, eos_id: int = 1) -> dict[str, Any]:
    """config.json for the toy, in the field names and conventions of DeepSeek-V3's release."""
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": spec.vocab,
        "hidden_size": spec.hidden,
        "intermediate_size": spec.inter,
        "moe_intermediate_size": spec.moe_inter,
        "num_hidden_layers": spec.layers,
        "num_nextn_predict_layers": 0,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.heads,
        "n_shared_experts": spec.shared_experts,
        "n_routed_experts": spec.experts,
        "routed_scaling_factor": spec.routed_scaling_factor,
        "kv_lora_rank": spec.kv_lora_rank,
        "q_lora_rank": spec.q_lora_rank,
        "qk_rope_head_dim": spec.qk_rope_head_dim,
        "v_head_dim": spec.v_head_dim,
        "qk_nope_head_dim": spec.qk_nope_head_dim,
        "topk_method": "noaux_tc",
        "n_group": spec.n_group,
        "topk_group": spec.topk_group,
        "num_experts_per_tok": spec.top_k,
        "moe_layer_freq": 1,
        "first_k_dense_replace": spec.dense_layers,
        "norm_topk_prob": True,
        "scoring_func": "sigmoid",
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_position_embeddings,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-6,
        "use_cache": True,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "tie_word_embeddings": False,
        "rope_theta": 10000.0,
        "rope_scaling": {
            "type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": spec.max_position_embeddings // 4,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        "attention_bias": False,
        "attention_dropout": 0.0,
        "torch_dtype": "bfloat16",
        "squeeze_toy_spec": asdict(spec),
    }


def init_model(config: ModelConfig, seed: int = 0) -> CausalLM:
    """Random init as transformers does for DeepSeek-V3: N(0, 0.02) weights, unit norms, zero bias."""
    torch.manual_seed(seed)
    model = CausalLM(config)
    std = config.raw.get("initializer_range", 0.02)
    for module in model.modules():
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, 0.0, std)
    for moe in model.moe_layers():
        nn.init.normal_(moe.gate.weight, 0.0, std)
    return model


# Which tensors DeepSeek stores in FP8: every Linear inside the decoder layers except the router.
def is_fp8_target(name: str, tensor: torch.Tensor) -> bool:
    return name.startswith("model.layers.") and tensor.dim() == 2 and not name.endswith("mlp.gate.weight")


def save_model(model: CausalLM, out: Path, tokenizer_dir: Path | None, fp8: bool = False,
               max_shard_bytes: int = 4 * 1024**2, overwrite: bool = False) -> None:
    """Write a model as a DeepSeek-format checkpoint: bf16 (or block-FP8) shards, index, config, tokenizer."""
    cfg = model.config.to_dict()
    if fp8:
        cfg["quantization_config"] = dict(FP8_QUANTIZATION_CONFIG)
    with CheckpointWriter(out, max_shard_bytes=max_shard_bytes, overwrite=overwrite) as w:
        for name, t in model.checkpoint_state().items():
            if name.endswith("e_score_correction_bias") or name.endswith("gate.weight"):
                w.add(name, t.float())  # the router stays fp32, as in the release
            elif fp8 and is_fp8_target(name, t):
                q, s = quantize_fp8_block(t)
                w.add(name, q)
                w.add(name + "_scale_inv", s)
            else:
                w.add(name, t.to(torch.bfloat16))
        w.set_config(cfg)
        if tokenizer_dir is not None:
            for f in TOKENIZER_FILES:
                w.add_file(f, tokenizer_dir / f)


def write_random_toy(out: str | Path, spec: ToySpec, fp8: bool = False, seed: int = 0,
                     bias_std: float = 0.0, max_shard_bytes: int = 4 * 1024**2) -> ModelConfig:
    """An untrained toy without a tokenizer: for parity tests and memory benchmarks.

    `bias_std` gives the routers random correction biases so that tests exercise the biased choice.
    """
    config = parse_config(toy_config_dict(spec))
    model = init_model(config, seed)
    if bias_std:
        gen = torch.Generator().manual_seed(seed + 1)
        for moe in model.moe_layers():
            bias = moe.gate.e_score_correction_bias
            if bias is not None:
                bias.copy_(torch.randn(bias.shape, generator=gen) * bias_std)
    save_model(model, Path(out), None, fp8=fp8, max_shard_bytes=max_shard_bytes)
    return config


@dataclass
class TrainResult:
    steps: int
    seconds: float
    final_loss: float
    heldout_ppl: float
    uniform_ppl: float
    expert_load_cv: float  # coefficient of variation of tokens per expert, last 20 steps


def update_routing_bias(model: CausalLM, rate: float) -> None:
    """DeepSeek-V3's auxiliary-loss-free balancing: nudge each expert's bias toward the mean load."""
    for moe in model.moe_layers():
        if moe.last_counts is None:
            continue
        load = moe.last_counts.float()
        moe.gate.e_score_correction_bias += rate * torch.sign(load.mean() - load)


@torch.no_grad()
def evaluate_ppl(model: CausalLM, windows: torch.Tensor, batch: int = 16) -> float:
    model.eval()
    total, count = 0.0, 0
    for ids in windows.split(batch):
        logits = model(ids)
        total += F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
        count += ids[:, 1:].numel()
    model.train()
    return math.exp(total / count)


def train_toy(model: CausalLM, train_ids: torch.Tensor, heldout: torch.Tensor, steps: int,
              seq_len: int = 128, batch: int = 16, lr: float = 3e-3, seed: int = 0,
              bias_rate: float = 1e-2, on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """AdamW with warmup + cosine decay on random windows of the training text."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    )
    gen = torch.Generator().manual_seed(seed)
    loads: list[torch.Tensor] = []
    loss_value = float("nan")
    start = time.perf_counter()
    model.train()
    for step in range(steps):
        starts = torch.randint(0, train_ids.numel() - seq_len - 1, (batch,), generator=gen)
        ids = torch.stack([train_ids[s : s + seq_len + 1] for s in starts.tolist()])
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            update_routing_bias(model, bias_rate)
        if step >= steps - 20:
            loads.extend(m.last_counts.float() for m in model.moe_layers() if m.last_counts is not None)
        loss_value = loss.item()
        if on_step is not None:
            on_step(step, loss_value)
    seconds = time.perf_counter() - start
    cv = float(torch.stack([x.std() / x.mean() for x in loads]).mean()) if loads else 0.0
    return TrainResult(steps, seconds, loss_value, evaluate_ppl(model, heldout), float(model.config.vocab_size), cv)


def make_toy(out: str | Path, spec: ToySpec | None = None, train_steps: int = 0, fp8: bool = False,
             seed: int = 0, max_shard_bytes: int = 4 * 1024**2, overwrite: bool = False,
             on_step: Callable[[int, float], None] | None = None) -> TrainResult | None:
    """Build (and optionally train) the toy MoE and write it as a DeepSeek-V3 checkpoint at `out`."""
    out = check_output_dir(out, overwrite)
    spec = spec or ToySpec()
    tok = train_bpe(corpus_text("train"), spec.vocab)
    config = parse_config(toy_config_dict(spec, tok.token_to_id(BOS), tok.token_to_id(EOS)))
    model = init_model(config, seed)
    result = None
    if train_steps > 0:
        train_ids = torch.tensor(tok.encode(corpus_text("train")).ids)
        heldout = token_windows(tok.encode(corpus_text("heldout")).ids, 128)
        result = train_toy(model, train_ids, heldout, train_steps, seed=seed, on_step=on_step)
    with tempfile.TemporaryDirectory() as tmp:
        save_tokenizer(tok, Path(tmp), spec.max_position_embeddings)
        save_model(model, out, Path(tmp), fp8=fp8, max_shard_bytes=max_shard_bytes, overwrite=overwrite)
    return result
