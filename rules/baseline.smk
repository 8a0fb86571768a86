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
        # Placed on the device's nodes from its `cluster:` hints (kiln/workflow.py device_resources).
        **kiln_workflow.device_resources(KILN, "baseline", DEFAULT_PARTITION, like="validate"),
    conda:
        "../envs/kiln.yaml"
    script:
        "../scripts/baseline.py"
