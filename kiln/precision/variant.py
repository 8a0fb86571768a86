"""The steps every variant goes through, around the one ModelOpt conversion a rule module supplies.

Checks, the fp32 copy, the scratch directory, the output Sigmoids and score tail kept fp32,
verification, the record and the atomic write are the same for both rules; ``kiln.precision.cast``
(rule ``precision``) and ``kiln.precision.quantize`` (rule ``quantize``) pass ``make`` their
conversion step.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from kiln.errors import KilnError
from kiln.precision.checks import check_calib, check_convertible, check_options, load_source, verify
from kiln.precision.graph import canonical_value_info, find_output_sigmoids, find_score_tail, match_nodes, name_nodes
from kiln.precision.modelopt_log import Capture
from kiln.precision.options import PrecisionOptions
from kiln.precision.records import sigmoid_report, start_record, summary, warn_about_result
from kiln.util import atomic_path, scratch_dir


@dataclass
class Conversion:
    """What a rule's conversion step gets from ``make``; it returns the path of the converted model."""

    src: Path  # the fp32 ONNX as the caller gave it (for messages)
    model: onnx.ModelProto  # its checked fp32 model, every node named
    path: Path  # that model, saved in the scratch directory
    work: Path  # the scratch directory: ModelOpt's intermediates go here
    options: PrecisionOptions
    calib: dict[str, np.ndarray] | None  # checked, in the graph inputs' dtypes
    keep_fp32: list[str]  # names of the output Sigmoids and their score tail
    user_patterns: list[str]  # options.nodes_to_exclude, anchored at the name's end
    record: dict[str, Any]  # the step adds its method and settings
    capture: Capture
    log: Callable[[str], Any]


def make(
    src: Path,
    dst: Path,
    options: PrecisionOptions,
    calib: dict[str, np.ndarray] | None,
    log: Callable[[str], Any],
    *,
    precisions: tuple[str, ...],
    convert: Callable[[Conversion], Path],
) -> dict:
    """Write the variant of ``src`` at ``dst`` with ``convert`` (kiln.precision.make_variant says how).

    ``precisions`` are those the caller's rule makes; fp32 among them is copied, not converted.
    """
    t0 = time.perf_counter()
    src, dst = Path(src), Path(dst)
    check_options(src, options)
    if options.precision not in precisions:
        raise ValueError(
            f"{options.precision} is not made here ({', '.join(precisions)}); call kiln.precision.make_variant"
        )
    if src.resolve() == dst.resolve():
        raise KilnError(f"{dst}: the variant must not overwrite its source {src}; give another output path")
    model, external = load_source(src)
    if options.precision != "fp32":
        check_convertible(src, model, options)
    calib = check_calib(src, model, options.precision, calib)

    record = start_record(src, dst, options)
    dst.parent.mkdir(parents=True, exist_ok=True)

    if options.precision == "fp32":
        record.update(tool="copy", tool_version=None, method="copy")
        if external:  # the .onnx alone would point at data files that are not beside dst
            atomic_write(model.SerializeToString(), dst)
        else:
            atomic_copy(src, dst)
        record.update(summary(model, model), size_bytes=dst.stat().st_size)
        record["wall_s"] = round(time.perf_counter() - t0, 3)
        log(f"fp32: copied {src} -> {dst}")
        return record

    import modelopt  # lazy: pulls in torch, ~2 s
    import onnxruntime

    record.update(tool="modelopt", tool_version=modelopt.__version__, ort_version=onnxruntime.__version__)

    # ModelOpt writes intermediates (<name>_opset19.onnx, _named.onnx, ...) next to its input and
    # output; it works on a copy in a scratch dir so none land beside src or dst, even on failure.
    with scratch_dir(dst) as work:
        work_src = work / "model.onnx"
        name_nodes(model)  # exclusion lists and our checks address nodes by name
        onnx.save(model, str(work_src))

        sigmoids = find_output_sigmoids(model) if options.keep_output_sigmoid else []
        tail = find_score_tail(model, sigmoids) if sigmoids else []
        keep_fp32 = sigmoids + tail
        user_patterns = [f"(?:{p})$" for p in options.nodes_to_exclude]
        record["excluded"] = {
            "output_sigmoids": sigmoids,
            "score_tail": tail,
            "nodes_matching_patterns": match_nodes(model, user_patterns),
            "op_types": list(options.op_types_to_exclude),
        }

        capture = Capture(log)
        out = convert(
            Conversion(src, model, work_src, work, options, calib, keep_fp32, user_patterns, record, capture, log)
        )

        variant = onnx.load(str(out))
        canonical_value_info(variant.graph)
        verify(src, model, variant, options)
        record.update(summary(model, variant))
        record["output_sigmoids"] = sigmoid_report(variant, sigmoids)
        warn_about_result(record, options, log)
        record["modelopt_warnings"] = capture.warnings
        record["modelopt_noise_suppressed"] = capture.suppressed
        # The canonical proto, not ModelOpt's file: same bytes for the same input on every run.
        atomic_write(variant.SerializeToString(), dst)

    record["size_bytes"] = dst.stat().st_size
    record["wall_s"] = round(time.perf_counter() - t0, 3)
    added = record["op_delta"]
    log(
        f"{options.precision}: wrote {dst} in {record['wall_s']:.1f} s, opset {record['opset']}; "
        + ", ".join(f"{k} {v:+d}" for k, v in sorted(added.items()))
        + f"; node dtypes {record['nodes_by_output_dtype']}"
    )
    return record


def atomic_write(data: bytes, dst: Path) -> None:
    """Write ``data`` to ``dst`` through a temporary beside it, renamed."""
    with atomic_path(dst) as tmp:
        tmp.write_bytes(data)


def atomic_copy(path: Path, dst: Path) -> None:
    """Copy ``path`` to ``dst`` through a temporary beside it, renamed."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(path, tmp)
