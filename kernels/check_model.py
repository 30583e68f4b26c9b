"""GPU model parity: a quantized toy model's logits on CUDA (Triton kernels) vs its CPU fake-quant logits.

    python -m squeeze.kernels.check_model [--tol 2e-2] [--batch 2 --seq 32] [--checkpoint TRAINED_TOY]

Why this exists: the kernel tests compare each op with its reference in isolation; this checks the
whole chain a user runs. For each scheme (W4A16 g128 by RTN, DeepSeek block-FP8, W8A8-INT8 by RTN) it
builds a small random toy (every K a multiple of 128), quantizes it on the CPU with squeeze's own
pipeline, then runs the quantized checkpoint twice:

* CPU, fp32: ``QuantizedRuntime`` (weights decoded exactly, activations fake-quantized): the reference;
* CUDA, bf16: the same runtime, but every quantized Linear replaced by ``QuantLinear`` built from the
  stored integers / fp8 values, whose CUDA forward is ``squeeze.quant.linear.kernel_linear``, i.e. the
  ``squeeze.kernels`` Triton GEMMs.

It prints the relative logits error ``||gpu - cpu|| / ||cpu||`` per scheme, next to the error of the same
fake-quant runtime run in bf16 on the GPU without the kernels (what bf16 alone costs: on a random toy,
bf16 rounding can flip an expert choice or an activation-quantization rounding, which moves logits far
more than a GEMM's summation order), and counts the Triton dispatches (``use_triton`` answering True
inside each kernel module) and any fallback to the dense path, so a run that silently skipped the kernels
cannot pass. Exit status 1 if a scheme misses both the tolerance and the bf16 control's error (x1.25), or
dispatched nothing.

``--checkpoint`` runs the same check on a given bf16 checkpoint instead (e.g. the trained default toy,
``squeeze toy DIR --train-steps 500``): a trained router has real margins, so bf16 rounding rarely flips
an expert, and the inputs are held-out text instead of random ids.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

SCHEMES = {  # name -> recipe_from_flags arguments
    "W4A16 g128 (rtn)": dict(method="rtn", bits=4, group_size=128),
    "FP8 block 128x128": dict(method="fp8-block"),
    "W8A8 int8 (rtn)": dict(method="rtn", scheme="W8A8_INT8"),
}


def toy_spec():  # noqa: ANN201 - ToySpec (import kept lazy with the rest of squeeze)
    """The TRAINED toy of tests/conftest.py: every Linear's K is a multiple of 128 (all kernels apply)."""
    from squeeze.model.toy import ToySpec

    return ToySpec(layers=3, dense_layers=1, hidden=128, heads=4, experts=8, top_k=2, n_group=4, topk_group=2,
                   moe_inter=128, inter=256, vocab=2048, q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=32,
                   qk_rope_head_dim=32, v_head_dim=32)


def quantize_toy(src: Path, out: Path, flags: dict, vocab: int):  # noqa: ANN201 - (Recipe, QuantizeReport)
    """Quantize ``src`` into ``out`` with squeeze's pipeline (random calibration ids: the toy has no tokenizer)."""
    from squeeze.quant.pipeline import quantize_checkpoint
    from squeeze.recipe import Calibration, recipe_from_flags

    rec = recipe_from_flags(calibration=Calibration(batch_size=4), **flags)
    ids = torch.randint(0, vocab, (8, 64), generator=torch.Generator().manual_seed(1))
    report = quantize_checkpoint(src, out, rec, show_progress=False, calibration_ids=ids)
    return rec, report


def stored_qweight(reader, module: str, scheme, device: torch.device):  # noqa: ANN001, ANN201
    """The QuantizedWeight of ``module`` as stored (int4 unpacked to int8 q, int8, or fp8 + block scales).

    None when the module is not stored quantized (e.g. the router, embeddings).
    """
    from squeeze.kernels import unpack_int4
    from squeeze.quant.linear import QuantizedWeight

    wm = reader.weight_map
    if f"{module}.weight_packed" in wm:
        names = [f"{module}.weight_packed", f"{module}.weight_scale"]
        zp_name = f"{module}.weight_zero_point"
        raw = reader.read_raw(names + ([zp_name] if zp_name in wm else []))
        q = unpack_int4(raw[names[0]])
        if zp_name in raw:
            raise NotImplementedError("asymmetric int4 parity is not part of this check")
        scale = raw[names[1]].float()
    elif f"{module}.weight_scale_inv" in wm:
        raw = reader.read_raw([f"{module}.weight", f"{module}.weight_scale_inv"])
        q, scale = raw[f"{module}.weight"], raw[f"{module}.weight_scale_inv"].float()
    elif f"{module}.weight_scale" in wm:
        raw = reader.read_raw([f"{module}.weight", f"{module}.weight_scale"])
        q, scale = raw[f"{module}.weight"], raw[f"{module}.weight_scale"].float()
    else:
        return None
    return QuantizedWeight(q.to(device), scale.to(device), None, scheme)


