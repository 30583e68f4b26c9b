"""What a distillation run does: `DistillConfig`, built from a `recipes/distill-*.yaml` and/or flags."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from squeeze.distill.losses import KL_KINDS
from squeeze.errors import SqueezeError

LOSS_KINDS = ("ce", "logit", "feature", "relation", "hybrid")
LOSS_PARTS = ("logit", "feature", "attention", "gram")
# Which distillation terms each --loss turns on (hybrid takes its weights from the recipe).
DEFAULT_WEIGHTS: dict[str, dict[str, float]] = {
    "ce": {},
    "logit": {"logit": 1.0},
    "feature": {"feature": 1.0},
    "relation": {"attention": 1.0, "gram": 1.0},
    "hybrid": {"logit": 1.0, "feature": 0.5, "attention": 0.5, "gram": 0.5},
}


@dataclass
class DistillConfig:
    """Every knob of a run. total = alpha·CE + (1 - alpha)·Σ weight·part (alpha = 1 for --loss ce)."""

    loss: str = "logit"
    weights: dict[str, float] = field(default_factory=dict)  # empty: DEFAULT_WEIGHTS[loss]
    dataset: str = "corpus:train"
    steps: int = 300
    batch_size: int = 16
    seq_len: int = 128
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 15
    schedule: str = "cosine"  # cosine | step (DeepSeek's: ×0.316 at 80% and again at 90%)
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    clip: float = 1.0
    temperature: float = 1.0
    alpha: float = 0.5
    kl: str = "forward"
    beta: float = 0.5  # JSD mixing weight
    feature_kind: str = "mse"  # mse | cosine
    layer_map: str | None = None  # "student:teacher,..."; default: evenly spaced
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    device: str = "cpu"
    checkpoint_every: int = 100
    cache_teacher: bool = False
    cache_top_k: int = 64
    seed: int = 0

    def resolved_weights(self) -> dict[str, float]:
        w = dict(self.weights or DEFAULT_WEIGHTS[self.loss])
        return {k: v for k, v in w.items() if v}

    @property
    def ce_weight(self) -> float:
        return 1.0 if self.loss == "ce" else self.alpha

    def validate(self) -> DistillConfig:
        if self.loss not in LOSS_KINDS:
            raise SqueezeError(f"--loss must be one of {', '.join(LOSS_KINDS)}, got {self.loss!r}")
        if self.kl not in KL_KINDS:
            raise SqueezeError(f"--kl must be one of {', '.join(KL_KINDS)}, got {self.kl!r}")
        bad = set(self.weights) - set(LOSS_PARTS)
        if bad:
            raise SqueezeError(f"unknown loss weight(s) {sorted(bad)}; known: {', '.join(LOSS_PARTS)}")
        checks = [
            (self.steps >= 1, "--steps must be at least 1"),
            (self.batch_size >= 1 and self.grad_accum >= 1, "batch size and --grad-accum must be at least 1"),
            (self.seq_len >= 2, "--seq-len must be at least 2"),
            (self.temperature > 0, "--temperature must be positive"),
            (0.0 <= self.alpha <= 1.0, "--alpha (the CE weight) must be in [0, 1]"),
            (0.0 <= self.beta <= 1.0, "--beta must be in [0, 1]"),
            (self.feature_kind in ("mse", "cosine"), "feature loss must be mse or cosine"),
            (self.schedule in ("cosine", "step"), "--schedule must be cosine or step"),
            (self.precision in ("auto", "bf16", "fp32"), "--precision must be auto, bf16 or fp32"),
            (self.checkpoint_every >= 1, "--checkpoint-every must be at least 1"),
            (self.cache_top_k >= 1, "--cache-top-k must be at least 1"),
            (self.lr > 0, "--lr must be positive"),
        ]
        for ok, message in checks:
            if not ok:
                raise SqueezeError(message)
        if self.loss != "ce" and self.alpha == 1.0:
            raise SqueezeError(f"--alpha 1 leaves no weight on the {self.loss} loss; use --loss ce for CE only")
        return self


def load_distill_recipe(path: str | Path) -> dict[str, Any]:
    """The `distill:` section of a recipe YAML, as DistillConfig field values."""
    p = Path(path)
    if not p.is_file():
        raise SqueezeError(f"recipe {p} not found")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise SqueezeError(f"recipe {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    section = data.get("distill") if isinstance(data, dict) else None
    if not isinstance(section, dict):
        raise SqueezeError(f"recipe {p} has no 'distill:' section")
    known = {f.name for f in dataclasses.fields(DistillConfig)}
    unknown = sorted(set(section) - known)
    if unknown:
        raise SqueezeError(f"recipe {p}: unknown distill key(s) {unknown}")
    if "betas" in section:
        section["betas"] = tuple(section["betas"])
    return section


def make_config(recipe: str | Path | None = None, **flags: Any) -> DistillConfig:
    """Recipe values, overridden by every flag that is not None."""
    values = load_distill_recipe(recipe) if recipe else {}
    values.update({k: v for k, v in flags.items() if v is not None})
    try:
        return DistillConfig(**values).validate()
    except TypeError as e:
        raise SqueezeError(f"bad distill setting: {e}") from None
