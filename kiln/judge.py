"""A precision variant judged against fp32 on the calibration split, with ONNX Runtime CPU.

Shared by the stages that decide which regions of a variant to keep in higher precision (rule
`sensitivity`, kiln/sensitivity.py; rule `fallback`, kiln/precision/fallback.py): below both. It
measures on the calibration split, never the validation split, so that the validation gate stays
a held-out check of what these stages chose.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from kiln import accuracy, parity
from kiln.batches import Inputs, run_batches
from kiln.specs import ModelSpec

PROVIDER = "CPUExecutionProvider"


def session(model: onnx.ModelProto | str | Path, threads: int = 0, optimize: bool = True):
    """An ONNX Runtime CPU session of a model in memory (or a file), optimised as ORT does by default; without
    `optimize` at ORT_DISABLE_ALL (the fp16 emulation, kiln.fp16_emulation: its Cast pairs run as written)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3  # ORT warns about every Q/DQ pair it cannot fuse on CPU
    if threads:
        so.intra_op_num_threads = threads
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, sess_options=so, providers=[PROVIDER])


@dataclass
class Judge:
    """The fp32 reference outputs of a split, and the gate a variant's outputs are held to."""

    spec: ModelSpec
    inputs: Inputs
    annotations: Path
    thresholds: dict  # validation.thresholds of the strict precision
    match_score: float
    batch_size: int
    threads: int = 0
    reference: dict = field(default_factory=dict)  # output name -> fp32 outputs
    reference_accuracy: dict = field(default_factory=dict)

    @classmethod
    def on_fp32(cls, fp32_onnx: str | Path, **kwargs) -> Judge:
        """A judge whose reference is `fp32_onnx` run on `inputs` (the calibration split)."""
        judge = cls(**kwargs)
        judge.reference = judge.run(fp32_onnx)
        judge.reference_accuracy = accuracy.score(accuracy.detections(judge.spec, judge.reference, judge.inputs),
                                                  judge.inputs, judge.annotations)
        return judge

    def run(self, model: onnx.ModelProto | str | Path, optimize: bool = True) -> dict[str, np.ndarray]:
        sess = session(model, self.threads, optimize)
        names = [o.name for o in sess.get_outputs()]
        return run_batches(lambda feeds: dict(zip(names, sess.run(names, feeds))), self.spec, self.inputs,
                           self.batch_size)

    def judge(self, outputs: dict[str, np.ndarray]) -> dict:
        """Parity per output, detection match, mAP drops, the gate's failures and one error number.

        `error` = (1 - parity score) + mAP50 drop, where the parity score is the weakest part the gate
        checks (box and score cosines, class agreement, detection match rate and box IoU), as one number
        to rank regions by (lower is better; 0 = the reference itself).
        """
        par = {"outputs": {name: parity.dense(self.reference[name], outputs[name]) for name in self.reference},
               "parts": parity.parts(self.spec.layout, self.spec.nms, self.reference, outputs, self.match_score)}
        dets = accuracy.detections(self.spec, outputs, self.inputs)
        ref_dets = accuracy.detections(self.spec, self.reference, self.inputs)
        par["detections"] = parity.detections(ref_dets, dets, self.match_score)
        acc = accuracy.score(dets, self.inputs, self.annotations)
        acc.update(map_drop=self.reference_accuracy["map50_95"] - acc["map50_95"],
                   map50_drop=self.reference_accuracy["map50"] - acc["map50"])
        result = {"parity": par, "accuracy": acc}
        # The validation gate itself (kiln.parity.gate: every semantic part, the detection match, the mAP drops),
        # so a mixed variant that passes here is held to what validation holds it to.
        failures = parity.gate(self.spec.layout, self.thresholds, result)
        score = min((c["value"] for c in parity.checks(par, self.thresholds)), default=1.0)  # the weakest part
        return {**result, "failures": failures, "passed": not failures,
                "error": round((1.0 - score) + acc["map50_drop"], 9)}

    def measure(self, model: onnx.ModelProto | str | Path, optimize: bool = True) -> dict:
        """Run `model` on the split and judge it (`optimize`: as :func:`session`); with the seconds it took."""
        t0 = time.perf_counter()
        out = self.judge(self.run(model, optimize))
        out["seconds"] = round(time.perf_counter() - t0, 3)
        return out


def brief(result: dict) -> dict:
    """The numbers of a judgement a table row holds: per-output cosine, match rate, mAP50 and drops."""
    return {
        "error": result["error"],
        "passed": result["passed"],
        "cosine": {k: round(v.get("cosine", 0.0), 6) for k, v in result["parity"]["outputs"].items()},
        "match_rate": round(result["parity"]["detections"]["match_rate"], 4),
        "map50": round(result["accuracy"]["map50"], 4),
        "map50_drop": round(result["accuracy"]["map50_drop"], 4),
        "map_drop": round(result["accuracy"]["map_drop"], 4),
        "failures": result["failures"],
        "seconds": result.get("seconds"),
    }
