# The run's summary (one row per model x device x precision) and Kiln's comparison page.
# Outputs marked report() go into `snakemake --report`: captions in report/, one category per model.
rule summary:
    input:
        validations=kiln_workflow.validation_targets(KILN, PLAN.can_run, PLAN.can_build),
        built_only=kiln_workflow.build_only_targets(KILN, PLAN.can_run, PLAN.can_build),
        # The simplify and variant records its rows quote: inputs, so they come from storage too.
        records=kiln_workflow.summary_records(KILN, PLAN.can_run, PLAN.can_build),
        # Every row is checked against its engine's record: a validation of another engine is stale.
        engines=kiln_workflow.engine_records(KILN, PLAN.can_build),
        diagnoses=diagnosis_targets(),  # failed TensorRT builds reduced (rules/diagnose.smk)
        gathered=gathered,  # no files: gather=true checks storage first (rules/common.smk)
    # On the host that runs Snakemake: its params say what this host can do.
    localrule: True
    output:
        json=P(paths.SUMMARY_JSON),
        csv=report(P(paths.SUMMARY_CSV), caption="../report/summary.rst", category="Summary", labels={"file": "summary table"}),
        md=P(paths.SUMMARY_MD),
    log:
        LOG("summary", "summary"),
    params:
        cannot_build={d: r for d, r in PLAN.can_build.items() if r},
        cannot_run={d: r for d, r in PLAN.can_run.items() if r},
        # Rows whose engine, ONNX or reference no longer match their records: a file changed with its
        # mtime kept changes nothing else Snakemake sees, so this reruns the summary (README).
        damaged=lambda w: kiln_summary.damaged(KILN, PLAN.can_run, PLAN.can_build),
        code=PLAN.code("summary"),
    threads: 1
    resources:
        **PLAN.resources("summary"),
    conda:
        "../envs/kiln.yaml"
    script:
        "../scripts/summary.py"


rule page:
    input:
        summary=P(paths.SUMMARY_JSON),
        validations=kiln_workflow.validation_targets(KILN, PLAN.can_run, PLAN.can_build),
        # Every engine record the summary's rows stand for (their build metadata is on the page).
        engines=kiln_workflow.engine_records(KILN, PLAN.can_build),
    # Beside the summary, on the host that runs Snakemake.
    localrule: True
    output:
        html=report(P(paths.PAGE_HTML), caption="../report/page.rst", category="Summary", labels={"file": "Kiln page"}),
        md=P(paths.PAGE_MD),
        model_plots=report(
            directory(P(paths.MODEL_PLOTS)),
            patterns=[paths.MODEL_PLOT_IN],
            caption="../report/plot.rst",
            category="{model}",
            subcategory="all devices",
            labels={"figure": "{plot}"},
        ),
        device_plots=report(
            directory(P(paths.DEVICE_PLOTS)),
            patterns=[paths.DEVICE_PLOT_IN, paths.DEVICE_PICTURE_IN],
            caption="../report/plot.rst",
            category="{model}",
            subcategory="{device}",
            labels={"figure": "{plot}"},
        ),
    log:
        LOG("page", "page"),
    params:
        code=PLAN.code("page"),
    threads: 1
    resources:
        **PLAN.resources("page"),
    conda:
        "../envs/kiln.yaml"
    script:
        "../scripts/page.py"