def kernel_runtime_class():  # noqa: ANN201 - a QuantizedRuntime subclass
    from squeeze.model.runtime import LayerwiseModel
    from squeeze.quant.linear import QuantLinear
    from squeeze.quant.runtime import QuantizedRuntime

    class KernelRuntime(QuantizedRuntime):
        """QuantizedRuntime whose quantized Linears run the stored numbers through ``QuantLinear``.

        The plain runtime decodes weights to dense tensors (it is the fake-quant reference); here each
        Linear stored quantized becomes a ``QuantLinear`` on the runtime's device, so on CUDA its forward
        goes to ``kernel_linear`` and the Triton kernels, with the scheme's own activation quantization.
        """

        scheme = None  # set by the caller: the recipe rule's QuantScheme
        replaced = 0

        def load_layer(self, index: int):  # noqa: ANN201 - DecoderLayer
            layer = LayerwiseModel.load_layer(self, index)  # dense, no activation wrappers
            prefix = self.reader.layer_prefix(index)
            for local, m in list(layer.named_modules()):
                if not isinstance(m, nn.Linear):
                    continue
                qw = stored_qweight(self.reader, prefix + local, self.scheme, self.device)
                if qw is None:
                    continue
                parent, _, child = local.rpartition(".")
                setattr(layer.get_submodule(parent), child, QuantLinear(qw, m.bias))
                self.replaced += 1
            return layer

    return KernelRuntime


def count_dispatches() -> tuple[Counter, Callable[[], None]]:
    """Count Triton launches per kernel module and dense fallbacks; returns (counter, undo)."""
    import squeeze.quant.linear as qlinear
    from squeeze.kernels import fp8_block, w4a16, w8a8

    counts: Counter = Counter()
    saved: list[tuple[object, str, object]] = []

    def patch(obj: object, name: str, wrapper: Callable) -> None:
        saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, wrapper(getattr(obj, name)))

    for mod in (w4a16, fp8_block, w8a8):
        def wrap(fn: Callable, tag: str = mod.__name__.rsplit(".", 1)[-1]) -> Callable:
            def counted(*a, **k):  # noqa: ANN002, ANN003, ANN202
                r = fn(*a, **k)
                counts[f"triton:{tag}" if r else f"reference:{tag}"] += 1
                return r
            return counted
        patch(mod, "use_triton", wrap)

    def wrap_cpu(fn: Callable) -> Callable:
        def counted(*a, **k):  # noqa: ANN002, ANN003, ANN202
            counts["dense fallback"] += 1
            return fn(*a, **k)
        return counted
    patch(qlinear, "_cpu_linear", wrap_cpu)

    def undo() -> None:
        for obj, name, orig in reversed(saved):
            setattr(obj, name, orig)

    return counts, undo


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tol", type=float, default=2e-2, help="max relative logits error (bf16 end to end)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--checkpoint", type=Path, default=None, help="a bf16 checkpoint to use instead of a random toy")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("check_model needs a CUDA GPU")
    from squeeze.model.toy import write_random_toy
    from squeeze.quant.runtime import QuantizedRuntime

    spec = toy_spec()
    ids = torch.randint(0, spec.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(2))
    if args.checkpoint is not None:
        from squeeze.data import load_text, token_windows
        from squeeze.model.tokenizer import load_tokenizer

        text_ids = load_tokenizer(args.checkpoint).encode(load_text("corpus:heldout")).ids
        ids = token_windows(text_ids, args.seq, args.batch)
    kernel_rt = kernel_runtime_class()
    rows, ok = [], True
    with tempfile.TemporaryDirectory() as tmp:
        src = args.checkpoint
        if src is None:
            src = Path(tmp) / "toy"
            write_random_toy(src, spec, seed=0)
        # RTN and FP8-block ignore calibration values; random ids only have to be valid tokens
        vocab = spec.vocab if args.checkpoint is None else json.loads((src / "config.json").read_text())["vocab_size"]
        for name, flags in SCHEMES.items():
            out = Path(tmp) / name.split()[0]
            rec, _ = quantize_toy(src, out, flags, vocab)
            cpu = QuantizedRuntime(out, dtype=torch.float32, device="cpu").logits(ids)
            # Control: the same fake-quant runtime in bf16 on the GPU, no kernels (dense decoded weights).
            control = QuantizedRuntime(out, dtype=torch.bfloat16, device="cuda").logits(ids)
            model = kernel_rt(out, dtype=torch.bfloat16, device="cuda")
            model.scheme = rec.rules[0].scheme
            counts, undo = count_dispatches()
            try:
                gpu = model.logits(ids)
                torch.cuda.synchronize()
            finally:
                undo()
            err, err_ctl, err_vs_ctl = rel(gpu, cpu), rel(control, cpu), rel(gpu, control)
            triton_calls = sum(v for k, v in counts.items() if k.startswith("triton:"))
            # Pass: within tolerance of the CPU fp32 reference, or (a random toy's routing amplifies bf16
            # rounding) no further from it than the kernel-free bf16 control is, with 25% slack.
            close = err < args.tol or err <= 1.25 * err_ctl
            good = close and triton_calls > 0 and counts["dense fallback"] == 0 and bool(torch.isfinite(gpu).all())
            ok &= good
            verdict = "ok" if err < args.tol else ("ok (bf16-limited)" if good else "FAIL")
            calls = ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))
            rows.append(f"| {name} | {err:.2e} | {err_ctl:.2e} | {err_vs_ctl:.2e} | {model.replaced} | {calls} "
                        f"| {verdict} |")
            print(rows[-1], flush=True)
    what = (f"checkpoint {args.checkpoint}" if args.checkpoint is not None
            else f"random toy {spec.layers} layers, hidden {spec.hidden}, {spec.experts} experts")
    print(f"\n# Model parity on {torch.cuda.get_device_name()} ({what}; logits of {args.batch}x{args.seq} tokens; "
          f"tolerance {args.tol:g})\n")
    print("| scheme | GPU kernels vs CPU fp32 fake-quant | GPU bf16 fake-quant (no kernels) vs CPU fp32 "
          "| GPU kernels vs GPU bf16 fake-quant | Linears on kernels | dispatches | |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
