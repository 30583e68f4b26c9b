"""Post-training quantization of DeepSeek-V3-format checkpoints, one decoder layer at a time.

Module map
    scheme.py       `QuantArgs` / `QuantScheme` dataclasses (bits, int/fp8, channel/group/block/token,
                    symmetry, dynamic activations), `PRESETS` (W4A16, W8A16, W8A8_INT8, W8A8_FP8,
                    FP8_BLOCK), `.to_ct()` -> compressed-tensors models.
    observers.py    min/max observers and the quantize/dequantize arithmetic (compressed-tensors
                    conventions); dynamic activation fake-quant; shape checks.
    linear.py       `QuantizedWeight` (int8/fp8 values + scales + zero points), `QuantLinear` whose
                    forward goes through `linear_forward` (CPU: dequantize + F.linear; CUDA backends
                    register with `set_linear_backend`, e.g. squeeze.kernels).
    calibration.py  `Target` (one Linear to quantize), `LayerCalibration` (a layer's input batches;
                    `run`, `collect_hessians` with every expert observing every token, `capture_inputs`),
                    `output_error`.
    methods.py      `QuantMethod` base class + registry (`register_method`, `get_method`).
    rtn.py          round-to-nearest (`rtn`) and `fp8-block` (DeepSeek's 128x128 FP8).
    gptq.py         GPTQ (Hessian, dampening, lazy block updates, act-order, groups).
    pipeline.py     `quantize_checkpoint(model, out, recipe)`: the sequential layer-by-layer pass,
                    atomic output, `QuantizeReport` (time per method, peak RSS, expert coverage,
                    per-layer errors).
    export.py       output layouts: compressed-tensors (via its compressors and config models) or
                    DeepSeek FP8 (`weight` + `weight_scale_inv`).
    runtime.py      `QuantizedRuntime`: LayerwiseModel + the checkpoint's dynamic activation quant.
    bench_memory.py peak RSS of quantizing 4- vs 16-layer toys (flat in depth).
    folding.py      scale folding for a DeepSeek layer (norm -> q_a/kv_a, q_a_norm -> q_b, kv_a_norm -> kv_b,
                    post-attention norm -> router + every expert's gate/up, up -> down), shared by:
    awq.py          AWQ (activation-aware scale search + clipping search), `whole_layer` method.
    smoothquant.py  SmoothQuant W8A8-INT8 (alpha or alpha search), alone or with GPTQ weights.
    qat.py          whole-model quantization-aware training (STE fake-quant, KL to the base + CE),
                    starting from RTN or GPTQ; exported like PTQ.
    study.py        `python -m squeeze.quant.study TOY WORKDIR`: the perplexity table of every method.

Method interface (what rtn.py / gptq.py / awq.py / smoothquant.py implement)

    @register_method
    class AWQ(QuantMethod):
        name = "awq"               # the `method:` of a recipe rule; params come from `params:`
        needs_hessian = False      # the pipeline collects H = XᵀX for every target anyway
        def __init__(self, **params): ...
        def quantize_layer(self, layer, calib, targets) -> dict[str, QuantizedWeight]:
            # layer:   the fp32 DecoderLayer (methods may rescale norms / other weights in place)
            # calib:   LayerCalibration: calib.inputs, calib.run(layer), calib.capture_inputs(layer,
            #          {name: module}), calib.stats[target.name].hessian, calib.expert_tokens
            # targets: [Target(name, local, module, scheme, method, params)] assigned to this method
            # return:  {target.name: QuantizedWeight}, e.g. via rtn.rtn_quantize(w, scheme)

Methods are called once per layer per method (in chunks of a few targets, or all at once for a
method with `whole_layer = True`: a fold spans many Linears), after statistics are
collected and before the pipeline swaps in `QuantLinear`s and computes the next layer's inputs.
"""
