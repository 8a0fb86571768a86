"""Rule inputs: preprocess a split for one model (kiln.inputs)."""
from kiln.entry import script
from kiln.inputs import preprocess_split

with script(snakemake) as cfg:  # noqa: F821
    w = snakemake.wildcards
    preprocess_split(cfg.models[w.model], snakemake.input.annotations, snakemake.params.spec["count"], snakemake.output[0])
