"""ModelOpt AutoCast, called once: the precision rule's fp16/bf16 conversion and the quantize rule's second
pass (everything not quantized lowered to fp16). Below both rule modules, so neither imports the other.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx

from kiln.precision.modelopt_log import Capture


def autocast(
    src: Path,
    dst: Path,
    low: str,
    *,
    keep_io_types: bool,
    nodes_to_exclude: list[str],
    op_types_to_exclude: list[str],
    calib: Mapping[str, np.ndarray] | None,
    work: Path,
    capture: Capture,
    what: str,
    range_check: bool = True,
) -> Path:
    """ModelOpt AutoCast ``src`` to fp16/bf16 at ``dst``.

    With ``range_check`` AutoCast runs ``src`` once in ORT CPU (on ``calib`` or random data) and
    keeps nodes whose activations exceed +-512 (where fp16's step is 0.5) in fp32; without it every
    node not excluded goes to ``low``.
    """
    from modelopt.onnx.autocast import convert_to_mixed_precision

    ref = None
    if calib is not None and range_check:
        # AutoCast's reference run takes an .npz path (samples stacked on axis 0, like quantize()).
        ref = str(work / "autocast_reference.npz")
        np.savez(ref, **calib)
    with capture.active():
        try:
            model = convert_to_mixed_precision(
                onnx_path=str(src),
                low_precision_type=low,
                nodes_to_exclude=nodes_to_exclude or None,
                op_types_to_exclude=op_types_to_exclude or None,
                keep_io_types=keep_io_types,
                calibration_data=ref if range_check else None,
                **({} if range_check else {"data_max": np.inf}),
                providers=["cpu"],  # a fresh list: ModelOpt mutates its default
            )
            onnx.save(model, str(dst))
        except Exception as e:
            raise RuntimeError(
                f"ModelOpt AutoCast ({low}) failed on {what}: {type(e).__name__}: {e}{capture.context()}"
            ) from e
    return dst
