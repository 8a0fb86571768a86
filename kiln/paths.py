"""Every artifact path pattern of the DAG, in one place.

Rules use these with Snakemake wildcards left in braces; tests and the summary
format them with concrete values. Nothing else builds artifact paths.
"""

from __future__ import annotations

DATASET = "{results}/data/{dataset}/{split}/annotations.json"
# Generated images of a split (empty for a dataset on disk: its annotations name its own image folder).
DATASET_IMAGES = "{results}/data/{dataset}/{split}/images"
INPUTS = "{results}/inputs/{model}/{split}.npz"
EXPORT = "{results}/onnx/{model}/opset{opset}/export.onnx"
SIMPLIFIED = "{results}/onnx/{model}/opset{opset}/simplified.onnx"
SIMPLIFY_RECORD = "{results}/onnx/{model}/opset{opset}/simplify.json"
SURGERY = "{results}/onnx/{model}/opset{opset}/surgery.onnx"
SURGERY_RECORD = "{results}/onnx/{model}/opset{opset}/surgery.json"
VARIANT = "{results}/onnx/{model}/opset{opset}/{precision}.onnx"
VARIANT_RECORD = "{results}/onnx/{model}/opset{opset}/{precision}.json"
CALIB_LIST = "{results}/onnx/{model}/opset{opset}/{precision}.calib.txt"
# Layer sensitivity of a strict int8/fp8 variant on the calibration split (kiln/sensitivity.py).
SENSITIVITY = "{results}/sensitivity/{model}/opset{opset}/{precision}.json"
SENSITIVITY_MD = "{results}/sensitivity/{model}/opset{opset}/{precision}.md"
REFERENCE = "{results}/reference/{model}/opset{opset}/outputs.npz"
REFERENCE_RECORD = "{results}/reference/{model}/opset{opset}/reference.json"
ENGINE_RECORD = "{results}/engines/{device}/{model}/{precision}/engine.json"
# One name for every backend (ONNX Runtime's engine is an ONNX file): the build rule declares it as an
# output, so it goes to storage with the record (README: Building on devices). {suffix} is accepted, unused.
ENGINE_FILE = "{results}/engines/{device}/{model}/{precision}/model.engine"
VALIDATION = "{results}/validation/{device}/{model}/{precision}/validation.json"
# A failed build's smallest failing subgraph (kiln/diagnose.py; reduced.onnx lies beside it).
DIAGNOSIS = "{results}/diagnosis/{device}/{model}/{precision}/diagnosis.json"
PICTURE = "{results}/validation/{device}/{model}/{precision}/detections_{image_id}.png"
# A device's serving configs (kiln/serve/): a Triton model repository and DeepStream nvinfer configs.
SERVE_TRITON = "{results}/serve/{device}/triton"
SERVE_DEEPSTREAM = "{results}/serve/{device}/deepstream"
BASELINE = "{results}/baseline/{device}/{model}.json"
SUMMARY_JSON = "{results}/report/summary.json"
SUMMARY_CSV = "{results}/report/summary.csv"
SUMMARY_MD = "{results}/report/summary.md"
# Kiln's comparison page and its figures (folders: across a model's devices, and per device).
PAGE_HTML = "{results}/report/kiln.html"
PAGE_MD = "{results}/report/kiln.md"
MODEL_PLOTS = "{results}/report/plots/models"
DEVICE_PLOTS = "{results}/report/plots/devices"
# Inside those folders (the page rule declares the folders: under storage they are local copies).
MODEL_PLOT_IN = "{model}/{plot}.png"
DEVICE_PLOT_IN = "{model}/{device}/{plot}.png"
DEVICE_PICTURE_IN = "{model}/{device}/{plot}.jpg"  # detection pictures side by side (photos: JPEG)
MODEL_PLOT = MODEL_PLOTS + "/" + MODEL_PLOT_IN
DEVICE_PLOT = DEVICE_PLOTS + "/" + DEVICE_PLOT_IN
DEVICE_PICTURE = DEVICE_PLOTS + "/" + DEVICE_PICTURE_IN
LOG = "{results}/logs/{rule}/{name}.log"


def fmt(pattern: str, **values) -> str:
    """Fill a pattern completely; a missing value is a programming error, so KeyError is right."""
    return pattern.format(**values)


def local_copies(files) -> callable:
    """Map artifact paths to the files a job was given for them.

    With a default storage provider (README: Building on devices) a job's inputs are local copies
    whose paths end with the artifact path (.snakemake/storage/fs/<prefix>/results/...); without
    one they are the artifact paths themselves. Paths that are not among `files` map to themselves.
    """
    given = [str(f) for f in files]

    def local(path: str) -> str:
        path = str(path)
        for f in given:
            if f == path or f.endswith("/" + path.lstrip("./")):
                return f
        return path

    return local


def partial(pattern: str, **values) -> str:
    """Fill some fields and keep the others as Snakemake wildcards."""

    class Keep(dict):
        def __missing__(self, key):
            return "{" + key + "}"

    return pattern.format_map(Keep(values))
