"""Rule simplify: onnxsim with pass-through on failure (kiln.simplify)."""
import _kiln_path  # noqa: F401,I001 (puts the workflow's kiln package on sys.path)
from kiln.entry import script
from kiln.simplify import simplify

with script(snakemake) as cfg:  # noqa: F821
    simplify(snakemake.input[0], snakemake.output.onnx, snakemake.output.record, snakemake.params.spec["simplify"])
