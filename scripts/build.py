"""Rule build: one engine on its device's backend (kiln.build)."""
from kiln.build import build_engine
from kiln.entry import script

with script(snakemake) as cfg:  # noqa: F821
    w = snakemake.wildcards
    build_engine(cfg, w.device, w.model, w.precision, snakemake.input.onnx, snakemake.output[0], snakemake.threads)
