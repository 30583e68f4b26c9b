"""`squeeze eval --suite compression`: quantize a model into the standard variants and evaluate them all.

Quantization lives in `squeeze.quant` and grows method by method; `VARIANTS` names each standard
variant with the adapter call that makes it, and a variant whose method is not available yet is
skipped with a note instead of failing the whole study.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Variant:
    name: str          # row label in the recovery table
    method: str        # squeeze.quant method name (or "fp8-block")
    options: dict      # keyword arguments for squeeze.api.quantize


VARIANTS = (
    Variant("W8A8-FP8-block", "fp8-block", {}),
    Variant("W8A8-INT8", "smoothquant", {"scheme": "W8A8"}),
    Variant("W4A16-GPTQ", "gptq", {"bits": 4, "group_size": 128}),
    Variant("W4A16-AWQ", "awq", {"bits": 4, "group_size": 128}),
)
SUITES = {"compression": VARIANTS}


def available_methods() -> set[str]:
    """Quantization methods that exist in this build (the quant package may still be landing)."""
    try:
        from squeeze.quant.methods import known_methods
    except ImportError:
        return set()
    return set(known_methods()) | {"fp8-block"}


def quantize_variant(base: Path, out: Path, variant: Variant) -> None:
    """The adapter to `squeeze.api.quantize`; the one place that knows its signature."""
    from squeeze import api

    api.quantize(base, out, method=variant.method, overwrite=True, **variant.options)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # evaluation needs the tokenizer next to it
        if (base / name).is_file() and not (out / name).exists():
            shutil.copy2(base / name, out / name)


def build_variants(base: Path, workdir: Path, suite: str = "compression",
                   quantize: Callable[[Path, Path, Variant], None] = quantize_variant,
                   methods: set[str] | None = None,
                   note: Callable[[str], None] = print) -> list[tuple[str, Path]]:
    """Make each available variant of `suite` under `workdir` (reusing finished ones); skip the rest."""
    from squeeze.errors import SqueezeError

    if suite not in SUITES:
        raise SqueezeError(f"unknown suite '{suite}' (one of {', '.join(SUITES)})")
    methods = available_methods() if methods is None else methods
    made = []
    for v in SUITES[suite]:
        if v.method not in methods:
            note(f"skipping {v.name}: quantization method '{v.method}' is not available in this build yet")
            continue
        out = workdir / v.name
        if not (out / "config.json").is_file():
            note(f"quantizing {v.name} ({v.method})")
            try:
                quantize(base, out, v)
            except (NotImplementedError, SqueezeError) as e:
                note(f"skipping {v.name}: {e}")
                continue
        made.append((v.name, out))
    return made
