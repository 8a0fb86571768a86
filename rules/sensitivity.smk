# Layer sensitivity of a strict int8/fp8/fp16 variant on the calibration split (fp16 on its emulation), and
# the mixed variant (int8-mixed, fp8-mixed, fp16-mixed) that keeps its most sensitive regions in higher
# precision (docs/accuracy.md).


rule sensitivity:
    input:
        fp32=P(paths.SURGERY),
        variant=P(paths.VARIANT),
        calib=lambda w: P(paths.INPUTS, model=w.model, split="calib"),
        annotations=PLAN.per_model(lambda m: dataset_of(m, "calib")),
    output:
        json=P(paths.SENSITIVITY),
        md=P(paths.SENSITIVITY_MD),
    log:
        LOG("sensitivity", "{model}_opset{opset}_{precision}"),
    params:
        spec=lambda w: kiln_sensitivity.params(KILN, w.model, w.precision),
        code=PLAN.code("sensitivity"),
    wildcard_constraints:
        precision="int8|fp8|fp16",
    threads: 2
    resources:
        **PLAN.resources("sensitivity"),
    conda:
        "../envs/kiln.yaml"
    script:
        "../scripts/sensitivity.py"


rule fallback:
    input:
        onnx=P(paths.SURGERY),
        calib=lambda w: P(paths.INPUTS, model=w.model, split="calib"),
        annotations=PLAN.per_model(lambda m: dataset_of(m, "calib")),
        sensitivity=lambda w: P(paths.SENSITIVITY, model=w.model, precision=w.precision.removesuffix("-mixed")),
        strict=lambda w: P(paths.VARIANT, model=w.model, precision=w.precision.removesuffix("-mixed")),
    output:
        onnx=P(paths.VARIANT),
        record=P(paths.VARIANT_RECORD),
    log:
        LOG("fallback", "{model}_opset{opset}_{precision}"),
    params:
        spec=lambda w: kiln_precision.params(KILN, w.model, w.precision),
        code=PLAN.code("fallback"),
    wildcard_constraints:
        precision="int8-mixed|fp8-mixed|fp16-mixed",
    threads: 2
    resources:
        **PLAN.resources("fallback"),
    conda:
        "../envs/kiln.yaml"
    script:
        "../scripts/fallback.py"
