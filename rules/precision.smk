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
        code=code("kiln.precision.cast"),
    wildcard_constraints:
        precision="fp32|fp16|bf16",
    threads: 1
    resources:
        mem_mb=kiln_workflow.RULE_RESOURCES["precision"]["mem_mb"],
        runtime=kiln_workflow.RULE_RESOURCES["precision"]["runtime"],
    conda:
        "../envs/kiln.yaml"
    script:
        "../scripts/precision.py"


rule quantize:
    input:
        onnx=P(paths.SURGERY),
        calib=lambda w: P(paths.INPUTS, model=w.model, split="calib"),
        annotations=lambda w: dataset_of(w.model, "calib"),  # calib image names for the calib list
    output:
        onnx=P(paths.VARIANT),
        record=P(paths.VARIANT_RECORD),
        calib_list=P(paths.CALIB_LIST),
    log:
        LOG("quantize", "{model}_opset{opset}_{precision}"),
    params:
        spec=lambda w: kiln_precision.params(KILN, w.model, w.precision),
        code=code("kiln.precision.quantize"),
    wildcard_constraints:
        precision="int8|fp8",
    threads: 2
    resources:
        mem_mb=kiln_workflow.RULE_RESOURCES["quantize"]["mem_mb"],
        runtime=kiln_workflow.RULE_RESOURCES["quantize"]["runtime"],
    conda:
        "../envs/kiln.yaml"
    script:
        "../scripts/quantize.py"
