"""Rule precision: fp32 copy, fp16/bf16 by ModelOpt AutoCast (kiln.precision.cast)."""
import _kiln_path  # noqa: F401,I001 (puts the workflow's kiln package on sys.path)
from kiln.entry import script
from kiln.precision.cast import variant_for_rule

with script(snakemake) as cfg:  # noqa: F821
    w = snakemake.wildcards
    variant_for_rule(cfg, w.model, w.precision, snakemake.input[0], snakemake.output.onnx, snakemake.output.record)
