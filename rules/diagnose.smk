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
        mem_mb=kiln_workflow.RULE_RESOURCES["build"]["mem_mb"],
        runtime=kiln_workflow.RULE_RESOURCES["build"]["runtime"],
        gpu=lambda w: kiln_workflow.gpu_count(KILN, w.device, "build"),
        slurm_partition=lambda w: kiln_workflow.cluster_hint(KILN, w.device, "build", "partition", DEFAULT_PARTITION),
        constraint=lambda w: kiln_workflow.cluster_hint(KILN, w.device, "build", "constraint"),
        gres=lambda w: kiln_workflow.cluster_hint(KILN, w.device, "build", "gres"),
        gpu_model=lambda w: kiln_workflow.cluster_hint(KILN, w.device, "build", "gpu_model"),
    conda:
        "../envs/kiln.yaml"
    script:
        "../scripts/diagnose.py"
