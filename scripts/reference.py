"""Rule reference: fp32 ONNX Runtime outputs on the validation inputs (kiln.reference)."""
import _kiln_path  # noqa: F401,I001 (puts the workflow's kiln package on sys.path)
from kiln.entry import script
from kiln.reference import make_reference

with script(snakemake) as cfg:  # noqa: F821
    i, o = snakemake.input, snakemake.output
    make_reference(cfg, snakemake.wildcards.model, i.onnx, i.inputs, i.annotations, o.outputs, o.record)
