# Datasets and preprocessed model inputs.


rule dataset:
    output:
        P(paths.DATASET),
        # Declared, so the images go to storage with the annotations (README: Building on devices).
        images=directory(P(paths.DATASET_IMAGES)),
    log:
        LOG("dataset", "{dataset}_{split}"),
    params:
        spec=lambda w: kiln_dataset.params(KILN, w.dataset, w.split),
        code=PLAN.code("dataset"),
    threads: 1
    resources:
        **PLAN.resources("dataset"),
    conda:
        "../envs/kiln.yaml"
    script:
        "../scripts/dataset.py"


rule inputs:
    input:
        annotations=lambda w: dataset_of(w.model, w.split),
        images=lambda w: dataset_of(w.model, w.split, paths.DATASET_IMAGES),
    output:
        P(paths.INPUTS),
    log:
        LOG("inputs", "{model}_{split}"),
    params:
        spec=lambda w: kiln_inputs.params(KILN, w.model, w.split),
        code=PLAN.code("inputs"),
    threads: 1
    resources:
        **PLAN.resources("inputs"),
    conda:
        "../envs/kiln.yaml"
    script:
        "../scripts/inputs.py"
