"""Rule validate: parity, mAP and latency of one engine on its device (kiln.validate)."""
import _kiln_path  # noqa: F401,I001 (puts the workflow's kiln package on sys.path)
from kiln.entry import script
from kiln.validate import validate

with script(snakemake) as cfg:  # noqa: F821
    w, i = snakemake.wildcards, snakemake.input
    validate(cfg, w.device, w.model, w.precision, i.engine, i.reference, i.reference_record, i.inputs,
             i.annotations, snakemake.output[0], threads=snakemake.threads, baseline=getattr(i, "baseline", None),
             engine_file=i.engine_file)
