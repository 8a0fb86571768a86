# Serving configs per device (kiln/serve/): a Triton model repository and DeepStream nvinfer configs for
# every built engine of the device. One job per device: a Triton server loads one repository.


rule serve:
    input:
        records=PLAN.per_device(lambda d: kiln_serve.engine_records(KILN, d)),
        engines=PLAN.per_device(lambda d: kiln_serve.engine_files(KILN, d)),
        onnx=PLAN.per_device(lambda d: kiln_serve.engine_sources(KILN, d)),
        annotations=PLAN.per_device(lambda d: kiln_serve.annotations(KILN, d)),
        # Where this run validates the device: the best stream count sets instance_group.
        validations=PLAN.per_device(lambda d: kiln_serve.validations(KILN, d, PLAN.can_run)),
    output:
        triton=directory(P(paths.SERVE_TRITON)),
        deepstream=directory(P(paths.SERVE_DEEPSTREAM)),
    log:
        LOG("serve", "{device}"),
    params:
        spec=PLAN.per_device(lambda d: kiln_serve.params(KILN, d)),
        code=PLAN.code("serve"),
    threads: 1
    resources:
        **PLAN.resources("serve"),
    conda:
        "../envs/kiln.yaml"
    script:
        "../scripts/serve.py"
