# Checkpoint -> ONNX at each opset the devices need -> simplified -> graph surgery.


rule export:
    input:
        # local(): read from this host's disk even with a default storage provider.
        checkpoint=lambda w: local(KILN.models[w.model].checkpoint),
    output:
        P(paths.EXPORT),
    log:
        LOG("export", "{model}_opset{opset}"),
    params:
        spec=lambda w: kiln_export.params(KILN, w.model),
        code=PLAN.code("export"),
    threads: 1
    resources:
        **PLAN.resources("export"),
    conda:
        "../envs/kiln.yaml"
    script:
        "../scripts/export.py"


rule simplify:
    input:
        P(paths.EXPORT),
    output:
        onnx=P(paths.SIMPLIFIED),
        record=P(paths.SIMPLIFY_RECORD),
    log:
        LOG("simplify", "{model}_opset{opset}"),
    params:
        spec=lambda w: kiln_simplify.params(KILN, w.model),
        code=PLAN.code("simplify"),
    threads: 1
    resources:
        **PLAN.resources("simplify"),
    conda:
        "../envs/kiln.yaml"
    script:
        "../scripts/simplify.py"


rule surgery:
    input:
        P(paths.SIMPLIFIED),
    output:
        onnx=P(paths.SURGERY),
        record=P(paths.SURGERY_RECORD),
    log:
        LOG("surgery", "{model}_opset{opset}"),
    params:
        spec=lambda w: kiln_surgery.params(KILN, w.model, int(w.opset)),
        code=PLAN.code("surgery"),
    threads: 1
    resources:
        **PLAN.resources("surgery"),
    conda:
        "../envs/kiln.yaml"
    script:
        "../scripts/surgery.py"
