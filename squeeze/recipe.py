"""Recipes: which modules (regex on names) get which scheme and which method.

A recipe is an ordered list of rules; a Linear takes the first rule whose `targets` regex matches its
full name (`re.search`, e.g. `model.layers.3.mlp.experts.5.up_proj`). Names matching `ignore` stay in
full precision; the router (`mlp.gate`), norms, embeddings and lm_head are never touched because they
are not Linear modules of a decoder layer (the head is kept at full precision). YAML form:

    quantize:
      ignore: ['kv_a_proj']                       # optional
      calibration: {dataset: corpus:calibration, num_samples: 64, seq_len: 256}
      rules:
        - targets: ['self_attn\\.']
          scheme: FP8_BLOCK
          method: fp8-block
        - targets: ['mlp\\.(experts|shared_experts)\\.', 'mlp\\.(gate|up|down)_proj']
          scheme: {preset: W4A16, group_size: 128, symmetric: true}
          method: gptq
          params: {act_order: false, damp: 0.01}
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from squeeze.errors import SqueezeError
from squeeze.quant.scheme import QuantScheme, scheme_from_dict

ALL_LINEARS = r"(self_attn|mlp)\..*_proj(_with_mqa)?$"


@dataclass
class Rule:
    targets: list[str]
    scheme: QuantScheme
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    scheme_spec: Any = None  # as written, for saving the recipe back

    def __post_init__(self) -> None:
        for t in self.targets:
            try:
                re.compile(t)
            except re.error as e:
                raise SqueezeError(f"bad target regex {t!r}: {e}") from None

    def matches(self, name: str) -> bool:
        return any(re.search(t, name) for t in self.targets)


@dataclass
class Calibration:
    dataset: str = "corpus:calibration"
    num_samples: int = 64
    seq_len: int = 256
    batch_size: int = 8
    seed: int = 0
    observe_all_experts: bool = True
    # dtype of the statistics pass's matmuls (CPU/GPU autocast): the weights are bf16 on disk and the real
    # model runs in bf16; Hessians (xᵀx) stay fp32 products. "float32" for a full-precision pass.
    compute_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        if self.compute_dtype not in ("bfloat16", "float32"):
            raise SqueezeError(f"calibration compute_dtype must be bfloat16 or float32, not {self.compute_dtype!r}")

    @property
    def torch_compute_dtype(self) -> torch.dtype:
        return getattr(torch, self.compute_dtype)


@dataclass
class Recipe:
    rules: list[Rule]
    ignore: list[str] = field(default_factory=list)
    calibration: Calibration = field(default_factory=Calibration)

    def rule_for(self, name: str) -> Rule | None:
        if any(re.search(p, name) for p in self.ignore):
            return None
        return next((r for r in self.rules if r.matches(name)), None)

    def check_matches(self, names: list[str]) -> None:
        """Every rule and ignore pattern must match some Linear: a typo must not silently do nothing."""
        for r in self.rules:
            for t in r.targets:
                if not any(re.search(t, n) for n in names):
                    raise SqueezeError(f"recipe target regex {t!r} matches no Linear module of the model")
        for p in self.ignore:
            if not any(re.search(p, n) for n in names):
                raise SqueezeError(f"--ignore regex {p!r} matches no Linear module of the model")

    def to_dict(self) -> dict[str, Any]:
        return {"quantize": {
            "ignore": list(self.ignore),
            "calibration": dataclasses.asdict(self.calibration),
            "rules": [{"targets": r.targets, "scheme": r.scheme_spec if r.scheme_spec is not None else
                       {"weights": dataclasses.asdict(r.scheme.weights),
                        "input_activations": dataclasses.asdict(r.scheme.input_activations)
                        if r.scheme.input_activations else None},
                       "method": r.method, "params": r.params} for r in self.rules],
        }}

    def to_yaml(self) -> str:
        def clean(o: Any) -> Any:
            if isinstance(o, tuple):
                return list(o)
            if isinstance(o, dict):
                return {k: clean(v) for k, v in o.items()}
            if isinstance(o, list):
                return [clean(v) for v in o]
            return o
        return yaml.safe_dump(clean(self.to_dict()), sort_keys=False)


def recipe_from_dict(d: dict[str, Any]) -> Recipe:
    q = d.get("quantize", d) if isinstance(d, dict) else None
    if not isinstance(q, dict) or "rules" not in q:
        raise SqueezeError("a recipe needs a 'quantize:' section with a 'rules:' list")
    rules = []
    for i, r in enumerate(q["rules"]):
        if not isinstance(r, dict) or "targets" not in r or "method" not in r:
            raise SqueezeError(f"recipe rule {i} needs 'targets' and 'method'")
        targets = [r["targets"]] if isinstance(r["targets"], str) else list(r["targets"])
        spec = r.get("scheme", "FP8_BLOCK" if r["method"] == "fp8-block" else "W4A16")
        rules.append(Rule(targets, scheme_from_dict(spec), str(r["method"]), dict(r.get("params") or {}), spec))
    cal = q.get("calibration") or {}
    try:
        calibration = Calibration(**cal)
    except TypeError as e:
        raise SqueezeError(f"bad calibration section: {e}") from None
    return Recipe(rules, list(q.get("ignore") or []), calibration)


def load_recipe(path: str | Path) -> Recipe:
    p = Path(path)
    if not p.is_file():
        raise SqueezeError(f"recipe file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise SqueezeError(f"recipe {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    return recipe_from_dict(data)


def recipe_from_flags(method: str, bits: int | None = None, group_size: int | None = None,
                      symmetric: bool = True, act_order: bool = False, scheme: str | None = None,
                      ignore: list[str] | None = None, calibration: Calibration | None = None,
                      alpha: float | str | None = None, steps: int | None = None, lr: float | None = None,
                      start: str | None = None) -> Recipe:
    """The CLI shorthand: one rule over every decoder-layer Linear."""
    smooth = method in ("smoothquant", "smoothquant+gptq")
    if method == "fp8-block":
        spec: Any = scheme or "FP8_BLOCK"
    elif smooth:  # W8A8-INT8 by definition: int8 weights per channel, int8 activations per token
        if bits not in (None, 8):
            raise SqueezeError(f"{method} quantizes weights and activations to int8: --bits must be 8, got {bits}")
        if group_size is not None:
            raise SqueezeError(f"--group-size does not apply to {method} (W8A8 weights are per output channel)")
        spec = "W8A8_INT8" if scheme is None or scheme.upper().replace("-", "_") in ("W8A8", "W8A8_INT8") else scheme
    elif scheme:
        spec = scheme
    else:
        b = bits or 4
        spec = {"preset": "W4A16" if b < 8 else "W8A16", "bits": b,
                "group_size": group_size if group_size is not None else (128 if b < 8 else -1),
                "symmetric": symmetric}
    params: dict[str, Any] = {}
    if act_order:
        if method not in ("gptq", "smoothquant+gptq") and not (method == "qat" and start == "gptq"):
            raise SqueezeError("--act-order applies to --method gptq (or smoothquant+gptq, qat --start gptq) only")
        params["act_order"] = True
    if alpha is not None:
        if not smooth:
            raise SqueezeError("--alpha applies to --method smoothquant / smoothquant+gptq only")
        try:
            params["alpha"] = float(alpha)
        except ValueError:
            params["alpha"] = str(alpha)
    qat = {"steps": steps, "lr": lr, "start": start}
    if any(v is not None for v in qat.values()):
        if method != "qat":
            raise SqueezeError("--steps / --lr / --start apply to --method qat only")
        params.update({k: v for k, v in qat.items() if v is not None})
    return Recipe([Rule([ALL_LINEARS], scheme_from_dict(spec), method, params, spec)], list(ignore or []),
                  calibration or Calibration())
