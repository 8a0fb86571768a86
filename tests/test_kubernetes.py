"""profiles/kubernetes: what each job asks Kubernetes for, checked without a cluster.

No Kubernetes cluster can run here, so nothing in this file submits a pod or runs a job on one. Two
checks stand in for that:
1. a dry run of the workflow through the profile, as README says to run it (`--workflow-profile
   profiles/kubernetes --config cluster=true`, storage on the fs plugin), which prints every job's
   resources as Kiln's rules declare them;
2. the installed executor plugin's own `run_job`, fed those resources, with its Kubernetes API client
   replaced by one that keeps the Job it is handed: the pod spec (node selector, GPU requests,
   tolerations) is the plugin's, not a copy of its logic.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest

from tests.conftest import REPO, tiny_config, write_config

pytestmark = pytest.mark.cluster

MACHINES = {"cpu": "c3-standard-8", "rtx": "g2-standard-8", "h100": "a3-highgpu-1g"}
CPU_STAGES = {"dataset", "inputs", "export", "simplify", "surgery", "precision", "quantize", "reference"}


@pytest.fixture(scope="module")
def jobs(tmp_path_factory) -> list[tuple[str, dict, dict]]:
    """(rule, wildcards, resources) of every job of a dry run through profiles/kubernetes."""
    pytest.importorskip("snakemake_executor_plugin_kubernetes", reason="pip install snakemake-executor-plugin-kubernetes")
    work = tmp_path_factory.mktemp("k8s")
    (work / "models").mkdir()
    shutil.copy(REPO / "models" / "demo_yolo.pt", work / "models" / "demo_yolo.pt")
    cfg = tiny_config()
    del cfg["models"]["rtdetr_demo"]
    cfg["devices"]["cpu"]["precisions"] = ["fp32", "int8"]
    cfg["devices"]["rtx"]["precisions"] = ["fp16"]
    for dev, machine in MACHINES.items():
        cfg["devices"][dev]["cluster"] = {"machine_type": machine}
    write_config(work / "config.yaml", cfg)
    store = work / "storage"
    store.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--configfile", "config.yaml",
         "--workflow-profile", str(REPO / "profiles/kubernetes"), "--config", "cluster=true", "--dry-run",
         "--default-storage-provider", "fs", "--default-storage-prefix", str(store)],
        cwd=work, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out: list[tuple[str, dict, dict]] = []
    for line in proc.stdout.splitlines():
        text = line.strip()
        if line.startswith(("rule ", "localrule ")) and text.endswith(":"):
            out.append((text.split()[1].rstrip(":"), {}, {}))
        elif out and text.startswith("wildcards: "):
            out[-1][1].update(kv.split("=", 1) for kv in text.removeprefix("wildcards: ").split(", "))
        elif out and text.startswith("resources: "):
            for kv in text.removeprefix("resources: ").split(", "):
                k, v = kv.split("=", 1)
                out[-1][2][k] = int(v) if v.isdigit() else v
    assert {r for r, _, _ in out} >= CPU_STAGES | {"build", "validate", "baseline", "summary"}, out
    return out


def placement(res: dict) -> dict:
    return {k: res.get(k) for k in ("gpu", "gpu_manufacturer", "machine_type")}


def test_jobs_ask_for_the_device_nodes_and_gpus_they_need(jobs):
    none = {"gpu": None, "gpu_manufacturer": None, "machine_type": None}
    seen = set()
    for rule, w, res in jobs:
        dev = w.get("device")
        if rule in CPU_STAGES or rule == "serve" or dev is None:
            want = none  # CPU stages, serving configs, summary, page: any node, no GPU
        elif dev == "cpu":
            want = none | {"machine_type": MACHINES["cpu"]}  # its latency is that CPU's: on its nodes, no GPU
        elif dev == "rtx" and rule in ("build", "diagnose"):
            want = none  # TensorRT-RTX builds ahead of time, anywhere
        else:
            want = {"gpu": 1, "gpu_manufacturer": "nvidia", "machine_type": MACHINES[dev]}
        assert placement(res) == want, (rule, w, res)
        seen.add((rule, dev))
    assert {("build", "rtx"), ("validate", "rtx"), ("build", "h100"), ("validate", "h100"), ("baseline", "h100"),
            ("validate", "cpu"), ("export", None)} <= seen


def pod_spec(resources: dict):
    """The pod spec the installed plugin's run_job makes for a job with these resources."""
    from snakemake_executor_plugin_kubernetes import Executor

    kept = {}

    class BatchApi:
        def create_namespaced_job(self, namespace, body):
            kept["body"] = body
            return body

    ex = object.__new__(Executor)  # no kube config here: the attributes __post_init__ would set
    ex.__dict__.update(
        logger=logging.getLogger("kiln.test.kubernetes"), run_namespace="kiln-test", container_image="kiln:test",
        persistent_volumes=[], k8s_cpu_scalar=0.95, k8s_service_account_name=None, secret_envvars={},
        privileged=False, namespace="default", batchapi=BatchApi(), _kubernetes_retry=lambda f: f(),
        format_job_exec=lambda job: "snakemake --target-jobs ...", report_job_submission=lambda info: None)
    # A dry run prints disk_mb as <TBD> (from the sizes of inputs not made yet); a real run gives a number.
    resources = {k: v for k, v in resources.items() if v != "<TBD>"}
    ex.run_job(SimpleNamespace(jobid=1, attempt=1, resources=resources, is_containerized=False))
    return kept["body"].spec.template.spec


def test_plugin_makes_these_pods(jobs):
    def first(rule, dev):
        return next(res for r, w, res in jobs if r == rule and w.get("device") == dev)

    export = pod_spec(first("export", None))
    assert export.node_selector == {} and not export.tolerations
    assert not any("gpu" in k for k in export.containers[0].resources.requests)
    rtx_build = pod_spec(first("build", "rtx"))
    assert rtx_build.node_selector == {} and not any("gpu" in k for k in rtx_build.containers[0].resources.requests)
    cpu = pod_spec(first("validate", "cpu"))
    assert cpu.node_selector == {"node.kubernetes.io/instance-type": MACHINES["cpu"]} and not cpu.tolerations
    assert "nvidia.com/gpu" not in cpu.containers[0].resources.requests
    for rule, dev in (("validate", "rtx"), ("build", "h100"), ("baseline", "h100")):
        spec = pod_spec(first(rule, dev))
        assert spec.node_selector == {"node.kubernetes.io/instance-type": MACHINES[dev]}, (rule, dev)
        assert spec.containers[0].resources.requests["nvidia.com/gpu"] == "1"
        assert [(t.key, t.effect) for t in spec.tolerations] == [("nvidia.com/gpu", "NoSchedule")]
