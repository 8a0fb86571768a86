"""Rule export: checkpoint to ONNX at one opset (kiln.export)."""
from kiln.entry import script
from kiln.export import export_onnx

with script(snakemake) as cfg:  # noqa: F821
    export_onnx(cfg.models[snakemake.wildcards.model], int(snakemake.wildcards.opset), snakemake.output[0])
