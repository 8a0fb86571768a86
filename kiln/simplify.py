"""Stage `simplify`: onnxsim; on failure the graph passes on unchanged and the record says why.

A full disk (or quota) is not onnxsim's failure: it is raised, for the entry point to name in one line.
Every output goes through an atomic temporary, the pass-through copy too.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from kiln.util import atomic_path, disk_error, write_json

log = logging.getLogger(__name__)


def params(cfg, model: str) -> dict:
    return {"simplify": cfg.models[model].simplify}


def _pass_through(src: str | Path, dst: str | Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def simplify(src: str | Path, dst: str | Path, record: str | Path, enabled: bool = True) -> dict:
    """Simplify `src` into `dst`; always writes `record` with status simplified, failed or skipped."""
    import onnx

    t0 = time.perf_counter()
    info: dict = {"tool": "onnxsim"}
    model = onnx.load(str(src))
    nodes_in = len(model.graph.node)
    if not enabled:
        info.update(status="skipped", reason="simplify: false in config")
        _pass_through(src, dst)
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
        except Exception as err:  # onnxsim raises many types; any failure of its own means pass-through
            if disk_error(err) is not None:
                raise
            reason = f"{type(err).__name__}: {err}".splitlines()[0][:500]
            log.warning("simplify FAILED, passing the graph on unchanged: %s", reason)
            info.update(status="failed", reason=reason, nodes_in=nodes_in, nodes_out=nodes_in)
            _pass_through(src, dst)
    info["seconds"] = round(time.perf_counter() - t0, 3)
    write_json(record, info)
    return info


def run_rule(cfg, job) -> None:
    """Rule `simplify`: onnxsim on the export (or the graph passed on, with the reason)."""
    simplify(job.input[0], job.output.onnx, job.output.record, job.params.spec["simplify"])
