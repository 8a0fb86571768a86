"""Stage `serve`: serving configs for every built engine of a device (README: Deploying).

One job per device writes two folders: ``results/serve/{device}/triton/`` (a Triton model repository,
kiln/serve/triton.py) and ``results/serve/{device}/deepstream/`` (nvinfer configs,
kiln/serve/deepstream.py). A folder per device, not files per engine: a Triton server loads one
repository, and Snakemake's directory() outputs are made whole or not at all. Engines whose build
failed are left out (their record says why); a device without one built engine gets empty folders.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import kiln
from kiln import backends, integrity, paths
from kiln.serve import deepstream, triton
from kiln.util import read_json, scratch_dir

log = logging.getLogger(__name__)

def targets(cfg, can_build: dict[str, str | None]) -> list[str]:
    """Both folders of every device this run builds engines of."""
    return [paths.fmt(p, results=cfg.results, device=d) for d in cfg.devices if can_build.get(d) is None
            for p in (paths.SERVE_TRITON, paths.SERVE_DEEPSTREAM)]


def _jobs(cfg, device: str) -> list[dict]:
    d = cfg.devices[device]
    return [{"results": cfg.results, "device": device, "model": m, "precision": p} for m in d.models
            for p in d.precisions]


def engine_records(cfg, device: str) -> list[str]:
    return [paths.fmt(paths.ENGINE_RECORD, **k) for k in _jobs(cfg, device)]


def engine_files(cfg, device: str) -> list[str]:
    return [paths.fmt(paths.ENGINE_FILE, **k) for k in _jobs(cfg, device)]


def engine_sources(cfg, device: str) -> list[str]:
    """The ONNX each engine was built from: I/O of engines that are not ONNX, and DeepStream's onnx-file."""
    d = cfg.devices[device]
    return list(dict.fromkeys(paths.fmt(paths.VARIANT, results=cfg.results, model=k["model"], opset=d.opset,
                                        precision=d.variant_of(k["precision"])) for k in _jobs(cfg, device)))


def annotations(cfg, device: str) -> list[str]:
    """Validation annotations of the device's models: their categories are the class names."""
    return list(dict.fromkeys(paths.fmt(paths.DATASET, results=cfg.results, dataset=cfg.models[m].dataset,
                                        split="val") for m in cfg.devices[device].models))


def validations(cfg, device: str, can_run: dict[str, str | None]) -> list[str]:
    """Validations where this run makes them: their best stream count sets instance_group."""
    if can_run.get(device) is not None:
        return []
    return [paths.fmt(paths.VALIDATION, **k) for k in _jobs(cfg, device)]


def params(cfg, device: str) -> dict:
    """What the configs are made of besides the inputs, as plain values Snakemake tracks."""
    d = cfg.devices[device]
    fields = ("layout", "input_size", "preprocess", "dynamic_batch", "nms", "decode")
    return {
        "backend": d.backend, "batch_sizes": list(d.batch_sizes),
        "serve_format": asdict(backends.get(d.backend).serve_format(d)),
        "models": {m: {f: getattr(cfg.models[m], f) for f in fields} for m in d.models},
    }


def class_names(annotations_path: str | Path) -> list[str]:
    """Category names by 0-based class id (Kiln's labels index the categories sorted by id)."""
    cats = sorted(json.loads(Path(annotations_path).read_text())["categories"], key=lambda c: c["id"])
    return [str(c["name"]) for c in cats]


def run_rule(cfg, job) -> None:
    """Rule `serve`: both folders of one device."""
    local = paths.local_copies(job.input)
    serve_device(cfg, job.wildcards.device, local, Path(job.output.triton), Path(job.output.deepstream),
                 with_validation=bool(job.input.validations))


def _publish(tmp: Path, dst: Path) -> None:
    """Move a finished folder onto `dst` (a rerun's old one removed): no half-written folder at `dst`."""
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(tmp, dst)


