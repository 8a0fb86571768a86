"""Rule sensitivity: the ranked regions of a strict int8/fp8 variant on the calibration split (kiln.sensitivity)."""
import _kiln_path  # noqa: F401,I001 (puts the workflow's kiln package on sys.path)
from kiln.entry import script
from kiln.sensitivity import run_rule

with script(snakemake) as cfg:  # noqa: F821 (snakemake is injected by the script directive)
    run_rule(cfg, snakemake)  # noqa: F821
