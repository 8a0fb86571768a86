"""Stage `simplify`: onnxsim; on failure the graph passes on unchanged and the record says why."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from kiln.util import atomic_path, write_json

log = logging.getLogger(__name__)


def params(cfg, model: str) -> dict:
    return {"simplify": cfg.models[model].simplify}


def simplify(src: str | Path, dst: str | Path, record: str | Path, enabled: bool = True) -> dict:
    """Simplify `src` into `dst`; always writes `record` with status simplified, failed or skipped."""
    import onnx

    t0 = time.perf_counter()
    info: dict = {"tool": "onnxsim"}
    model = onnx.load(str(src))
    nodes_in = len(model.graph.node)
    if not enabled:
        info.update(status="skipped", reason="simplify: false in config")
        shutil.copyfile(src, dst)
    else:
        try:
            import onnxsim

            info["version"] = onnxsim.__version__
            simplified, ok = onnxsim.simplify(model)
            if not ok:
                raise RuntimeError("onnxsim's own check found the simplified graph's outputs differ")
            with atomic_path(dst) as tmp:
                onnx.save(simplified, str(tmp))
            info.update(status="simplified", nodes_in=nodes_in, nodes_out=len(simplified.graph.node))
            log.info("simplify: %d -> %d nodes", nodes_in, len(simplified.graph.node))
        except Exception as err:  # onnxsim raises many types; any failure means pass-through
            reason = f"{type(err).__name__}: {err}".splitlines()[0][:500]
            log.warning("simplify FAILED, passing the graph on unchanged: %s", reason)
            info.update(status="failed", reason=reason, nodes_in=nodes_in, nodes_out=nodes_in)
            shutil.copyfile(src, dst)
    info["seconds"] = round(time.perf_counter() - t0, 3)
    write_json(record, info)
    return info
