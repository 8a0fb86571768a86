# Datasets and preprocessed model inputs.


rule dataset:
    output:
        P(paths.DATASET),
    log:
        LOG("dataset", "{dataset}_{split}"),
    params:
        spec=lambda w: kiln_dataset.params(KILN, w.dataset, w.split),
        code=code("kiln.dataset"),
    conda:
        "../envs/kiln.yaml"
    script:
        "../scripts/dataset.py"


rule inputs:
    input:
        annotations=lambda w: dataset_of(w.model, w.split),
    output:
        P(paths.INPUTS),
    log:
        LOG("inputs", "{model}_{split}"),
    params:
        spec=lambda w: kiln_inputs.params(KILN, w.model, w.split),
        code=code("kiln.inputs"),
    conda:
        "../envs/kiln.yaml"
    script:
        "../scripts/inputs.py"
