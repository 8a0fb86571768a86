"""Every artifact path pattern of the DAG, in one place.

Rules use these with Snakemake wildcards left in braces; tests and the summary
format them with concrete values. Nothing else builds artifact paths.
"""

from __future__ import annotations

DATASET = "{results}/data/{dataset}/{split}/annotations.json"
INPUTS = "{results}/inputs/{model}/{split}.npz"
EXPORT = "{results}/onnx/{model}/opset{opset}/export.onnx"
SIMPLIFIED = "{results}/onnx/{model}/opset{opset}/simplified.onnx"
SIMPLIFY_RECORD = "{results}/onnx/{model}/opset{opset}/simplify.json"
SURGERY = "{results}/onnx/{model}/opset{opset}/surgery.onnx"
SURGERY_RECORD = "{results}/onnx/{model}/opset{opset}/surgery.json"
VARIANT = "{results}/onnx/{model}/opset{opset}/{precision}.onnx"
VARIANT_RECORD = "{results}/onnx/{model}/opset{opset}/{precision}.json"
CALIB_LIST = "{results}/onnx/{model}/opset{opset}/{precision}.calib.txt"
REFERENCE = "{results}/reference/{model}/opset{opset}/outputs.npz"
REFERENCE_RECORD = "{results}/reference/{model}/opset{opset}/reference.json"
ENGINE_RECORD = "{results}/engines/{device}/{model}/{precision}/engine.json"
ENGINE_FILE = "{results}/engines/{device}/{model}/{precision}/model{suffix}"
VALIDATION = "{results}/validation/{device}/{model}/{precision}/validation.json"
SUMMARY_JSON = "{results}/report/summary.json"
SUMMARY_CSV = "{results}/report/summary.csv"
SUMMARY_MD = "{results}/report/summary.md"
LOG = "{results}/logs/{rule}/{name}.log"


def fmt(pattern: str, **values) -> str:
    """Fill a pattern completely; a missing value is a programming error, so KeyError is right."""
    return pattern.format(**values)


def partial(pattern: str, **values) -> str:
    """Fill some fields and keep the others as Snakemake wildcards."""

    class Keep(dict):
        def __missing__(self, key):
            return "{" + key + "}"

    return pattern.format_map(Keep(values))
