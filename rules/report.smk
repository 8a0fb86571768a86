# The run's summary: one row per model x device x precision.


rule summary:
    input:
        validations=kiln_workflow.validation_targets(KILN, HOST),
    output:
        json=P(paths.SUMMARY_JSON),
        csv=P(paths.SUMMARY_CSV),
        md=P(paths.SUMMARY_MD),
    log:
        LOG("summary", "summary"),
    params:
        not_here={d: r for d, r in HOST.items() if r},
    conda:
        "../envs/kiln.yaml"
    script:
        "../scripts/summary.py"
