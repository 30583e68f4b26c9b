"""Dense student construction from a MoE teacher (`squeeze student init`).

The student is a DeepSeek-V3 config with `first_k_dense_replace = num_hidden_layers`: every layer
is a dense MLP, yet it is still `model_type: deepseek_v3`, so transformers' DeepseekV3ForCausalLM,
our LayerwiseModel and every squeeze tool (perplexity, quantize, eval) take it unchanged, and the
teacher's MLA attention can be copied tensor for tensor. A Llama config would have needed a second
model implementation and a renaming table, and could not hold MLA weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from squeeze.checkpoint.config import ModelConfig, parse_config
from squeeze.checkpoint.reader import CheckpointReader
from squeeze.checkpoint.writer import check_output_dir
from squeeze.data import corpus_text, token_windows
from squeeze.distill.models import count_parameters, load_causal_lm
from squeeze.errors import SqueezeError
from squeeze.model.decoder import CausalLM
from squeeze.model.moe import MLP, MoE
from squeeze.model.tokenizer import TOKENIZER_FILES, load_tokenizer
from squeeze.model.toy import evaluate_ppl, init_model, save_model

INIT_KINDS = ("random", "teacher")


def student_config(teacher: ModelConfig, layers: int, hidden: int, ffn: int) -> dict[str, Any]:
    """config.json of a dense student: the teacher's fields, its sizes, every layer dense."""
    if layers < 1 or hidden < 1 or ffn < 1:
        raise SqueezeError("--layers, --hidden and --ffn must be positive")
    if hidden % 2:
        raise SqueezeError("--hidden must be even")
    cfg = dict(teacher.to_dict())
    for key in ("squeeze_toy_spec", "quantization_config"):
        cfg.pop(key, None)
    cfg.update(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=ffn,
               first_k_dense_replace=layers, num_nextn_predict_layers=0, torch_dtype="bfloat16")
    return cfg


def default_layer_map(student_layers: int, teacher_layers: int) -> dict[int, int]:
    """Student layer i <- teacher layer spaced evenly, the last student layer always the last teacher one."""
    return {i: round((i + 1) * teacher_layers / student_layers) - 1 for i in range(student_layers)}


def parse_layer_map(text: str | None, student_layers: int, teacher_layers: int) -> dict[int, int]:
    """'0:1,1:3' (student:teacher) -> {0: 1, 1: 3}; None -> evenly spaced."""
    if not text:
        return default_layer_map(student_layers, teacher_layers)
    out: dict[int, int] = {}
    try:
        for part in text.split(","):
            s, t = (int(x) for x in part.split(":"))
            out[s] = t
    except ValueError:
        raise SqueezeError(f"--layer-map {text!r}: expected student:teacher pairs like 0:1,1:3") from None
    for s, t in out.items():
        if not (0 <= s < student_layers and 0 <= t < teacher_layers):
            raise SqueezeError(f"--layer-map pair {s}:{t} is out of range "
                               f"(student has {student_layers} layers, teacher {teacher_layers})")
    return out