def serve_device(cfg, device: str, local, triton_dir: Path, deepstream_dir: Path,
                 with_validation: bool = False) -> list[str]:
    """Write the device's Triton repository and DeepStream configs; returns the served engines' names.

    `local` maps an artifact path to the file this job was given for it (paths.local_copies);
    `with_validation`: validations were given (their best stream count sets instance_group).
    """
    d = cfg.devices[device]
    fmt = backends.get(d.backend).serve_format(d)
    kind = "KIND_GPU" if backends.get(d.backend).needs_gpu(d, "validate") else "KIND_CPU"
    served = []
    with scratch_dir(triton_dir) as work:
        tri, ds = work / "triton", work / "deepstream"
        tri.mkdir()
        ds.mkdir()
        for key in _jobs(cfg, device):
            record_path = paths.fmt(paths.ENGINE_RECORD, **key)
            rec = read_json(local(record_path))
            name = f"{key['model']}_{key['precision']}"
            if rec.get("status") != "built":
                log.info("serve %s/%s: not built (%s), left out", device, name, rec.get("reason"))
                continue
            engine = local(paths.fmt(paths.ENGINE_FILE, **key))
            source = local(paths.fmt(paths.VARIANT, results=cfg.results, model=key["model"], opset=d.opset,
                                     precision=d.variant_of(key["precision"])))
            integrity.check(integrity.engine_problem(rec, local(record_path), engine, target=record_path))
            integrity.check(integrity.onnx_problem(rec, local(record_path), source, target=record_path))
            spec = cfg.models[key["model"]]
            names = class_names(local(paths.fmt(paths.DATASET, results=cfg.results, dataset=spec.dataset,
                                                split="val")))
            validation = local(paths.fmt(paths.VALIDATION, **key)) if with_validation else None
            write_triton(tri, name, rec, fmt, kind, spec, d, engine, source, names, record_path,
                         triton.best_streams(validation))
            write_deepstream(ds / name, rec, fmt, spec, d, key["precision"], engine, source, names,
                             triton_engine=f"../../triton/{name}/1/{fmt.triton_file}" if fmt.nvinfer_engine else None)
            served.append(name)
        _publish(tri, Path(triton_dir))
        deepstream_dir.parent.mkdir(parents=True, exist_ok=True)
        _publish(ds, Path(deepstream_dir))
    log.info("serve %s: %d engine(s): %s", device, len(served), ", ".join(served) or "none built")
    return served


def write_triton(repo: Path, name: str, rec: dict, fmt, kind: str, spec, device, engine: str, source: str,
                 names: list[str], record_path: str, instances: int) -> None:
    """The engine's native model (where Triton has a backend for it) and its end-to-end detector."""
    labels = "\n".join(names) + "\n"
    if fmt.triton_platform:
        inputs, outputs = triton.graph_io(engine if fmt.engine_is_onnx else source)
        inputs = triton.profile_shapes(inputs, rec.get("profiles") or [])
        max_batch = triton.max_batch_size(rec, inputs, device.batch_sizes)
        folder = repo / name
        triton.place(engine, folder / "1" / fmt.triton_file)
        (folder / triton.LABELS).write_text(labels)
        (folder / "config.pbtxt").write_text(triton.config_text(
            name, platform=fmt.triton_platform, max_batch=max_batch, inputs=inputs, outputs=outputs,
            preferred=list(device.batch_sizes), instances=instances, kind=kind,
            comment=f"{rec['backend']} engine {record_path} (Kiln serve stage)"))
    folder = repo / (name + triton.DETECTOR_SUFFIX)
    version = folder / "1"
    triton.place(engine, version / "engine" / Path(paths.ENGINE_FILE).name)
    (version / "engine").mkdir(parents=True, exist_ok=True)
    (version / "engine" / Path(paths.ENGINE_RECORD).name).write_text(json.dumps(rec, indent=1))
    (version / "engine" / "model.json").write_text(json.dumps(
        {"model": asdict(spec), "class_names": names, "device": asdict(device)}, indent=1, default=list))
    (version / "model.py").write_text(triton.MODEL_PY)
    (version / "kiln.json").write_text(json.dumps({"kiln_root": str(Path(kiln.__file__).resolve().parent.parent)}))
    (folder / triton.LABELS).write_text(labels)
    (folder / "config.pbtxt").write_text(triton.config_text(
        folder.name, backend="python", max_batch=0, inputs=triton.DETECTOR_INPUTS,
        outputs=triton.DETECTOR_OUTPUTS, preferred=[], instances=instances, kind="KIND_CPU",
        labels={"CLASSES": triton.LABELS},
        comment=f"images in, detections out: kiln.runtime.Detector on {record_path} (Kiln serve stage)"))


def write_deepstream(folder: Path, rec: dict, fmt, spec, device, precision: str, engine: str, source: str,
                     names: list[str], triton_engine: str | None) -> None:
    """config_infer_primary.txt and labels.txt; the engine file where nvinfer loads it, else the ONNX."""
    folder.mkdir(parents=True)
    onnx_file = None
    if not fmt.nvinfer_engine:  # nvinfer builds its own TensorRT engine from the precision variant
        triton.place(source, folder / "model.onnx")
        onnx_file = "model.onnx"
    inputs, _ = triton.graph_io(engine if fmt.engine_is_onnx else source)
    inputs = triton.profile_shapes(inputs, rec.get("profiles") or [])
    max_batch = triton.max_batch_size(rec, inputs, device.batch_sizes)
    batch = max_batch or (inputs[0].shape[0] if inputs[0].shape[0] > 0 else 1)
    calib = rec.get("calibration_cache")
    if calib and Path(calib).is_file():
        triton.place(calib, folder / "calibration.cache")
    (folder / "labels.txt").write_text("\n".join(names) + "\n")
    (folder / "config_infer_primary.txt").write_text(deepstream.config_text(
        spec=spec, precision=precision, batch_size=batch, num_classes=len(names), engine_file=triton_engine,
        onnx_file=onnx_file, calib_file="calibration.cache" if calib and Path(calib).is_file() else None))
