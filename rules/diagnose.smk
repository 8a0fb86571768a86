# A failed TensorRT / TensorRT-RTX build reduced to its smallest failing subgraph (kiln/diagnose.py).
# Built engines give {"status": "not needed"} at once; the summary's `diagnosis` column reads these.
from kiln import diagnose as kiln_diagnose

# One diagnosis per job of a TensorRT-flavoured device this run builds (summary and `engines` inputs).
diagnosis_targets = lambda: kiln_diagnose.targets(KILN, CAN_BUILD)


rule diagnose:
    input:
        engine=P(paths.ENGINE_RECORD),
        onnx=engine_source,
    output:
        P(paths.DIAGNOSIS),
    wildcard_constraints:
        device=BUILD_HERE,  # gather=true: only this host's devices (rules/common.smk)
    log:
        LOG("diagnose", "{device}_{model}_{precision}"),
    params:
        spec=lambda w: kiln_diagnose.params(KILN, w.device, w.model, w.precision),
        code=device_code("kiln.diagnose"),
    threads: 2
    resources:
        # Placed on the device's nodes from its `cluster:` hints (kiln/workflow.py device_resources).
        **kiln_workflow.device_resources(KILN, "diagnose", DEFAULT_PARTITION, like="build"),
    conda:
        "../envs/kiln.yaml"
    script:
        "../scripts/diagnose.py"
