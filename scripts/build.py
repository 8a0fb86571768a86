"""Rule build: one engine on its device's backend (kiln.build)."""
import _kiln_path  # noqa: F401,I001 (puts the workflow's kiln package on sys.path)
from kiln.build import build_engine
from kiln.entry import script
from kiln.util import atomic_path

with script(snakemake) as cfg:  # noqa: F821
    w = snakemake.wildcards
    calib = snakemake.input.calib[0] if snakemake.input.calib else None
    info = build_engine(cfg, w.device, w.model, w.precision, snakemake.input.onnx, snakemake.output[0],
                        snakemake.threads, calib_npz=calib, engine_path=snakemake.output.engine)
    if info["status"] != "built":
        # The engine is a declared output (it goes to storage): empty when the build failed; the record says why.
        with atomic_path(snakemake.output.engine):
            pass
