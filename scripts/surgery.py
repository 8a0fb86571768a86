"""Rule surgery: onnx-graphsurgeon passes (kiln.surgery)."""
import _kiln_path  # noqa: F401,I001 (puts the workflow's kiln package on sys.path)
from kiln.entry import script
from kiln.surgery import run_passes

with script(snakemake) as cfg:  # noqa: F821
    run_passes(snakemake.input[0], snakemake.output.onnx, snakemake.output.record, snakemake.params.spec["surgery"])
