"""Rule summary: the run's table as JSON, CSV and Markdown (kiln.summary)."""
import _kiln_path  # noqa: F401,I001 (puts the workflow's kiln package on sys.path)
from kiln.entry import script
from kiln.summary import write_summary

with script(snakemake) as cfg:  # noqa: F821
    o = snakemake.output
    write_summary(cfg, o.json, o.csv, o.md, snakemake.params.cannot_build, snakemake.params.cannot_run,
                  inputs=list(snakemake.input))
