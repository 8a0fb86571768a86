"""Rule surgery: onnx-graphsurgeon passes (kiln.surgery)."""
from kiln.entry import script
from kiln.surgery import run_passes

with script(snakemake) as cfg:  # noqa: F821
    run_passes(snakemake.input[0], snakemake.output.onnx, snakemake.output.record, snakemake.params.spec["surgery"])
