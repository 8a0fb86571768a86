"""Rule baseline: the checkpoint in PyTorch eager on the device, timed like its engines (kiln.baseline)."""
import _kiln_path  # noqa: F401,I001 (puts the workflow's kiln package on sys.path)
from kiln.baseline import run_baseline
from kiln.entry import script

with script(snakemake) as cfg:  # noqa: F821
    w = snakemake.wildcards  # noqa: F821
    run_baseline(cfg, w.device, w.model, snakemake.input.inputs, snakemake.output[0],  # noqa: F821
                 threads=snakemake.threads)  # noqa: F821
