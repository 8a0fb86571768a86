"""Rule quantize: int8/fp8 explicit Q/DQ by ModelOpt PTQ on the calibration split (kiln.precision.quantize)."""
import _kiln_path  # noqa: F401,I001 (puts the workflow's kiln package on sys.path)
from kiln.entry import script
from kiln.precision.quantize import variant_for_rule

with script(snakemake) as cfg:  # noqa: F821
    w = snakemake.wildcards
    variant_for_rule(
        cfg, w.model, w.precision, snakemake.input.onnx, snakemake.output.onnx, snakemake.output.record,
        calib_npz=snakemake.input.calib, calib_list=snakemake.output.calib_list,
        annotations=snakemake.input.annotations,
    )
