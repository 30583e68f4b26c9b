"""`--cache-teacher`: run the teacher once, layer-major from disk, and keep what the losses need.

A MoE teacher larger than memory cannot run every step. Since the training batches are a pure
function of the step (see `data.py`), every batch of the run is known in advance: we run them
through `LayerwiseModel` a chunk of batches at a time (each layer read once per chunk) and store, per
micro-batch, the teacher's top-k logits (values fp16 + indices), the hidden states of the mapped
teacher layers and, when the attention loss is on, their attention maps. Each file is written to a
temp name and renamed, so an interrupted cache run resumes where it stopped.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from squeeze.distill.data import step_batch
from squeeze.distill.models import attention_probs
from squeeze.model.runtime import LayerwiseModel


def cache_file(cache_dir: Path, step: int, micro: int) -> Path:
    return cache_dir / f"step-{step:06d}-{micro:03d}.pt"


def atomic_save(obj: object, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


@torch.no_grad()
def build_teacher_cache(teacher_dir: str | Path, cache_dir: Path, tokens: torch.Tensor, steps: int, grad_accum: int,
                        batch_size: int, seq_len: int, seed: int, hidden_layers: list[int], attention_layers: list[int],
                        top_k: int, chunk: int = 32, on_chunk: Callable[[int, int], None] | None = None) -> None:
    """Fill `cache_dir` with one file per (step, micro-batch); existing files are kept."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    keys = [(s, m) for s in range(steps) for m in range(grad_accum)]
    todo = [k for k in keys if not cache_file(cache_dir, *k).exists()]
    if not todo:
        return
    model = LayerwiseModel(teacher_dir)
    for c in range(0, len(todo), chunk):
        part = todo[c : c + chunk]
        inputs = [step_batch(tokens, s, m, batch_size, seq_len, seed)[:, :-1] for s, m in part]
        hs = [model.embed_tokens(ids) for ids in inputs]
        saved: list[dict[str, torch.Tensor]] = [{} for _ in part]
        cos, sin = model.rotary(0, seq_len)
        for i in range(model.num_layers):
            layer = model.load_layer(i)
            for j, h in enumerate(hs):
                if i in attention_layers:
                    saved[j][f"attn.{i}"] = attention_probs(layer.self_attn, layer.input_layernorm(h), cos, sin).half()
                hs[j] = layer(h, cos, sin)
                if i in hidden_layers:
                    saved[j][f"hidden.{i}"] = hs[j].half()
            del layer
        for j, (s, m) in enumerate(part):
            values, indices = model.head(hs[j]).float().topk(top_k, dim=-1)
            saved[j]["topk_values"] = values.half()
            saved[j]["topk_indices"] = indices.int()
            atomic_save(saved[j], cache_file(cache_dir, s, m))
        if on_chunk is not None:
            on_chunk(min(c + chunk, len(todo)), len(todo))
