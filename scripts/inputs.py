"""Rule inputs: preprocess a split for one model (kiln.inputs)."""
import _kiln_path  # noqa: F401,I001 (puts the workflow's kiln package on sys.path)
from kiln.entry import script
from kiln.inputs import preprocess_split

with script(snakemake) as cfg:  # noqa: F821
    w = snakemake.wildcards
    preprocess_split(cfg.models[w.model], snakemake.input.annotations, snakemake.params.spec["count"], snakemake.output[0])
