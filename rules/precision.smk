# Precision variants of the surgeried fp32 ONNX for strongly typed targets and ONNX Runtime.


rule precision:
    input:
        P(paths.SURGERY),
    output:
        onnx=P(paths.VARIANT),
        record=P(paths.VARIANT_RECORD),
    log:
        LOG("precision", "{model}_opset{opset}_{precision}"),
    params:
        spec=lambda w: kiln_precision.params(KILN, w.model, w.precision),
        code=PLAN.code("precision"),
    wildcard_constraints:
        precision="fp32|fp16|bf16",
    threads: 1
    resources:
        **PLAN.resources("precision"),
    conda:
        "../envs/kiln.yaml"
    script:
        "../scripts/precision.py"


rule quantize:
    input:
        onnx=P(paths.SURGERY),
        calib=lambda w: P(paths.INPUTS, model=w.model, split="calib"),
        annotations=PLAN.per_model(lambda m: dataset_of(m, "calib")),  # calib image names for the calib list
    output:
        onnx=P(paths.VARIANT),
        record=P(paths.VARIANT_RECORD),
        calib_list=P(paths.CALIB_LIST),
    log:
        LOG("quantize", "{model}_opset{opset}_{precision}"),
    params:
        spec=lambda w: kiln_precision.params(KILN, w.model, w.precision),
        code=PLAN.code("quantize"),
    wildcard_constraints:
        precision="int8|fp8",
    threads: 2
    resources:
        **PLAN.resources("quantize"),
    conda:
        "../envs/kiln.yaml"
    script:
        "../scripts/quantize.py"
