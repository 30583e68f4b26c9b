"""Scale folding shared by AWQ and SmoothQuant: move a per-channel scale between two adjacent ops.

For a channel scale s > 0, y = W·x = (W·diag(s))·(x / s). If x is produced by an op we may rescale
(an RMSNorm's weight, or the output rows of a previous Linear), dividing that op's output by s and
multiplying the consumer Linears' input columns by s leaves the float model exactly the same, while the
quantizers see different numbers: AWQ picks s to protect salient input channels of the weights,
SmoothQuant to move activation outliers into the weights.

`fold_groups` lists the foldable groups of a DeepSeek decoder layer (`FoldGroup`):

    input_layernorm          -> q_a_proj (or q_proj) + kv_a_proj_with_mqa      inspected: self_attn
    q_a_layernorm            -> q_b_proj                                        inspected: q_b_proj
    kv_a_layernorm           -> kv_b_proj                                       inspected: kv_b_proj
    kv_b_proj (value rows)   -> o_proj                                          inspected: o_proj
    post_attention_layernorm -> every expert's + the shared expert's gate/up    inspected: mlp
                                (and the router `mlp.gate`, compensated only)
                                or the dense MLP's gate_proj/up_proj
    up_proj                  -> down_proj (each expert, the shared expert, the dense MLP)

The value rows -> o_proj fold is exact because attention is linear in V (softmax weights do not
depend on V); it is the MLA counterpart of AutoAWQ's v_proj -> o_proj. The router is not quantized, but
it reads the same normalised hidden state as the experts, so its columns are multiplied by s as well:
its logits, and so the choice of experts, stay unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from squeeze.errors import SqueezeError
from squeeze.model.moe import MoE
from squeeze.model.norm import RMSNorm
from squeeze.quant.calibration import LayerCalibration, check_finite


@dataclass
class FoldGroup:
    """One fold: `prev`'s output channels (or `prev_rows` of a Linear) are divided by s, the input columns
    of `linears` (quantized consumers) and of `compensate` (unquantized ones: the router) multiplied by s."""

    key: str
    prev: str
    linears: list[str]
    inspect: str  # module whose output measures the group's error (AWQ's "module to inspect")
    compensate: list[str] = field(default_factory=list)
    prev_rows: torch.Tensor | None = None  # rows of a Linear `prev` that produce the scaled channels
    expert: int | None = None  # routed expert index: its search tokens are the ones routed to it
    ffn: str | None = None  # the SwiGLU block a down_proj group belongs to (its inputs are computed)

    def touched(self, layer: nn.Module) -> list[str]:
        """Linears whose weights the fold changes (quantization targets or not), the router excluded."""
        prev_is_linear = isinstance(layer.get_submodule(self.prev), nn.Linear)
        return ([self.prev] if prev_is_linear else []) + self.linears


def _down_group(prefix: str, expert: int | None) -> FoldGroup:
    return FoldGroup(f"{prefix}.down", f"{prefix}.up_proj", [f"{prefix}.down_proj"], f"{prefix}.down_proj",
                     expert=expert, ffn=prefix)


def fold_groups(layer: nn.Module, value_to_output: bool = True) -> list[FoldGroup]:
    """The fold groups of one DeepSeek decoder layer, in the order they should be searched."""
    attn = layer.self_attn
    groups: list[FoldGroup] = []
    q_in = "self_attn.q_proj" if hasattr(attn, "q_proj") else "self_attn.q_a_proj"
    groups.append(FoldGroup("attn_in", "input_layernorm", [q_in, "self_attn.kv_a_proj_with_mqa"], "self_attn"))
    if hasattr(attn, "q_a_layernorm"):
        groups.append(FoldGroup("q_b", "self_attn.q_a_layernorm", ["self_attn.q_b_proj"], "self_attn.q_b_proj"))
    groups.append(FoldGroup("kv_b", "self_attn.kv_a_layernorm", ["self_attn.kv_b_proj"], "self_attn.kv_b_proj"))
    if value_to_output:
        per_head = attn.nope_dim + attn.v_dim
        rows = torch.cat([h * per_head + attn.nope_dim + torch.arange(attn.v_dim) for h in range(attn.n_heads)])
        groups.append(FoldGroup("v_o", "self_attn.kv_b_proj", ["self_attn.o_proj"], "self_attn.o_proj",
                                prev_rows=rows))
    mlp = layer.mlp
    if isinstance(mlp, MoE):
        linears = [f"mlp.experts.{e}.{p}" for e in range(len(mlp.experts)) for p in ("gate_proj", "up_proj")]
        if mlp.shared_experts is not None:
            linears += ["mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj"]
        groups.append(FoldGroup("mlp_in", "post_attention_layernorm", linears, "mlp", compensate=["mlp.gate"]))
        groups += [_down_group(f"mlp.experts.{e}", e) for e in range(len(mlp.experts))]
        if mlp.shared_experts is not None:
            groups.append(_down_group("mlp.shared_experts", None))
    else:
        groups.append(FoldGroup("mlp_in", "post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"], "mlp"))
        groups.append(_down_group("mlp", None))
    return groups


def check_scale(scale: torch.Tensor, width: int, what: str) -> None:
    if scale.shape != (width,):
        raise SqueezeError(f"{what}: scale has shape {list(scale.shape)}, expected [{width}]")
    if not torch.isfinite(scale).all() or (scale <= 0).any():
        raise SqueezeError(f"{what}: scales must be finite and positive (the calibration activations or the "
                           "weights are degenerate)")


@torch.no_grad()
def apply_fold(layer: nn.Module, group: FoldGroup, scale: torch.Tensor) -> None:
    """Fold `scale` into the layer in place: the float layer computes the same function afterwards."""
    s = scale.detach().float()
    prev = layer.get_submodule(group.prev)
    if isinstance(prev, RMSNorm):
        check_scale(s, prev.weight.shape[0], group.key)
        prev.weight.div_(s.to(prev.weight.dtype))
    elif isinstance(prev, nn.Linear):
        rows = group.prev_rows if group.prev_rows is not None else torch.arange(prev.out_features)
        check_scale(s, rows.numel(), group.key)
        prev.weight[rows] /= s[:, None].to(prev.weight.dtype)
        if prev.bias is not None:
            prev.bias[rows] /= s.to(prev.bias.dtype)
    else:
        raise SqueezeError(f"cannot fold a scale into {group.prev} ({type(prev).__name__})")
    for name in group.linears + group.compensate:
        w = layer.get_submodule(name).weight
        w.mul_(s.to(w.dtype))


def scale_hessian(h: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """H = XᵀX of inputs x becomes that of x / s: diag(1/s) H diag(1/s)."""
    inv = 1.0 / scale.double()
    return (h.double() * inv[:, None] * inv[None, :]).to(h.dtype)


def inject_outliers(layer: nn.Module, channels: torch.Tensor, factor: float = 64.0,
                    keys: tuple[str, ...] = ("attn_in", "mlp_in")) -> None:
    """Make `channels` of the given groups' inputs `factor` times larger, the consumers' columns smaller.

    The float layer is unchanged (a fold with s = 1/factor on those channels) and a power-of-two factor
    keeps it unchanged even in bf16; activation quantizers now see outlier channels, as in real LLMs.
    Used by the SmoothQuant tests and study.
    """
    for g in fold_groups(layer):
        if g.key not in keys:
            continue
        width = layer.get_submodule(g.prev).weight.shape[0]
        s = torch.ones(width)
        s[channels] = 1.0 / factor
        apply_fold(layer, g, s)


# ---- searching a fold's scale on calibration data ----------------------------------------------------
WeightFn = Callable[[str, torch.Tensor], torch.Tensor]


@contextmanager
def _patched(layer: nn.Module, weights: dict[str, torch.Tensor],
             act_quant: dict[str, Callable[[torch.Tensor], torch.Tensor]]) -> Iterator[None]:
    """Temporarily give submodules other weights (and quantize their inputs); restored on exit."""
    saved = {}
    hooks = []
    try:
        for name, w in weights.items():
            p = layer.get_submodule(name).weight
            saved[name] = p.data
            p.data = w
        for name, fn in act_quant.items():
            hooks.append(layer.get_submodule(name).register_forward_pre_hook(
                lambda _m, a, fn=fn: (fn(a[0]), *a[1:])))
        yield
    finally:
        for h in hooks:
            h.remove()
        for name, data in saved.items():
            layer.get_submodule(name).weight.data = data


class LayerFolds:
    """The calibration inputs of a layer's fold groups, and the error a candidate scale gives each group.

    The inputs of every inspected module are captured in one pass with true routing (the inspected
    modules' outputs then are what the next layer really receives). A down_proj group's inputs are
    computed on demand from the MoE input: a routed expert's are the tokens the router sends it (with
    fewer than `min_tokens` of them, every token, as the pipeline's observers do), a dense or shared
    MLP's are all tokens. Folding a group divides its stored inputs by s, so later groups and the
    Hessians stay consistent with the folded weights.
    """

    def __init__(self, layer: nn.Module, calib: LayerCalibration, groups: list[FoldGroup],
                 min_tokens: int = 16) -> None:
        self.layer, self.calib, self.min_tokens = layer, calib, min_tokens
        want = {g.inspect for g in groups if g.ffn is None} | {"mlp"}
        self.inputs: dict[str, list[tuple]] = {n: [] for n in want}
        hooks = [layer.get_submodule(n).register_forward_pre_hook(
            lambda _m, a, n=n: self.inputs[n].append(tuple(x.detach() if torch.is_tensor(x) else x for x in a)))
            for n in want]
        try:
            calib.run(layer, observe_all_experts=False)
        finally:
            for h in hooks:
                h.remove()
        for n, batches in self.inputs.items():
            for j, a in enumerate(batches):
                check_finite(a[0], f"the input of {n} (batch {j})")
        self._routes: torch.Tensor | None = None

    # ---- inputs ------------------------------------------------------------------------------------
    def _mlp_tokens(self) -> torch.Tensor:
        return torch.cat([a[0].reshape(-1, a[0].shape[-1]) for a in self.inputs["mlp"]])

    def routed_tokens(self, expert: int) -> torch.Tensor | None:
        """Indices (into the flattened MoE input) of the tokens routed to `expert`; None = too few, use all."""
        if self._routes is None:
            with torch.no_grad():
                self._routes = self.layer.mlp.gate(self._mlp_tokens())[1]
        tok = torch.where((self._routes == expert).any(dim=-1))[0]
        return tok if tok.numel() >= self.min_tokens else None

    def ffn_input(self, ffn: str, expert: int | None) -> torch.Tensor:
        """The [n, D] input of one SwiGLU block (expert: its routed tokens)."""
        x = self._mlp_tokens()
        if expert is not None:
            tok = self.routed_tokens(expert)
            if tok is not None:
                x = x[tok]
        return x

    @torch.no_grad()
    def group_inputs(self, g: FoldGroup) -> list[tuple]:
        """Argument tuples of `g.inspect` for every batch, in the current (folded) weights' basis."""
        if g.ffn is None:
            return self.inputs[g.inspect]
        mlp = self.layer.get_submodule(g.ffn)
        x = self.ffn_input(g.ffn, g.expert)
        return [(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x),)]

    def channel_stats(self, g: FoldGroup) -> tuple[torch.Tensor, torch.Tensor]:
        """Per input channel mean |x| and max |x| over the group's tokens (fp32)."""
        total, amax, count = None, None, 0
        for a in self.group_inputs(g):
            x = a[0].reshape(-1, a[0].shape[-1]).abs().double()
            s, m = x.sum(0), x.amax(0)
            total = s if total is None else total + s
            amax = m if amax is None else torch.maximum(amax, m)
            count += x.shape[0]
        assert total is not None and amax is not None
        return (total / max(count, 1)).float(), amax.float()

    @torch.no_grad()
    def mlp_hessian(self, linear: str) -> torch.Tensor:
        """XᵀX of an MLP-block Linear's inputs in the current basis (routed experts: routed tokens only)."""
        ffn, _, proj = linear.rpartition(".")
        x = self.ffn_input(ffn, _expert_of(linear))
        if proj == "down_proj":
            mlp = self.layer.get_submodule(ffn)
            x = F.silu(mlp.gate_proj(x)) * mlp.up_proj(x)
        x = x.float()
        return x.T @ x

    # ---- search -----------------------------------------------------------------------------------
    @torch.no_grad()
    def outputs(self, g: FoldGroup, inputs: list[tuple], scale: torch.Tensor | None = None,
                weight_fn: WeightFn | None = None,
                act_quant: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None) -> list[torch.Tensor]:
        """`g.inspect`'s outputs with the group's consumers scaled by `scale` and passed through
        `weight_fn(name, weight)` (quantize-dequantize), inputs divided by `scale`."""
        module = self.layer.get_submodule(g.inspect)
        weights: dict[str, torch.Tensor] = {}
        if scale is not None or weight_fn is not None:
            s = torch.ones(1) if scale is None else scale
            for name in g.linears + g.compensate:
                w = self.layer.get_submodule(name).weight.data * s
                weights[name] = weight_fn(name, w) if weight_fn is not None and name in g.linears else w
        with _patched(self.layer, weights, act_quant or {}):
            return [module(a[0] if scale is None else a[0] / scale, *a[1:]) for a in inputs]

    def error(self, g: FoldGroup, inputs: list[tuple], reference: list[torch.Tensor], scale: torch.Tensor | None,
              weight_fn: WeightFn, act_quant: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
              ) -> float:
        """Mean squared error of the inspected module's output against `reference`."""
        outs = self.outputs(g, inputs, scale, weight_fn, act_quant)
        num = sum(float((o.float() - r.float()).pow(2).sum()) for o, r in zip(outs, reference, strict=True))
        return num / max(sum(r.numel() for r in reference), 1)

    @torch.no_grad()
    def apply(self, g: FoldGroup, scale: torch.Tensor, prefix: str) -> None:
        """Fold `scale` into the layer; keep stored inputs and the pipeline's Hessians consistent."""
        apply_fold(self.layer, g, scale)
        if g.ffn is None:
            self.inputs[g.inspect] = [(a[0] / scale, *a[1:]) for a in self.inputs[g.inspect]]
        for name in g.linears:
            st = self.calib.stats.get(prefix + name)
            if st is not None:
                st.hessian = scale_hessian(st.hessian, scale)


def _expert_of(linear: str) -> int | None:
    parts = linear.split(".")
    return int(parts[2]) if len(parts) > 2 and parts[1] == "experts" else None


def usable_groups(layer: nn.Module, groups: list[FoldGroup], mine: set[str], others: set[str]) -> list[FoldGroup]:
    """Groups a method may fold: some consumer is its target and no touched Linear belongs to another
    method (which may already have chosen that Linear's numbers). Local names."""
    return [g for g in groups
            if any(n in mine for n in g.linears) and not any(n in others for n in g.touched(layer))]
