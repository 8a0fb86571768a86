"""Rule dataset: write one split of a dataset (kiln.dataset)."""
import _kiln_path  # noqa: F401,I001 (puts the workflow's kiln package on sys.path)
from kiln.dataset import prepare
from kiln.entry import script

with script(snakemake) as cfg:  # noqa: F821 (snakemake is injected by the script directive)
    prepare(cfg.datasets[snakemake.wildcards.dataset], snakemake.wildcards.split, snakemake.output[0])
