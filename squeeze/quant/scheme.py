"""Schemes: how numbers are stored (bits, int/float, per-channel / per-group / per-block, symmetry).

A `QuantScheme` is squeeze's own small dataclass; `to_ct()` turns it into compressed-tensors'
`QuantizationScheme` so the exported `quantization_config` is written by that package's models (what
vLLM and transformers parse), never by hand. The names in `PRESETS` are the ones recipes and the CLI use.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from squeeze.errors import SqueezeError

Strategy = Literal["channel", "group", "block", "token", "tensor"]


@dataclass(frozen=True)
class QuantArgs:
    """One tensor's quantization: `int` or `float` (fp8 e4m3), bits, granularity, symmetry, dynamic."""

    num_bits: int = 4
    type: Literal["int", "float"] = "int"
    strategy: Strategy = "group"
    group_size: int | None = 128
    block_structure: tuple[int, int] | None = None
    symmetric: bool = True
    dynamic: bool = False

    def __post_init__(self) -> None:
        if self.type == "int" and not 2 <= self.num_bits <= 8:  # 3-bit: AWQ/QAT studies (pack-quantized)
            raise SqueezeError(f"unsupported integer width {self.num_bits} bits (use 2 to 8; 4 and 8 have kernels)")
        if self.type == "float" and self.num_bits != 8:
            raise SqueezeError("float quantization is fp8 (e4m3): num_bits must be 8")
        if self.strategy == "group" and (self.group_size is None or self.group_size <= 0):
            raise SqueezeError(f"group strategy needs a positive group size, got {self.group_size}")
        if self.strategy == "block" and self.block_structure is None:
            raise SqueezeError("block strategy needs a block_structure such as [128, 128]")

    @property
    def qmin(self) -> int:
        return -(1 << (self.num_bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.num_bits - 1)) - 1

    def describe(self) -> str:
        kind = f"{'int' if self.type == 'int' else 'fp'}{self.num_bits}"
        gran = {"group": f"g{self.group_size}", "block": "block{}x{}".format(*(self.block_structure or (0, 0))),
                "channel": "per-channel", "token": "per-token", "tensor": "per-tensor"}[self.strategy]
        return f"{kind} {gran}{'' if self.symmetric else ' asym'}{' dynamic' if self.dynamic else ''}"

    def to_ct(self) -> Any:
        from compressed_tensors.quantization import QuantizationArgs

        return QuantizationArgs(num_bits=self.num_bits, type=self.type, strategy=self.strategy,
                                group_size=self.group_size if self.strategy == "group" else None,
                                block_structure=list(self.block_structure) if self.block_structure else None,
                                symmetric=self.symmetric, dynamic=self.dynamic)


@dataclass(frozen=True)
class QuantScheme:
    """Weights (always) and input activations (None = weight-only, A16) of one Linear."""

    weights: QuantArgs
    input_activations: QuantArgs | None = None

    @property
    def ct_format(self) -> str:
        """compressed-tensors format of the stored weight (pack-quantized int4, int-quantized, float-quantized)."""
        if self.weights.type == "float":
            return "float-quantized"
        if self.input_activations is None:  # weight-only int (W4A16, W8A16): packed int32, as llm-compressor
            return "pack-quantized"
        return "int-quantized"

    @property
    def is_fp8_block(self) -> bool:
        return self.weights.type == "float" and self.weights.strategy == "block"

    def describe(self) -> str:
        act = "A16" if self.input_activations is None else f"A: {self.input_activations.describe()}"
        return f"W: {self.weights.describe()}, {act}"

    def to_ct(self, targets: list[str]) -> Any:
        from compressed_tensors.quantization import QuantizationScheme

        return QuantizationScheme(targets=targets, weights=self.weights.to_ct(),
                                  input_activations=self.input_activations.to_ct() if self.input_activations else None,
                                  format=self.ct_format)

    def with_weights(self, **changes: Any) -> QuantScheme:
        return dataclasses.replace(self, weights=dataclasses.replace(self.weights, **changes))


def _w(bits: int, group: int | None, symmetric: bool = True) -> QuantArgs:
    if group is None or group == -1:
        return QuantArgs(num_bits=bits, strategy="channel", group_size=None, symmetric=symmetric)
    return QuantArgs(num_bits=bits, strategy="group", group_size=group, symmetric=symmetric)


PER_TOKEN_INT8 = QuantArgs(num_bits=8, strategy="token", group_size=None, symmetric=True, dynamic=True)
PER_TOKEN_FP8 = QuantArgs(num_bits=8, type="float", strategy="token", group_size=None, dynamic=True)
FP8_BLOCK_WEIGHTS = QuantArgs(num_bits=8, type="float", strategy="block", group_size=None, block_structure=(128, 128))
FP8_GROUP_ACTS = QuantArgs(num_bits=8, type="float", strategy="group", group_size=128, dynamic=True)

PRESETS: dict[str, QuantScheme] = {
    "W4A16": QuantScheme(_w(4, 128)),
    "W4A16_ASYM": QuantScheme(_w(4, 128, symmetric=False)),
    "W8A16": QuantScheme(_w(8, None)),
    "W8A8_INT8": QuantScheme(_w(8, None), PER_TOKEN_INT8),
    "W8A8_FP8": QuantScheme(QuantArgs(num_bits=8, type="float", strategy="channel", group_size=None), PER_TOKEN_FP8),
    "FP8_BLOCK": QuantScheme(FP8_BLOCK_WEIGHTS, FP8_GROUP_ACTS),
}


def preset(name: str) -> QuantScheme:
    key = name.upper().replace("-", "_")
    if key not in PRESETS:
        raise SqueezeError(f"unknown scheme {name!r} (known: {', '.join(PRESETS)})")
    return PRESETS[key]


def scheme_from_dict(d: dict[str, Any] | str) -> QuantScheme:
    """A scheme from a recipe entry: a preset name, or {preset: ..., bits/group_size/symmetric overrides}
    or a full {weights: {...}, input_activations: {...}} spelling."""
    if isinstance(d, str):
        return preset(d)
    d = dict(d)
    if "weights" in d:
        acts = d.get("input_activations")
        return QuantScheme(_args(d["weights"]), _args(acts) if acts else None)
    base = preset(d.pop("preset", "W4A16"))
    overrides: dict[str, Any] = {}
    if "bits" in d:
        overrides["num_bits"] = int(d.pop("bits"))
    if "group_size" in d:
        g = d.pop("group_size")
        overrides.update(strategy="channel", group_size=None) if g in (None, -1) else overrides.update(
            strategy="group", group_size=int(g))
    if "symmetric" in d:
        overrides["symmetric"] = bool(d.pop("symmetric"))
    if d:
        raise SqueezeError(f"unknown scheme field(s): {', '.join(sorted(d))}")
    return base.with_weights(**overrides) if overrides else base


def _args(d: dict[str, Any]) -> QuantArgs:
    d = dict(d)
    if "block_structure" in d and d["block_structure"] is not None:
        d["block_structure"] = tuple(d["block_structure"])
    try:
        return QuantArgs(**d)
    except TypeError as e:
        raise SqueezeError(f"bad quantization args {d}: {e}") from None
