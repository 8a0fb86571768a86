"""Rule export: checkpoint to ONNX at one opset (kiln.export)."""
import _kiln_path  # noqa: F401,I001 (puts the workflow's kiln package on sys.path)
from kiln.entry import script
from kiln.export import export_onnx

with script(snakemake) as cfg:  # noqa: F821
    export_onnx(cfg.models[snakemake.wildcards.model], int(snakemake.wildcards.opset), snakemake.output[0])
