"""Kiln's own cost in Snakemake: dry-run and no-op times of a large matrix, against a bare Snakefile.

    .venv/bin/python bench/workflow_overhead.py [--models 20] [--devices 10] [--repeat 3] [--keep DIR]
    .venv/bin/python bench/workflow_overhead.py --profile kiln.prof   # also cProfile one Kiln dry run

Generates, in a temporary folder:

* ``kiln/``: a Kiln config of N models (YOLO and RT-DETR layouts alternating, tiny state_dict
  checkpoints: a dry run builds no model, but config load checks each one, weights-only) and M ONNX Runtime CPU devices
  (different names, opsets 13 to 17 in turn, precisions fp32, fp16 and int8: all the CPU provider
  runs), run with the repository's Snakefile;
* ``cache/``: Kiln's cache folder (``KILN_CACHE_DIR``, so the user's is not written). The first,
  untimed dry run checks the checkpoints and caches the passes; the timed runs reuse them, as every
  parse after the first does (the steady state: no torch import at config load);
* ``bare/``: the floor that Snakemake itself sets for the same DAG: a Snakefile generated from Kiln's
  own rules, with the same rule names, the same output patterns (wildcard constraints included,
  directory() kept), and inputs that give each job exactly the input files Kiln's dry run listed for
  it, through one dict lookup. No params, resources, scripts or config checks.

and measures for each (median of --repeat runs, each a fresh ``snakemake`` process, --cores 1):

* dry run: ``snakemake -n`` with no outputs present (the whole DAG planned);
* no-op: ``snakemake`` with every output present, in DAG order, and recorded in Snakemake's metadata
  as made by this workflow (with the params Kiln tracks, so the params rerun trigger is really
  checked); it must answer "Nothing to be done".

For the no-op, every output the dry run lists is created (directories for directory() outputs), then
``snakemake --touch --forceall`` records them: Snakemake's touch executor runs each job's
postprocessing, which writes the job's metadata (params, code, input checksums) as a real run does.
Its 0.1 s sleep per job (there to order mtimes on coarse filesystems) is set to 0 for that step only.
Results go to stdout as JSON; nothing in the repository is written.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
PRECISIONS = ["fp32", "fp16", "int8"]
OPSETS = [13, 14, 15, 16, 17]


def make_config(n_models: int, n_devices: int) -> dict:
    models = {}
    for i in range(n_models):
        layout = "yolo" if i % 2 == 0 else "rtdetr"
        models[f"m{i:02d}"] = {
            "source": "torch", "factory": f"kiln.demo.models:{layout}_demo", "factory_args": {"num_classes": 3},
            "checkpoint": f"models/m{i:02d}.pt", "layout": layout, "dataset": "demo", "input_size": [256, 256],
            "calibration": {"images": 8},
        }
    devices = {
        f"cpu{j:02d}": {"backend": "onnxruntime", "opset": OPSETS[j % len(OPSETS)], "precisions": list(PRECISIONS),
                        "batch_sizes": [1], "threads": 1}
        for j in range(n_devices)
    }
    return {
        "results": "results",
        "datasets": {"demo": {"generator": "shapes", "seed": 0, "image_size": 256, "calib": {"count": 8},
                              "val": {"count": 16}}},
        "models": models,
        "devices": devices,
    }


def snapshot(dst: Path) -> Path:
    """A copy of the workflow's code (others may edit the checkout while the bench runs); its Snakefile."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("Snakefile", "config.yaml"):
        shutil.copy2(REPO / name, dst / name)
    for name in ("rules", "kiln", "scripts", "schemas", "envs", "profiles", "report"):
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, dst / name, ignore=ignore)
    return dst / "Snakefile"


def snakemake_cmd(folder: Path, snakefile: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", "-s", str(snakefile), "--directory", str(folder),
            "--configfile", str(folder / "config.yaml"), "--cores", "1", *args]


