"""The distillation loop: AdamW, warmup + cosine/step decay, accumulation, clipping, bf16 autocast,
atomic training checkpoints with `--resume`, and the final student written as a normal checkpoint.

Data, learning rate and teacher targets are pure functions of the step, so a run killed after a
checkpoint and resumed reproduces the uninterrupted loss curve (tested).
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from squeeze.checkpoint.reader import CheckpointReader
from squeeze.checkpoint.writer import check_output_dir
from squeeze.console import console, human_count, make_progress
from squeeze.distill.cache import atomic_save, build_teacher_cache, cache_file
from squeeze.distill.config import DistillConfig
from squeeze.distill.data import step_batch, training_tokens
from squeeze.distill.losses import attention_kd_loss, feature_loss, gram_loss, logit_kd_loss
from squeeze.distill.models import ForwardStates, forward_with_states, freeze, load_causal_lm
from squeeze.distill.schedule import lr_factor
from squeeze.distill.student import heldout_windows, parse_layer_map
from squeeze.errors import SqueezeError
from squeeze.model.decoder import CausalLM
from squeeze.model.tokenizer import TOKENIZER_FILES
from squeeze.model.toy import evaluate_ppl, save_model

STATE_FILE = "train-state.pt"


@dataclass
class TeacherTargets:
    """What the losses compare against, from the live teacher or from the cache."""

    logits: torch.Tensor  # [B, T, V] live, or [B, T, k] cached top-k values
    support: torch.Tensor | None = None  # [B, T, k] token ids of the cached top-k
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # teacher layer -> [B, T, Ht]
    attentions: dict[int, torch.Tensor] = field(default_factory=dict)  # teacher layer -> [B, Ht, T, T]


@dataclass
class DistillResult:
    out: Path
    steps: int
    start_step: int  # > 0 when resumed
    history: list[dict[str, float]]  # per step: total and each part
    seconds: float
    tokens_per_s: float
    heldout_ppl: float  # fp32 student in memory, before the bf16 write; nan when not measured


def state_dir_for(out: Path) -> Path:
    return out.with_name(out.name + ".distill-state")


class Distiller:
    """One run's models, projections and optimizer; `step()` does one optimizer step."""

    def __init__(self, teacher_dir: Path, student_dir: Path, cfg: DistillConfig, state_dir: Path) -> None:
        self.cfg, self.teacher_dir, self.state_dir = cfg, teacher_dir, state_dir
        self.device = torch.device(cfg.device)
        t_cfg = CheckpointReader(teacher_dir).config
        self.student: CausalLM = load_causal_lm(student_dir).to(self.device).train()
        s_cfg = self.student.config
        if s_cfg.vocab_size != t_cfg.vocab_size:
            raise SqueezeError(f"student vocab ({s_cfg.vocab_size}) differs from the teacher's ({t_cfg.vocab_size}): "
                               "make the student with `squeeze student init` from this teacher")
        self.weights = cfg.resolved_weights() if cfg.loss != "ce" else {}
        self.layer_map = parse_layer_map(cfg.layer_map, s_cfg.num_hidden_layers, t_cfg.num_hidden_layers)
        self.needs_hidden = bool({"feature", "gram"} & set(self.weights))
        self.needs_attn = "attention" in self.weights
        self.projections = nn.ModuleDict({
            str(s): (nn.Identity() if s_cfg.hidden_size == t_cfg.hidden_size
                     else nn.Linear(s_cfg.hidden_size, t_cfg.hidden_size, bias=False))
            for s in self.layer_map
        }).to(self.device) if "feature" in self.weights else nn.ModuleDict()
        params = list(self.student.parameters()) + list(self.projections.parameters())
        self.params = params
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        self.tokens = training_tokens(cfg.dataset, student_dir)
        self.teacher: CausalLM | None = None
        self.cache_dir = state_dir / "teacher-cache"
        if cfg.loss != "ce" and not cfg.cache_teacher:
            self.teacher = freeze(load_causal_lm(teacher_dir)).to(self.device)
        bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and self.device.type == "cuda")
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16)

    # ---- teacher ------------------------------------------------------------------------------
    def prepare_cache(self, show_progress: bool) -> None:
        """Run the teacher once over every batch of the run (see `cache.py`)."""
        cfg = self.cfg
        if cfg.loss == "ce" or not cfg.cache_teacher:
            return
        progress = make_progress() if show_progress else None
        task = progress.add_task("teacher cache", total=cfg.steps * cfg.grad_accum, info="") if progress else None

        def on_chunk(done: int, total: int) -> None:
            if progress is not None:
                progress.update(task, completed=done, total=total)

        if progress:
            progress.start()
        try:
            build_teacher_cache(self.teacher_dir, self.cache_dir, self.tokens, cfg.steps, cfg.grad_accum,
                                cfg.batch_size, cfg.seq_len, cfg.seed,
                                sorted(set(self.layer_map.values())) if self.needs_hidden else [],
                                sorted(set(self.layer_map.values())) if self.needs_attn else [],
                                cfg.cache_top_k, on_chunk=on_chunk)
        finally:
            if progress:
                progress.stop()

    @torch.no_grad()
    def teacher_targets(self, inputs: torch.Tensor, step: int, micro: int) -> TeacherTargets:
        t_layers = tuple(sorted(set(self.layer_map.values())))
        if self.teacher is None:  # cached
            d = torch.load(cache_file(self.cache_dir, step, micro), map_location=self.device, weights_only=True)
            return TeacherTargets(d["topk_values"].float(), d["topk_indices"].long(),
                                  {t: d[f"hidden.{t}"].float() for t in t_layers if f"hidden.{t}" in d},
                                  {t: d[f"attn.{t}"].float() for t in t_layers if f"attn.{t}" in d})
        with self.autocast:
            st = forward_with_states(self.teacher, inputs, t_layers if self.needs_attn else (), self.needs_hidden)
        return TeacherTargets(st.logits.float(), None,
                              {t: st.hidden[t].float() for t in t_layers} if self.needs_hidden else {},
                              {t: st.attentions[t] for t in t_layers} if self.needs_attn else {})

    # ---- losses -------------------------------------------------------------------------------
    def loss_parts(self, st: ForwardStates, target: TeacherTargets | None,
                   labels: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        parts = {"ce": F.cross_entropy(st.logits.float().flatten(0, 1), labels.flatten())}
        if target is None:
            return parts
        if "logit" in self.weights:
            parts["logit"] = logit_kd_loss(st.logits, target.logits, cfg.temperature, cfg.kl, cfg.beta, target.support)
        pairs = list(self.layer_map.items())
        if "feature" in self.weights:
            parts["feature"] = sum(
                feature_loss(self.projections[str(s)](st.hidden[s]), target.hidden[t], cfg.feature_kind)
                for s, t in pairs) / len(pairs)
        if "gram" in self.weights:
            parts["gram"] = sum(gram_loss(st.hidden[s], target.hidden[t]) for s, t in pairs) / len(pairs)
        if "attention" in self.weights:
            parts["attention"] = sum(attention_kd_loss(st.attentions[s], target.attentions[t])
                                     for s, t in pairs) / len(pairs)
        return parts

    def total(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        kd = sum((self.weights[k] * v for k, v in parts.items() if k != "ce"), torch.zeros(()))
        return self.cfg.ce_weight * parts["ce"] + (1 - self.cfg.ce_weight) * kd

    def step(self, step: int) -> dict[str, float]:
        cfg = self.cfg
        for group in self.opt.param_groups:
            group["lr"] = cfg.lr * lr_factor(step, cfg.steps, cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio)
        self.opt.zero_grad(set_to_none=True)
        logged: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            ids = step_batch(self.tokens, step, micro, cfg.batch_size, cfg.seq_len, cfg.seed).to(self.device)
            inputs, labels = ids[:, :-1], ids[:, 1:]
            target = self.teacher_targets(inputs, step, micro) if self.weights else None
            s_attn = tuple(self.layer_map) if self.needs_attn else ()
            with self.autocast:
                st = forward_with_states(self.student, inputs, s_attn, self.needs_hidden)
            parts = self.loss_parts(st, target, labels)
            loss = self.total(parts)
            (loss / cfg.grad_accum).backward()
            for k, v in {"loss": loss, **parts}.items():
                logged[k] = logged.get(k, 0.0) + v.item() / cfg.grad_accum
        torch.nn.utils.clip_grad_norm_(self.params, cfg.clip)
        self.opt.step()
        return logged

    # ---- training state -----------------------------------------------------------------------
    def save_state(self, next_step: int, history: list[dict[str, float]]) -> None:
        atomic_save({"step": next_step, "history": history, "config": dataclasses.asdict(self.cfg),
                     "student": self.student.state_dict(), "projections": self.projections.state_dict(),
                     "optimizer": self.opt.state_dict()}, self.state_dir / STATE_FILE)

    def load_state(self) -> tuple[int, list[dict[str, float]]]:
        d = torch.load(self.state_dir / STATE_FILE, map_location=self.device, weights_only=True)
        saved = {k: v for k, v in d["config"].items() if k != "steps"}
        now = {k: v for k, v in dataclasses.asdict(self.cfg).items() if k != "steps"}
        diff = sorted(k for k in now if saved.get(k) != now[k] and not (k == "betas" and tuple(saved[k]) == now[k]))
        if diff:
            raise SqueezeError(f"--resume with different settings than the saved run: {', '.join(diff)}")
        self.student.load_state_dict(d["student"])
        self.projections.load_state_dict(d["projections"])
        self.opt.load_state_dict(d["optimizer"])
        return int(d["step"]), list(d["history"])


def _info(logged: dict[str, float], tok_s: float) -> str:
    parts = " ".join(f"{k} {v:.3f}" for k, v in logged.items() if k != "loss")
    return f"loss {logged['loss']:.3f} ({parts}) {human_count(tok_s)} tok/s"


def run_distill(teacher: str | Path, student: str | Path, out: str | Path, cfg: DistillConfig, resume: bool = False,
                overwrite: bool = False, show_progress: bool = False, keep_state: bool = False,
                on_step: Callable[[int, dict[str, float]], None] | None = None,
                eval_windows: int = 64) -> DistillResult:
    """Distill `teacher` into the checkpoint at `student`; write the trained student to `out`."""
    teacher, student = Path(teacher), Path(student)
    for d, what in ((teacher, "teacher"), (student, "student")):
        if not (d / "config.json").is_file():
            raise SqueezeError(f"{what} {d} is not a checkpoint (no config.json)")
    out = check_output_dir(out, overwrite)
    state_dir = state_dir_for(out)
    if (state_dir / STATE_FILE).exists() and not resume:
        if not overwrite:
            raise SqueezeError(f"training state from an earlier run is at {state_dir}: "
                               "pass --resume to continue it or --overwrite to start over")
        shutil.rmtree(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    run = Distiller(teacher, student, cfg, state_dir)
    start, history = 0, []
    if resume and (state_dir / STATE_FILE).exists():
        start, history = run.load_state()
        history = history[:start]
        if show_progress:
            console.print(f"resuming at step {start}/{cfg.steps}")
    run.prepare_cache(show_progress)

    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum
    progress = make_progress() if show_progress else None
    task = progress.add_task(f"distill ({cfg.loss})", total=cfg.steps, completed=start, info="") if progress else None
    t0 = time.perf_counter()
    if progress:
        progress.start()
    try:
        for step in range(start, cfg.steps):
            logged = run.step(step)
            history.append(logged)
            done = step + 1
            if done % cfg.checkpoint_every == 0 and done < cfg.steps:
                run.save_state(done, history)
            tok_s = tokens_per_step * (done - start) / max(1e-9, time.perf_counter() - t0)
            if progress:
                progress.update(task, completed=done, info=_info(logged, tok_s))
            if on_step is not None:
                on_step(step, logged)
    finally:
        if progress:
            progress.stop()
    seconds = time.perf_counter() - t0
    if not all(math.isfinite(v) for v in history[-1].values()):
        raise SqueezeError("training diverged (non-finite loss); lower --lr or --temperature")
    ppl = float("nan")  # eval_windows=0 skips the held-out check (tests tokenise less)
    if eval_windows:
        ppl = evaluate_ppl(run.student, heldout_windows(student, cfg.seq_len, eval_windows).to(run.device))
    tok_dir = student if all((student / f).exists() for f in TOKENIZER_FILES) else teacher
    save_model(run.student.cpu(), out, tok_dir, overwrite=overwrite)
    if not keep_state:
        shutil.rmtree(state_dir, ignore_errors=True)
    return DistillResult(out, cfg.steps, start, history, seconds,
                         tokens_per_step * (cfg.steps - start) / max(1e-9, seconds), ppl)

