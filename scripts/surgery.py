"""Rule surgery: onnx-graphsurgeon passes, the devices' required rewrites, NMS (kiln.surgery)."""
import _kiln_path  # noqa: F401,I001 (puts the workflow's kiln package on sys.path)
from kiln.entry import script
from kiln.surgery import device_passes, run_passes

with script(snakemake) as cfg:  # noqa: F821
    spec = snakemake.params.spec
    w = snakemake.wildcards
    # Which device asked for which pass goes into the record only (not a param: renaming a device reruns nothing).
    run_passes(snakemake.input[0], snakemake.output.onnx, snakemake.output.record, spec["surgery"],
               nms=spec.get("nms"), required_by=device_passes(cfg, w.model, int(w.opset)))