def timed(cmd: list[str], expect: str | None = None) -> tuple[tuple[float, float], str]:
    """Run `cmd`; (wall seconds, CPU seconds user+system of it and its children), and its output."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    text = proc.stdout + proc.stderr
    if proc.returncode != 0 or (expect and expect not in text):
        raise SystemExit(f"{' '.join(cmd)} failed (status {proc.returncode}):\n{text[-4000:]}")
    return (wall, cpu), text


def parse_jobs(text: str) -> list[dict]:
    """Jobs of a dry run's output: rule, wildcards, input and output files."""
    jobs, job = [], None
    for line in text.splitlines():
        m = re.match(r"^(?:local)?rule (\w+):$", line)
        if m:
            job = {"rule": m.group(1), "wildcards": {}, "input": [], "output": []}
            jobs.append(job)
            continue
        if job is None or not line.startswith("    "):
            job = None if not line.strip() else job
            continue
        key, _, value = line.strip().partition(": ")
        if key in ("input", "output"):
            job[key] = [v.strip() for v in value.split(",") if v.strip()]
        elif key == "wildcards":
            job["wildcards"] = dict(kv.split("=", 1) for kv in value.split(", "))
    return jobs


def job_key(wildcards: dict) -> str:
    return "|".join(f"{k}={v}" for k, v in sorted(wildcards.items()))


RULES_OF = """
import json, sys
from pathlib import Path
from snakemake.api import SnakemakeApi
from snakemake.io import is_flagged
from snakemake.settings.types import ConfigSettings, OutputSettings, ResourceSettings

folder, snakefile = Path(sys.argv[1]), Path(sys.argv[2])
with SnakemakeApi(OutputSettings(quiet=None)) as api:
    wf = api.workflow(resource_settings=ResourceSettings(cores=1), snakefile=snakefile, workdir=folder,
                      config_settings=ConfigSettings(configfiles=[folder / "config.yaml"]))._workflow
    rules = [{"name": r.name,
              "output": [[str(o), bool(is_flagged(o, "directory"))] for o in r.output],
              "input": [str(i) for i in r.input if not callable(i)],
              "default_target": wf.default_target == r.name}
             for r in wf.rules]
print("RULES=" + json.dumps(rules))
"""


def bare_snakefile(rules: list[dict], jobs: list[dict]) -> tuple[str, dict]:
    """A Snakefile with Kiln's rules and output patterns whose jobs get the inputs Kiln's dry run gave them."""
    inputs: dict[str, dict[str, list[str]]] = collections.defaultdict(dict)
    for job in jobs:
        inputs[job["rule"]][job_key(job["wildcards"])] = job["input"]
    lines = ["# Generated by bench/workflow_overhead.py: Kiln's DAG shape with touch-only jobs.", "import json", "",
             'INPUTS = json.load(open("bare_inputs.json"))', "", "",
             "def key(w):", '    return "|".join(f"{k}={v}" for k, v in sorted(w.items()))', ""]
    for r in rules:
        lines += ["", f"rule {r['name']}:"]
        if r["name"] in inputs:  # in the DAG: exactly the inputs Kiln gave each job
            lines.append(f"    input: lambda w: INPUTS[{r['name']!r}][key(w)]")
        elif r["input"]:
            lines.append(f"    input: {r['input']!r}")
        if r["output"]:
            outs = [f"directory({p!r})" if is_dir else repr(p) for p, is_dir in r["output"]]
            lines.append(f"    output: {', '.join(outs)}")
            lines.append('    shell: "touch {output}"')
        if r["default_target"]:
            lines.append("    default_target: True")
    return "\n".join(lines) + "\n", inputs


def populate(folder: Path, snakefile: Path, jobs: list[dict], rules: list[dict]) -> None:
    """Create every output of the planned jobs, then let Snakemake record them (touch executor, no sleep)."""
    is_dir = {r["name"]: [d for _, d in r["output"]] for r in rules}
    for job in jobs:
        for path, directory in zip(job["output"], is_dir[job["rule"]]):
            p = folder / path
            if directory:
                p.mkdir(parents=True, exist_ok=True)
            else:
                p.parent.mkdir(parents=True, exist_ok=True)
                p.touch()
    code = ("import sys, snakemake.executors.touch as t; t.Executor.SLEEPING_TIME = 0; "
            "from snakemake.cli import main; sys.argv = ['snakemake'] + sys.argv[1:]; main()")
    cmd = snakemake_cmd(folder, snakefile, "--touch", "--forceall", "--quiet", "all")
    cmd[1:3] = ["-c", code]  # python -c CODE <snakemake args>
    timed(cmd)


def dry_run(folder: Path, snakefile: Path) -> tuple[tuple[float, float], str]:
    shutil.rmtree(folder / ".snakemake", ignore_errors=True)
    return timed(snakemake_cmd(folder, snakefile, "-n"))


