# The same checkpoint in PyTorch eager on each device this host validates, timed like its engines.
from kiln import baseline as kiln_baseline


rule baseline:
    input:
        # local(): read from this host's disk even with a default storage provider (rules/hosts.smk).
        checkpoint=lambda w: local(KILN.models[w.model].checkpoint),
        inputs=P(paths.INPUTS, split="val"),
    output:
        P(paths.BASELINE),
    wildcard_constraints:
        device=RUN_HERE,  # gather=true: only this host's devices (rules/common.smk)
    log:
        LOG("baseline", "{device}_{model}"),
    params:
        spec=lambda w: kiln_baseline.params(KILN, w.device, w.model),
        code=code("kiln.baseline"),
    # Timed like validation: alone on the host, so ask for every core Snakemake has.
    threads: lambda w: KILN.devices[w.device].threads or 1024
    resources:
        mem_mb=kiln_workflow.RULE_RESOURCES["validate"]["mem_mb"],
        runtime=kiln_workflow.RULE_RESOURCES["validate"]["runtime"],
        gpu=lambda w: kiln_workflow.gpu_count(KILN, w.device, "validate"),
        slurm_partition=lambda w: kiln_workflow.cluster_hint(KILN, w.device, "validate", "partition", DEFAULT_PARTITION),
        constraint=lambda w: kiln_workflow.cluster_hint(KILN, w.device, "validate", "constraint"),
        gres=lambda w: kiln_workflow.cluster_hint(KILN, w.device, "validate", "gres"),
        gpu_model=lambda w: kiln_workflow.cluster_hint(KILN, w.device, "validate", "gpu_model"),
    conda:
        "../envs/kiln.yaml"
    script:
        "../scripts/baseline.py"
