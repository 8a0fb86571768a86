"""The GPU device's rows on a GPU host: build, PyTorch baseline and validation of an ONNX Runtime CUDA device.

This is the device host's half of README's "Several device hosts sharing storage", run by Kiln's own
stage functions (the `build`, `baseline` and `validate` rules' code) instead of Snakemake, for a
GPU machine that has no package registry: the build host checks the config and makes every
artifact the device validates from (`snakemake artifacts`), and pickles the checked config; this
script, on the GPU host, builds the device's engines, times PyTorch eager on the same GPU and
validates each engine (parity against the CPU reference, mAP, CUDA-event latency on
device-resident I/O), then writes the summary of every row. What it needs on the GPU host:
Python 3.10+, numpy, onnx, torch (any CUDA build: importing it first loads the CUDA libraries that
onnxruntime-gpu needs), onnxruntime-gpu for the driver's CUDA, cuda-python (cuda.bindings), pycocotools,
Pillow and PyYAML. It needs no Snakemake, no ModelOpt and no TensorRT.

    # build host (no GPU):
    snakemake --configfile gpu.yaml --cores all artifacts
    python bench/gpu_rows.py pickle --configfile gpu.yaml --out kiln-config.pkl
    # GPU host, in a copy of the checkout with the build host's results/ beside it:
    python bench/gpu_rows.py run --config kiln-config.pkl --device h200-ort --out gpu-summary

The summary (summary.json, .csv, .md) and the validations land in results/ and in --out.
docs/latency.md ("ONNX Runtime on an H200") records a run.
"""

from __future__ import annotations

import argparse
import json
import pickle
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def pickle_config(configfile: str, out: str) -> None:
    from kiln.config import load_file

    cfg = load_file(configfile, base=".")
    Path(out).write_bytes(pickle.dumps(cfg))
    print(f"{out}: the checked config of {configfile}")


def run(config: str, device: str, out: str) -> int:
    import torch  # loads the CUDA runtime, cuBLAS and cuDNN that onnxruntime-gpu links against

    from kiln import baseline, build, paths, summary, validate
    from kiln.backends import get

    cfg = pickle.loads(Path(config).read_bytes())
    d = cfg.devices[device]
    reason = get(d.backend).check_host(d)
    if reason:
        print(f"kiln: device '{device}' cannot run here: {reason}", file=sys.stderr)
        return 1
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}", flush=True)
    R = cfg.results
    t0 = time.perf_counter()
    for model in d.models:
        base = paths.fmt(paths.BASELINE, results=R, device=device, model=model)
        inputs = paths.fmt(paths.INPUTS, results=R, model=model, split="val")
        baseline.run_baseline(cfg, device, model, inputs, base, threads=0)
        for precision in d.precisions:
            key = {"results": R, "device": device, "model": model, "precision": precision}
            record = paths.fmt(paths.ENGINE_RECORD, **key)
            onnx = paths.fmt(paths.VARIANT, results=R, model=model, opset=d.opset, precision=d.variant_of(precision))
            info = build.build_engine(cfg, device, model, precision, onnx, record)
            print(f"build {model}/{precision}: {info['status']} {info.get('reason') or ''}", flush=True)
            ref = {"results": R, "model": model, "opset": d.opset}
            result = validate.validate(
                cfg, device, model, precision, record, paths.fmt(paths.REFERENCE, **ref),
                paths.fmt(paths.REFERENCE_RECORD, **ref), inputs,
                paths.fmt(paths.DATASET, results=R, dataset=cfg.models[model].dataset, split="val"),
                paths.fmt(paths.VALIDATION, **key), baseline=base)
            print(f"validate {model}/{precision}: {result['status']} {result.get('reason') or ''}", flush=True)
    outs = [paths.fmt(p, results=R) for p in (paths.SUMMARY_JSON, paths.SUMMARY_CSV, paths.SUMMARY_MD)]
    can_build = {name: None if name == device else "not run in this GPU run" for name in cfg.devices}
    summary.write_summary(cfg, *outs, cannot_build={k: v for k, v in can_build.items() if v},
                          cannot_run={k: v for k, v in can_build.items() if v})
    dst = Path(out)
    dst.mkdir(parents=True, exist_ok=True)
    for p in outs:
        shutil.copy(p, dst / Path(p).name)
    rows = json.loads(Path(outs[0]).read_text())["rows"]
    print(f"{len(rows)} rows in {time.perf_counter() - t0:.0f} s; {dst}/summary.md", flush=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pickle", help="on the build host: the checked config, pickled")
    p.add_argument("--configfile", required=True)
    p.add_argument("--out", default="kiln-config.pkl")
    r = sub.add_parser("run", help="on the GPU host: build, baseline, validate the device; the summary")
    r.add_argument("--config", default="kiln-config.pkl")
    r.add_argument("--device", required=True)
    r.add_argument("--out", default="gpu-summary")
    args = ap.parse_args()
    if args.command == "pickle":
        pickle_config(args.configfile, args.out)
        return 0
    return run(args.config, args.device, args.out)


if __name__ == "__main__":
    sys.exit(main())
