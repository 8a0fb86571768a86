# Reference outputs, one engine per device x model x precision, and its validation on the device.


rule reference:
    input:
        onnx=P(paths.SURGERY),
        inputs=P(paths.INPUTS, split="val"),
        annotations=PLAN.per_model(lambda m: dataset_of(m, "val")),
    output:
        outputs=P(paths.REFERENCE),
        record=P(paths.REFERENCE_RECORD),
    log:
        LOG("reference", "{model}_opset{opset}"),
    params:
        spec=lambda w: kiln_reference.params(KILN, w.model),
        code=PLAN.code("reference"),
    threads: 2
    resources:
        **PLAN.resources("reference"),
    conda:
        "../envs/kiln.yaml"
    script:
        "../scripts/reference.py"


rule build:
    input:
        onnx=engine_source,
        calib=PLAN.calibration_inputs(),
        kept=PLAN.kept_inputs(),  # a mixed variant built from the strict source: its kept nodes (kiln/build.py)
        annotations=PLAN.per_model(lambda m: dataset_of(m, "val")),  # class names for engine.json's runtime
    output:
        P(paths.ENGINE_RECORD),
        # Declared, so it goes to storage with its record (README: Building on devices).
        engine=P(paths.ENGINE_FILE),
    wildcard_constraints:
        device=PLAN.build_here,  # gather=true: only this host's devices (kiln/workflow.py Plan)
    log:
        LOG("build", "{device}_{model}_{precision}"),
    params:
        spec=PLAN.per_device(lambda d: kiln_build.params(KILN, d)),
        model=PLAN.per_model(lambda m: kiln_build.model_params(KILN, m)),  # engine.json's runtime
        code=PLAN.code("build"),
    threads: 2
    resources:
        # Placed on the device\'s nodes from its `cluster:` hints (kiln/workflow.py Plan.resources).
        **PLAN.resources("build"),
    retries: 1
    conda:
        "../envs/kiln.yaml"
    script:
        "../scripts/build.py"


rule validate:
    input:
        # The device's opset's fp32 reference: outputs and record (one function for both).
        unpack(lambda w: PLAN.reference_inputs(w.device, w.model)),
        engine=P(paths.ENGINE_RECORD),
        engine_file=P(paths.ENGINE_FILE),
        inputs=P(paths.INPUTS, split="val"),
        annotations=PLAN.per_model(lambda m: dataset_of(m, "val")),
        images=PLAN.per_model(lambda m: dataset_of(m, "val", paths.DATASET_IMAGES)),  # pictures, pipeline latency
        baseline=P(paths.BASELINE),
    output:
        P(paths.VALIDATION),
    wildcard_constraints:
        device=PLAN.run_here,  # gather=true: only this host's devices (kiln/workflow.py Plan)
    log:
        LOG("validate", "{device}_{model}_{precision}"),
    params:
        spec=lambda w: kiln_validate.params(KILN, w.device, w.model, w.precision),
        code=PLAN.code("validate"),
    # Latency is measured with the host to itself: ask for every core Snakemake has.
    threads: PLAN.threads("validate")
    resources:
        # Placed on the device\'s nodes from its `cluster:` hints (kiln/workflow.py Plan.resources).
        **PLAN.resources("validate"),
    conda:
        "../envs/kiln.yaml"
    script:
        "../scripts/validate.py"
