# The same checkpoint in PyTorch eager on each device this host validates, timed like its engines.


rule baseline:
    input:
        # local(): read from this host's disk even with a default storage provider (rules/hosts.smk).
        checkpoint=lambda w: local(KILN.models[w.model].checkpoint),
        inputs=P(paths.INPUTS, split="val"),
    output:
        P(paths.BASELINE),
    wildcard_constraints:
        device=PLAN.run_here,  # gather=true: only this host's devices (kiln/workflow.py Plan)
    log:
        LOG("baseline", "{device}_{model}"),
    params:
        spec=lambda w: kiln_baseline.params(KILN, w.device, w.model),
        code=PLAN.code("baseline"),
    # Timed like validation: alone on the host, so ask for every core Snakemake has.
    threads: PLAN.threads("baseline")
    resources:
        # Placed on the device\'s nodes from its `cluster:` hints (kiln/workflow.py Plan.resources).
        **PLAN.resources("baseline"),
    conda:
        "../envs/kiln.yaml"
    script:
        "../scripts/baseline.py"
