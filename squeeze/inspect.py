"""What is in a checkpoint: architecture, parameter counts, storage formats, size on disk.

Counts come from the safetensors headers alone, so inspecting a 671B checkpoint reads a few MB.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from math import prod
from pathlib import Path

from squeeze.checkpoint.config import ModelConfig
from squeeze.checkpoint.reader import CheckpointReader

_EXPERT = re.compile(r"\.mlp\.experts\.(\d+)\.")


@dataclass
class FormatStats:
    tensors: int = 0
    params: int = 0
    bytes: int = 0


@dataclass
class CheckpointSummary:
    path: Path
    config: ModelConfig
    total_params: int
    active_params: int
    routed_expert_params: int
    formats: dict[str, FormatStats] = field(default_factory=dict)
    disk_bytes: int = 0
    shards: int = 0


_DTYPE_BYTES = {"F64": 8, "F32": 4, "I32": 4, "BF16": 2, "F16": 2, "I16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
                "I8": 1, "U8": 1, "I64": 8, "BOOL": 1}


def logical_numel(reader: CheckpointReader, name: str) -> int:
    """Parameters a tensor stands for (a packed int4 tensor holds 8 per int32)."""
    n = prod(reader.shape(name))
    if name.endswith("weight_packed"):
        n *= 32 // 4
    return n


def summarize(reader: CheckpointReader) -> CheckpointSummary:
    cfg = reader.config
    formats: dict[str, FormatStats] = defaultdict(FormatStats)
    total = routed = 0
    aux = ("_scale_inv", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")
    for name in reader.raw_names:
        size = prod(reader.shape(name)) * _DTYPE_BYTES.get(reader.stored_dtype(name), 4)
        owner = next((name[: -len(s)] for s in aux if name.endswith(s)), None)
        if owner is not None:
            # Scales and zero points are storage overhead of the weight they belong to.
            key = owner + "weight" if not owner.endswith("weight") else owner
            fmt = reader.storage_format(key) if key in reader.weight_map else "aux"
            formats[fmt].bytes += size
            continue
        fmt = reader.storage_format(name)
        stats = formats[fmt]
        stats.tensors += 1
        n = logical_numel(reader, name)
        stats.params += n
        stats.bytes += size
        total += n
        if _EXPERT.search(name):
            routed += n
    moe_layers = len(cfg.moe_layers)
    active = total - routed
    if moe_layers and cfg.n_routed_experts:
        active += routed * (cfg.num_experts_per_tok or 0) // cfg.n_routed_experts
    return CheckpointSummary(
        path=reader.path, config=cfg, total_params=total, active_params=active, routed_expert_params=routed,
        formats=dict(formats), disk_bytes=reader.file_size(), shards=len(set(reader.weight_map.values())),
    )
