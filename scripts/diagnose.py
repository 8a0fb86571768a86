"""Rule diagnose: a failed build reduced to its smallest failing subgraph (kiln.diagnose)."""
import _kiln_path  # noqa: F401,I001 (puts the workflow's kiln package on sys.path)
from kiln import integrity
from kiln.diagnose import run_rule
from kiln.entry import script
from kiln.util import read_json

with script(snakemake) as cfg:  # noqa: F821
    w, i = snakemake.wildcards, snakemake.input
    # The ONNX reduced must be the one the engine record says was built (kiln/integrity.py).
    integrity.check(integrity.onnx_problem(read_json(i.engine), i.engine, i.onnx))
    run_rule(cfg, w.device, w.model, w.precision, i.engine, i.onnx, snakemake.output[0])
