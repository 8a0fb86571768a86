"""Rule fallback: the mixed variant keeping the most sensitive regions in higher precision (kiln.precision.fallback)."""
import _kiln_path  # noqa: F401,I001 (puts the workflow's kiln package on sys.path)
from kiln.entry import script
from kiln.precision.fallback import run_rule

with script(snakemake) as cfg:  # noqa: F821 (snakemake is injected by the script directive)
    run_rule(cfg, snakemake)  # noqa: F821
