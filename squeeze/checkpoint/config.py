"""Parse DeepSeek-V3 / V2 `config.json` into a typed, validated `ModelConfig`.

We keep the field names of the real releases (so the files we write load elsewhere) and validate
everything the runtime relies on up front: a checkpoint with a missing field should fail when it is
opened, with the field's name, not deep inside layer 17 with a shape error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from squeeze.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("deepseek_v3", "deepseek_v2")

# Fields every supported config must carry; the rest have the defaults of the public releases.
REQUIRED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
)
# Required only when the model has MoE layers.
MOE_FIELDS = ("moe_intermediate_size", "n_routed_experts", "num_experts_per_tok")


@dataclass
class ModelConfig:
    """The architecture, as the runtime needs it. `raw` keeps the file's dict for writing back."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None
    moe_intermediate_size: int = 0
    n_routed_experts: int | None = None
    n_shared_experts: int | None = None
    num_experts_per_tok: int | None = None
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    norm_topk_prob: bool = True
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    attention_bias: bool = False
    quantization_config: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    # ---- derived ----------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer: int) -> bool:
        """DeepSeek's rule: dense for the first k layers, then MoE every `moe_layer_freq` layers."""
        return (
            bool(self.n_routed_experts)
            and layer >= self.first_k_dense_replace
            and layer % self.moe_layer_freq == 0
        )

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    @property
    def is_fp8_block(self) -> bool:
        qc = self.quantization_config or {}
        return qc.get("quant_method") == "fp8" and qc.get("weight_block_size") is not None

    @property
    def fp8_block_size(self) -> tuple[int, int]:
        bs = (self.quantization_config or {}).get("weight_block_size", [128, 128])
        return int(bs[0]), int(bs[1])

    def to_dict(self) -> dict[str, Any]:
        """The dict to write as config.json: the original file's fields, updated by ours."""
        out = dict(self.raw)
        for name in self.__dataclass_fields__:
            if name == "raw":
                continue
            value = getattr(self, name)
            if name == "quantization_config" and value is None:
                out.pop(name, None)
                continue
            out[name] = value
        return out


def _check_type(name: str, value: Any, kind: type | tuple[type, ...]) -> None:
    if isinstance(value, bool) and kind in (int, float):
        raise ConfigError(f"config.json: field '{name}' must be a number, got {value!r}")
    if not isinstance(value, kind):
        raise ConfigError(f"config.json: field '{name}' must be {getattr(kind, '__name__', kind)}, got {value!r}")


def parse_config(data: dict[str, Any]) -> ModelConfig:
    """Validate a config dict and build a `ModelConfig`; raises `ConfigError` naming the problem."""
    model_type = data.get("model_type")
    if model_type is None:
        raise ConfigError("config.json: missing field 'model_type'")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"config.json: unsupported model_type '{model_type}' (squeeze reads {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    missing = [f for f in REQUIRED_FIELDS if f not in data]
    if data.get("n_routed_experts"):
        missing += [f for f in MOE_FIELDS if f not in data]
    if missing:
        raise ConfigError(f"config.json: missing field{'s' if len(missing) > 1 else ''} {', '.join(missing)}")

    kwargs: dict[str, Any] = {"model_type": model_type, "raw": dict(data)}
    for name, spec in ModelConfig.__dataclass_fields__.items():
        if name in ("model_type", "raw") or name not in data:
            continue
        value = data[name]
        if value is None and name in ("q_lora_rank", "n_routed_experts", "n_shared_experts",
                                      "num_experts_per_tok", "rope_scaling", "quantization_config"):
            kwargs[name] = None
            continue
        if spec.type in ("int", "int | None"):
            _check_type(name, value, int)
        elif spec.type == "float":
            _check_type(name, value, (int, float))
            value = float(value)
        elif spec.type == "bool":
            _check_type(name, value, bool)
        elif spec.type == "str":
            _check_type(name, value, str)
        kwargs[name] = value
    # v2 defaults differ from v3's: softmax scoring, greedy top-k, no normalisation.
    if model_type == "deepseek_v2":
        kwargs.setdefault("scoring_func", "softmax")
        kwargs.setdefault("topk_method", "greedy")
        kwargs.setdefault("norm_topk_prob", False)
    cfg = ModelConfig(**kwargs)
    _validate(cfg)
    return cfg


def _validate(cfg: ModelConfig) -> None:
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                 "qk_rope_head_dim", "v_head_dim"):
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"config.json: field '{name}' must be positive, got {getattr(cfg, name)}")
    if cfg.qk_rope_head_dim % 2:
        raise ConfigError(f"config.json: qk_rope_head_dim must be even, got {cfg.qk_rope_head_dim}")
    if cfg.scoring_func not in ("sigmoid", "softmax"):
        raise ConfigError(f"config.json: unsupported scoring_func '{cfg.scoring_func}' (sigmoid or softmax)")
    if cfg.topk_method not in ("noaux_tc", "greedy", "group_limited_greedy"):
        raise ConfigError(
            f"config.json: unsupported topk_method '{cfg.topk_method}' (noaux_tc, greedy, group_limited_greedy)"
        )
    if cfg.hidden_act != "silu":
        raise ConfigError(f"config.json: unsupported hidden_act '{cfg.hidden_act}' (squeeze runs silu)")
    if cfg.n_routed_experts:
        if cfg.n_routed_experts % cfg.n_group:
            raise ConfigError(
                f"config.json: n_routed_experts ({cfg.n_routed_experts}) is not divisible by n_group ({cfg.n_group})"
            )
        if not 0 < (cfg.num_experts_per_tok or 0) <= cfg.n_routed_experts:
            raise ConfigError("config.json: num_experts_per_tok must be between 1 and n_routed_experts")
        if cfg.topk_group > cfg.n_group:
            raise ConfigError("config.json: topk_group must not exceed n_group")
        if cfg.topk_method == "noaux_tc" and cfg.n_routed_experts // cfg.n_group < 2:
            raise ConfigError("config.json: topk_method noaux_tc needs at least 2 experts per group")
    rs = cfg.rope_scaling
    if rs is not None:
        kind = rs.get("type", rs.get("rope_type"))
        if kind not in ("yarn", "default", None):
            raise ConfigError(f"config.json: unsupported rope_scaling type '{kind}' (squeeze runs yarn)")
        if kind == "yarn":
            for f in ("factor", "original_max_position_embeddings"):
                if f not in rs:
                    raise ConfigError(f"config.json: rope_scaling is missing field '{f}'")


def load_config(path: str | Path) -> ModelConfig:
    """Read `config.json` from a checkpoint directory (or the file itself)."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.exists():
        raise ConfigError(f"no config.json in {p.parent}")
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a JSON object")
    return parse_config(data)