@torch.no_grad()
def expert_usage(teacher: CausalLM, windows: torch.Tensor) -> dict[int, torch.Tensor]:
    """Per MoE layer: mean routing weight each expert receives per token (0 where not chosen)."""
    usage: dict[int, torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(teacher.model.layers):
        if isinstance(layer.mlp, MoE):
            n = len(layer.mlp.experts)
            usage[i] = torch.zeros(n)

            def hook(_mod: torch.nn.Module, _inp: Any, out: tuple[torch.Tensor, torch.Tensor], i: int = i,
                     n: int = n) -> None:
                weights, idx = out
                usage[i] += torch.zeros(n).index_add_(0, idx.flatten(), weights.flatten().float()) / idx.shape[0]

            hooks.append(layer.mlp.gate.register_forward_hook(hook))
    for ids in windows.split(8):
        teacher(ids)
    for h in hooks:
        h.remove()
    return {i: u / max(1, len(windows.split(8))) for i, u in usage.items()}


def merged_ffn(mlp: torch.nn.Module, width: int, usage: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """A dense SwiGLU of `width` neurons from a teacher MLP or MoE (shared expert + routed experts).

    Every expert neuron is a (gate row, up row, down column) triple; a MoE's output is the shared
    expert plus usage-weighted routed experts, so scaling each routed neuron's down column by its
    expert's mean routing weight gives one dense FFN whose output is the expectation of the MoE's
    (exact for the shared part). We keep the `width` neurons of largest expected contribution
    (weight × ‖up row‖ × ‖down column‖), so a narrow student keeps the teacher's busiest neurons.
    """
    parts: list[tuple[MLP, float]] = []
    if isinstance(mlp, MoE):
        if mlp.shared_experts is not None:
            parts.append((mlp.shared_experts, 1.0))
        assert usage is not None
        parts += [(e, float(u)) for e, u in zip(mlp.experts, usage, strict=True)]
    else:
        parts.append((mlp, 1.0))
    gate = torch.cat([p.gate_proj.weight for p, _ in parts])
    up = torch.cat([p.up_proj.weight for p, _ in parts])
    down = torch.cat([p.down_proj.weight * w for p, w in parts], dim=1)
    score = up.norm(dim=1) * gate.norm(dim=1) * down.norm(dim=0)
    keep = score.topk(min(width, score.numel())).indices.sort().values
    gate, up, down = gate[keep], up[keep], down[:, keep]
    if width > keep.numel():  # wider than the teacher's pool: pad with zero-output neurons
        extra = width - keep.numel()
        std = gate.std().item()
        gate = torch.cat([gate, torch.randn(extra, gate.shape[1]) * std])
        up = torch.cat([up, torch.randn(extra, up.shape[1]) * std])
        down = torch.cat([down, torch.zeros(down.shape[0], extra)], dim=1)
    return {"gate_proj.weight": gate, "up_proj.weight": up, "down_proj.weight": down}


def init_from_teacher(student: CausalLM, teacher: CausalLM, layer_map: dict[int, int],
                      usage: dict[int, torch.Tensor]) -> None:
    """Copy embeddings, head, final norm, and for each student layer its mapped teacher layer's
    attention + norms and a merged FFN. Needs the teacher's width (nothing else would fit)."""
    if student.config.hidden_size != teacher.config.hidden_size:
        raise SqueezeError(f"--init teacher needs --hidden {teacher.config.hidden_size} (the teacher's width); "
                           "use --init random for a narrower student")
    sd = {k: v for k, v in teacher.state_dict().items() if not k.startswith("model.layers.")}
    for s, t in layer_map.items():
        tl = teacher.model.layers[t]
        for name, v in tl.state_dict().items():
            if not name.startswith("mlp."):
                sd[f"model.layers.{s}.{name}"] = v
        for name, v in merged_ffn(tl.mlp, student.config.intermediate_size, usage.get(t)).items():
            sd[f"model.layers.{s}.mlp.{name}"] = v
    missing, unexpected = student.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected


@dataclass
class StudentReport:
    config: dict[str, Any]
    params: int  # non-embedding
    embedding_params: int
    teacher_active_params: int  # non-embedding, top-k experts only
    teacher_embedding_params: int
    perplexity: float  # held-out, right after init
    layer_map: dict[int, int]


def heldout_windows(checkpoint: Path, seq_len: int = 128, num: int = 64) -> torch.Tensor:
    tok = load_tokenizer(checkpoint)
    return token_windows(tok.encode(corpus_text("heldout")).ids, seq_len, num)


def build_student(teacher_dir: str | Path, layers: int, hidden: int, ffn: int, init: str = "random",
                  layer_map: str | None = None, seed: int = 0,
                  usage_windows: int = 32) -> tuple[CausalLM, dict[int, int]]:
    """The student model in memory (see `init_student` for the on-disk version)."""
    if init not in INIT_KINDS:
        raise SqueezeError(f"--init must be one of {', '.join(INIT_KINDS)}, got {init!r}")
    reader = CheckpointReader(teacher_dir)
    config = parse_config(student_config(reader.config, layers, hidden, ffn))
    lmap = parse_layer_map(layer_map, layers, reader.config.num_hidden_layers)
    student = init_model(config, seed)
    if init == "teacher":
        if hidden != reader.config.hidden_size:
            raise SqueezeError(f"--init teacher needs --hidden {reader.config.hidden_size} (the teacher's width); "
                               "use --init random for a narrower student")
        teacher = load_causal_lm(reader).eval()
        tok = load_tokenizer(teacher_dir)
        calib = token_windows(tok.encode(corpus_text("calibration")).ids, 128, usage_windows, seed=seed)
        init_from_teacher(student, teacher, lmap, expert_usage(teacher, calib))
    return student, lmap


def init_student(teacher_dir: str | Path, out: str | Path, layers: int, hidden: int, ffn: int,
                 init: str = "random", layer_map: str | None = None, seed: int = 0,
                 overwrite: bool = False) -> StudentReport:
    """Write a dense student of the given shape next to the teacher's tokenizer; report its perplexity."""
    teacher_dir = Path(teacher_dir)
    for f in TOKENIZER_FILES:
        if not (teacher_dir / f).exists():
            raise SqueezeError(f"teacher {teacher_dir} has no {f}: the student shares the teacher's tokenizer")
    out = check_output_dir(out, overwrite)
    student, lmap = build_student(teacher_dir, layers, hidden, ffn, init, layer_map, seed)
    ppl = evaluate_ppl(student, heldout_windows(teacher_dir))
    save_model(student, out, teacher_dir, overwrite=overwrite)
    params, embed = count_parameters(student.config, student)
    with torch.device("meta"):
        t = CausalLM(CheckpointReader(teacher_dir).config)
    t_params, t_embed = count_parameters(t.config, t)
    return StudentReport(student.config.to_dict(), params, embed, t_params, t_embed, ppl, lmap)


__all__ = ["INIT_KINDS", "StudentReport", "build_student", "default_layer_map", "init_student",
           "merged_ffn", "parse_layer_map", "student_config"]
