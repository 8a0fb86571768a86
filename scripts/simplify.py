"""Rule simplify: onnxsim with pass-through on failure (kiln.simplify)."""
from kiln.entry import script
from kiln.simplify import simplify

with script(snakemake) as cfg:  # noqa: F821
    simplify(snakemake.input[0], snakemake.output.onnx, snakemake.output.record, snakemake.params.spec["simplify"])
