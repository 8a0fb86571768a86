# The run's summary: one row per model x device x precision.


rule summary:
    input:
        validations=kiln_workflow.validation_targets(KILN, CAN_RUN, CAN_BUILD),
        built_only=kiln_workflow.build_only_targets(KILN, CAN_RUN, CAN_BUILD),
    output:
        json=P(paths.SUMMARY_JSON),
        csv=P(paths.SUMMARY_CSV),
        md=P(paths.SUMMARY_MD),
    log:
        LOG("summary", "summary"),
    params:
        cannot_build={d: r for d, r in CAN_BUILD.items() if r},
        cannot_run={d: r for d, r in CAN_RUN.items() if r},
        code=code("kiln.summary"),
    threads: 1
    resources:
        mem_mb=kiln_workflow.RULE_RESOURCES["summary"]["mem_mb"],
        runtime=kiln_workflow.RULE_RESOURCES["summary"]["runtime"],
    conda:
        "../envs/kiln.yaml"
    script:
        "../scripts/summary.py"
