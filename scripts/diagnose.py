"""Rule diagnose: a failed build reduced to its smallest failing subgraph (kiln.diagnose)."""
import _kiln_path  # noqa: F401,I001 (puts the workflow's kiln package on sys.path)
from kiln.diagnose import run_rule
from kiln.entry import script

with script(snakemake) as cfg:  # noqa: F821
    w, i = snakemake.wildcards, snakemake.input
    run_rule(cfg, w.device, w.model, w.precision, i.engine, i.onnx, snakemake.output[0])
