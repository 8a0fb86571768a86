"""Several hosts, one storage (README: Building on devices), with snakemake-storage-plugin-fs.

Two working folders stand in for two hosts; they share nothing but the storage folder, the
workflow and the config:
  build host A:  snakemake artifacts                         CPU stages -> storage
  device host B: snakemake engines --config devices=edge,rtx --allowed-rules build baseline validate diagnose engines
                 edge's engines and validations, rtx's ahead-of-time engine -> storage (the CPU stages'
                 outputs are taken as they are); then B's folder is deleted
  A:             snakemake --config gather=true              fails first, naming rtx (nobody here
                 can validate it), then, for devices cpu,edge: the summary and the page (README's
                 default target), with B's edge rows taken from storage and A's own cpu rows made on A.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys

import pytest

from kiln.util import read_json
from tests.conftest import random_checkpoints, tiny_config, write_config
from tests.slurm.cluster import copy_workflow

pytestmark = pytest.mark.cluster

DEVICES = {
    "cpu": {"backend": "onnxruntime", "opset": 17, "precisions": ["fp32"], "batch_sizes": [1]},
    "edge": {"backend": "onnxruntime", "opset": 17, "precisions": ["fp32", "int8"], "batch_sizes": [1], "threads": 1},
    "rtx": {"backend": "tensorrt-rtx", "compute_capability": "8.9", "opset": 17, "precisions": ["fp32"],
            "batch_sizes": [1], "builder_optimization_level": 1},
}
SUMMARY = ["results/report/summary.json", "results/report/summary.csv", "results/report/summary.md"]
PAGE = ["results/report/kiln.html", "results/report/kiln.md"]
DEVICE_RULES = ["build", "baseline", "validate", "diagnose", "engines"]  # what a device host runs (README)


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    pytest.importorskip("snakemake_storage_plugin_fs", reason="pip install snakemake-storage-plugin-fs")
    if shutil.which("rsync") is None:
        from tests.slurm.cluster import ensure_installed  # .ci/install-slurm.sh installs rsync too

        reason = ensure_installed()
        if reason or shutil.which("rsync") is None:
            pytest.skip(f"the fs storage plugin needs rsync: {reason or 'not installed'}")

    root = tmp_path_factory.mktemp("hosts")
    store = root / "storage"
    store.mkdir()
    workflow = copy_workflow(root / "workflow")  # the same workflow on every host, untouched by edits meanwhile
    cfg = tiny_config(checkpoint_yolo="models/yolo.pt")
    del cfg["models"]["rtdetr_demo"]
    cfg["datasets"]["demo"]["val"]["count"] = 8
    cfg["devices"] = copy.deepcopy(DEVICES)
    weights = root / "yolo.pt"
    random_checkpoints(weights)
    out = {"store": store, "snakefile": workflow / "Snakefile"}
    for host in ("a", "b"):
        (root / host / "models").mkdir(parents=True)
        shutil.copy(weights, root / host / "models" / "yolo.pt")  # each host's checkout has the checkpoint
        write_config(root / host / "config.yaml", cfg)
        out[host] = root / host
    return out


def snakemake(hosts: dict, host: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    store = hosts["store"]
    cmd = [sys.executable, "-m", "snakemake", "-s", str(hosts["snakefile"]), "--configfile", "config.yaml",
           "--cores", "2", "--default-storage-provider", "fs", "--default-storage-prefix", str(store), *args]
    return subprocess.run(cmd, cwd=hosts[host], capture_output=True, text=True, timeout=timeout)


def jobs_run(proc: subprocess.CompletedProcess) -> list[tuple[str, dict]]:
    """(rule, wildcards) of every job this run executed."""
    out, rule = [], None
    for line in (proc.stdout + proc.stderr).splitlines():
        m = re.match(r"^(?:local)?rule (\w+):$", line.strip())
        if m:
            rule = m.group(1)
            out.append((rule, {}))
        elif rule and line.strip().startswith("wildcards:"):
            out[-1] = (rule, dict(kv.split("=", 1) for kv in line.strip()[len("wildcards: "):].split(", ")))
        elif not line.startswith(" "):
            rule = None
    return out


def tail(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout[-2000:] + proc.stderr[-6000:]


@pytest.fixture(scope="module")
def flow(hosts):
    steps = {}
    steps["artifacts"] = snakemake(hosts, "a", "artifacts")
    assert steps["artifacts"].returncode == 0, tail(steps["artifacts"])
    steps["engines"] = snakemake(hosts, "b", "engines", "--config", "devices=edge,rtx", "--allowed-rules", *DEVICE_RULES)
    assert steps["engines"].returncode == 0, tail(steps["engines"])
    shutil.rmtree(hosts["b"])  # host B is gone: what A gathers must be in storage
    steps["gather_all"] = snakemake(hosts, "a", "--config", "gather=true")  # README's step 3, as it is
    steps["gather"] = snakemake(hosts, "a", "--config", "gather=true", "devices=cpu,edge")
    assert steps["gather"].returncode == 0, tail(steps["gather"])
    return steps


def test_build_host_puts_the_cpu_stages_in_storage(flow, hosts):
    store, a = hosts["store"], hosts["a"]
    ran = jobs_run(flow["artifacts"])
    assert {r for r, _ in ran} >= {"dataset", "inputs", "export", "simplify", "surgery", "precision", "quantize",
                                   "reference", "artifacts"}, ran
    assert not [w for _, w in ran if "device" in w], ran  # no device job on the build host
    onnx = store / "results/onnx/yolo_demo/opset17"
    for name in ("fp32.onnx", "int8.onnx", "int8.calib.txt", "fp32.json", "simplify.json"):
        assert (onnx / name).stat().st_size > 0, name
    assert len((onnx / "int8.calib.txt").read_text().split()) == 8  # names from the calib annotations
    assert (store / "results/reference/yolo_demo/opset17/outputs.npz").is_file()
    assert len(list((store / "results/data/demo/val/images").glob("*.png"))) == 8
    # Nothing of the run is left only on A: results live in storage.
    assert not (a / "results").exists()


def test_device_host_builds_and_validates_only_its_devices(flow, hosts):
    store = hosts["store"]
    ran = jobs_run(flow["engines"])
    assert {r for r, _ in ran} <= set(DEVICE_RULES) and {"build", "validate"} <= {r for r, _ in ran}, ran
    assert {w["device"] for r, w in ran if w} == {"edge", "rtx"}
    assert ("validate", {"device": "rtx", "model": "yolo_demo", "precision": "fp32"}) not in ran  # no GPU here
    for p in ("fp32", "int8"):
        record = read_json(store / f"results/engines/edge/yolo_demo/{p}/engine.json")
        engine = store / f"results/engines/edge/yolo_demo/{p}/model.engine"
        assert record["status"] == "built" and engine.stat().st_size == record["engine_bytes"]
        assert record["engine"] == f"results/engines/edge/yolo_demo/{p}/model.engine"  # the artifact path
        # Validated on its host; random weights, so honestly "not measurable".
        assert read_json(store / f"results/validation/edge/yolo_demo/{p}/validation.json")["status"] == "not measurable"
    rtx = read_json(store / "results/engines/rtx/yolo_demo/fp32/engine.json")
    assert (store / "results/engines/rtx/yolo_demo/fp32/model.engine").stat().st_size == rtx["engine_bytes"] > 100_000


def test_gather_stops_before_any_job_naming_the_missing_device(flow):
    proc = flow["gather_all"]
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "kiln: gather: these devices' validations are not in storage yet" in text
    assert "device 'rtx': 1 missing (e.g. results/validation/rtx/yolo_demo/fp32/validation.json)" in text
    assert "run first: snakemake engines --config devices=rtx --allowed-rules build baseline validate diagnose engines" in text
    assert "device 'edge'" not in text and "device 'cpu'" not in text
    assert jobs_run(proc) == []


def test_gathering_host_summary_has_every_row(flow, hosts):
    store = hosts["store"]
    ran = jobs_run(flow["gather"])
    # A validates its own cpu device; edge's rows come from storage (no edge job, no CPU stage rerun).
    assert {(r, w.get("device")) for r, w in ran} >= {("validate", "cpu"), ("summary", None), ("page", None)}, ran
    # (A can make edge's serving configs from the engines in storage, as any host with its backend can.)
    assert not [(r, w) for r, w in ran if w.get("device") not in (None, "cpu") and r != "serve"], ran
    assert not [r for r, _ in ran if r in ("dataset", "inputs", "export", "simplify", "surgery", "precision",
                                           "quantize", "reference")], ran
    rows = {(r["device"], r["precision"]): r for r in read_json(store / SUMMARY[0])["rows"]}
    assert set(rows) == {("cpu", "fp32"), ("edge", "fp32"), ("edge", "int8")}
    for (dev, p), row in rows.items():
        v = read_json(store / f"results/validation/{dev}/yolo_demo/{p}/validation.json")
        assert row["status"] == v["status"] and row["status"] == "not measurable", row  # random weights
        assert row["latency_median_ms"] == v["latency"][0]["median_ms"] > 0  # B's measurement, as B wrote it
        assert row["engine_bytes"] == v["build"]["engine_bytes"] > 0
        assert row["simplify"].startswith("simplified") and row["onnx_bytes"] > 10_000
    # Its two rows, and its line in the summary's "engine to deploy" section.
    assert (store / SUMMARY[2]).read_text().count("| yolo_demo | edge |") == 3


def test_gathering_host_page_and_figures_go_to_storage(flow, hosts):
    store, a = hosts["store"], hosts["a"]
    html, md = (store / p for p in PAGE)
    assert "edge" in html.read_text() and "cpu" in html.read_text()
    # Figures drawn from B's measurements (edge) and A's own (cpu), put in storage beside the page.
    plots = store / "results/report/plots/devices/yolo_demo"
    for dev in ("cpu", "edge"):
        png = plots / dev / "latency.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert f"plots/devices/yolo_demo/{dev}/latency.png" in md.read_text()
    assert (store / "results/report/plots/models/yolo_demo/accuracy_latency.png").stat().st_size > 1000
    assert not (a / "results/report").exists()  # nothing written beside storage


def test_run_options_are_taken_out_of_the_config():
    """`--config gather=true` / `cluster=true` are run switches: the config schema never sees them."""
    from kiln.errors import KilnError
    from kiln.workflow import device_pattern, run_options

    config = {"gather": "true", "models": {}}
    assert run_options(config) == {"gather": True, "cluster": False} and config == {"models": {}}
    with pytest.raises(KilnError, match=r"--config gather=maybe: use gather=true or gather=false"):
        run_options({"gather": "maybe"})
    with pytest.raises(KilnError, match=r"choose one"):
        run_options({"gather": True, "cluster": True})
    # gather=true: rules make only this host's devices; (?!) matches nothing.
    assert device_pattern({"cpu": None, "rtx": "no CUDA driver"}) == "cpu"
    assert device_pattern({"rtx": "no CUDA driver"}) == "(?!)"