def noop(folder: Path, snakefile: Path) -> tuple[float, float]:
    return timed(snakemake_cmd(folder, snakefile), expect="Nothing to be done")[0]


def stats(runs: list[tuple[float, float]]) -> dict:
    wall, cpu = [w for w, _ in runs], [c for _, c in runs]
    return {"wall_s": [round(x, 2) for x in wall], "cpu_s": [round(x, 2) for x in cpu],
            "wall_median_s": round(statistics.median(wall), 2), "cpu_median_s": round(statistics.median(cpu), 2)}


def tiny_checkpoint() -> bytes:
    """A one-tensor state_dict: passes config load's weights-only check, never loaded into a model here."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save({"w": torch.zeros(1)}, buf)
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=int, default=20)
    ap.add_argument("--devices", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--keep", type=Path, help="work in this folder and keep it")
    ap.add_argument("--profile", type=Path, help="write a cProfile of one Kiln dry run here")
    args = ap.parse_args()

    root = args.keep or Path(tempfile.mkdtemp(prefix="kiln-bench-"))
    config = make_config(args.models, args.devices)
    kdir, bdir, code = root / "kiln", root / "bare", root / "workflow"
    os.environ["KILN_CACHE_DIR"] = str(root / "cache")  # inherited by every snakemake below
    try:
        for folder in (kdir, bdir, code):
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
        kiln_sf, bare_sf = snapshot(code), bdir / "Snakefile"
        checkpoint = tiny_checkpoint()
        for folder in (kdir, bdir):
            (folder / "models").mkdir()
            for m in config["models"].values():
                (folder / m["checkpoint"]).write_bytes(checkpoint)
            (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

        _, text = dry_run(kdir, kiln_sf)
        jobs = parse_jobs(text)
        _, out = timed([sys.executable, "-c", RULES_OF, str(kdir), str(kiln_sf)])
        rules = json.loads(next(ln for ln in out.splitlines() if ln.startswith("RULES="))[len("RULES="):])
        snakefile, inputs = bare_snakefile(rules, jobs)
        bare_sf.write_text(snakefile)
        (bdir / "bare_inputs.json").write_text(json.dumps(inputs))
        _, bare_text = dry_run(bdir, bare_sf)
        bare_jobs = parse_jobs(bare_text)
        per_rule = collections.Counter(j["rule"] for j in jobs)
        if collections.Counter(j["rule"] for j in bare_jobs) != per_rule:
            raise SystemExit("the bare workflow plans other jobs than Kiln's: see the generated Snakefile")
        if args.profile:
            shutil.rmtree(kdir / ".snakemake", ignore_errors=True)
            cmd = snakemake_cmd(kdir, kiln_sf, "-n")
            timed([cmd[0], "-m", "cProfile", "-o", str(args.profile), *cmd[1:]])

        # Interleaved, so that load from other processes weighs on both alike.
        runs: dict[str, list] = {k: [] for k in ("kiln_dry", "bare_dry", "kiln_noop", "bare_noop")}
        for _ in range(args.repeat):
            runs["kiln_dry"].append(dry_run(kdir, kiln_sf)[0])
            runs["bare_dry"].append(dry_run(bdir, bare_sf)[0])
        populate(kdir, kiln_sf, jobs, rules)
        populate(bdir, bare_sf, bare_jobs, rules)
        for _ in range(args.repeat):
            runs["kiln_noop"].append(noop(kdir, kiln_sf))
            runs["bare_noop"].append(noop(bdir, bare_sf))
        records = {k: sum(1 for _ in (f / ".snakemake/metadata").iterdir()) for k, f in (("kiln", kdir), ("bare", bdir))}
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    import snakemake

    result = {k: stats(v) for k, v in runs.items()}
    ratio = {f"{what}_{kind}": round(result[f"kiln_{what}"][f"{kind}_median_s"] / result[f"bare_{what}"][f"{kind}_median_s"], 2)
             for what in ("dry", "noop") for kind in ("wall", "cpu")}
    print(json.dumps({
        "models": args.models, "devices": args.devices, "precisions": PRECISIONS, "jobs": len(jobs),
        "jobs_per_rule": dict(sorted(per_rule.items())), "metadata_records": records,
        **result, "kiln_over_bare": ratio,
        "snakemake": snakemake.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
    }, indent=2))


if __name__ == "__main__":
    main()
