# A failed TensorRT / TensorRT-RTX build reduced to its smallest failing subgraph (kiln/diagnose.py).
# Built engines give {"status": "not needed"} at once; the summary's `diagnosis` column reads these.


rule diagnose:
    input:
        engine=P(paths.ENGINE_RECORD),
        onnx=engine_source,
    output:
        P(paths.DIAGNOSIS),
    wildcard_constraints:
        device=PLAN.build_here,  # gather=true: only this host's devices (kiln/workflow.py Plan)
    log:
        LOG("diagnose", "{device}_{model}_{precision}"),
    params:
        spec=lambda w: kiln_diagnose.params(KILN, w.device, w.model, w.precision),
        code=PLAN.code("diagnose"),
    threads: 2
    resources:
        # Placed on the device\'s nodes from its `cluster:` hints (kiln/workflow.py Plan.resources).
        **PLAN.resources("diagnose"),
    conda:
        "../envs/kiln.yaml"
    script:
        "../scripts/diagnose.py"
