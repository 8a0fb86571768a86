"""profiles/slurm on a real SLURM (Debian's 22.05 daemons on loopback, tests/slurm/cluster.py).

The cluster has a CPU node (feature cpu, partition cpu) and two "GPU" nodes (features sm_89 and
sm_90, one fake gpu gres each, partition gpu, the cluster's default). The workflow runs as the
README says (--workflow-profile profiles/slurm --config cluster=true) through
snakemake-executor-plugin-slurm, plus test-speed options (status checks, CPU stages grouped into
one job, max-threads for 2-CPU nodes). Where each job ran, what it asked for and what it was
given is read back from SLURM (scontrol -d, jobcomp/filetxt).

Devices (why these: nothing here can run an engine on a GPU, so the one device that needs a GPU
is used to prove GPU routing with jobs that must fail on arrival):
  cpu    ONNX Runtime CPU, cluster {partition: cpu, constraint: cpu}: build and validate on cpu1
  ort90  ONNX Runtime CPU, cluster {partition: gpu, constraint: sm_90}: a CPU device that lives on
         the sm_90 node; its jobs must land on hop1 and ask for no GPU
  rtx    TensorRT-RTX, cluster {partition: gpu, constraint: sm_89, gpu_model: rtx4090}: builds
         ahead of time anywhere (no GPU, the profile's default partition); its validation asks for
         the RTX GPU and runs on ada1 with it, where Kiln then stops it: no CUDA driver here.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest

from kiln.util import read_json
from tests.conftest import random_checkpoints, tiny_config, write_config
from tests.slurm.cluster import copy_workflow

pytestmark = pytest.mark.cluster

MODEL = "yolo_demo"
DEVICES = {
    "cpu": {"backend": "onnxruntime", "opset": 17, "precisions": ["fp32"], "batch_sizes": [1],
            "cluster": {"partition": "cpu", "constraint": "cpu"}},
    "ort90": {"backend": "onnxruntime", "opset": 17, "precisions": ["fp32"], "batch_sizes": [1], "threads": 1,
              "cluster": {"partition": "gpu", "constraint": "sm_90"}},
    "rtx": {"backend": "tensorrt-rtx", "compute_capability": "8.9", "opset": 17, "precisions": ["fp32"],
            "batch_sizes": [1], "builder_optimization_level": 1,
            "cluster": {"partition": "gpu", "constraint": "sm_89", "gpu_model": "rtx4090"}},
}
# Where each device's on-device jobs must land (tests/slurm/cluster.py NODES).
PLACEMENT = {"cpu": ("cpu", "cpu", "cpu1"), "ort90": ("gpu", "sm_90", "hop1"), "rtx": ("gpu", "sm_89", "ada1")}
ON_DEVICE = {"validate", "baseline"}  # always on the device
BUILD_LIKE = {"build", "diagnose"}  # on the device, unless it builds ahead of time (rtx)


def on_device(rule: str, device: str | None) -> bool:
    return device is not None and (rule in ON_DEVICE or (rule in BUILD_LIKE and device != "rtx"))
CPU_STAGES = ["dataset", "inputs", "export", "simplify", "surgery", "precision", "quantize", "reference"]
# Test speed only: quick status checks (the plugin backs off by 10 s when nothing finished), the
# CPU stages as one SLURM job, validation on 2-CPU nodes. Everything else is profiles/slurm.
FAST = [
    "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "3",
    "--seconds-between-status-checks", "2", "--slurm-no-account", "--max-threads", "2",
    "--groups", *(f"{r}=stages" for r in CPU_STAGES), "--group-components", "stages=20",
]


def small_config(checkpoint: str) -> dict:
    cfg = tiny_config(checkpoint_yolo=checkpoint)
    del cfg["models"]["rtdetr_demo"]
    cfg["datasets"]["demo"]["val"]["count"] = 8
    cfg["devices"] = copy.deepcopy(DEVICES)
    return cfg


def failure_excerpt(proc: subprocess.CompletedProcess, lines: int = 40) -> str:
    """The lines around Snakemake's errors and tracebacks, for assertion messages."""
    out = (proc.stdout + proc.stderr).splitlines()
    keep = set()
    for i, line in enumerate(out):
        if any(k in line for k in ("Error", "Traceback", "kiln:", "Exception")):
            keep.update(range(max(0, i - 3), min(len(out), i + 12)))
    return "\n".join(out[i] for i in sorted(keep))[-8000:] or "\n".join(out[-lines:])


# --------------------------------------------------------------------------- no cluster needed


def test_cluster_hints_become_the_right_resources():
    """What each job asks a cluster for (kiln/workflow.py), checked without a cluster."""
    from kiln import workflow as kw
    from kiln.config import load

    raw = small_config("models/x.pt")
    raw["devices"]["h100"] = {"backend": "tensorrt", "compute_capability": "9.0", "tensorrt": {"min": "11.0"},
                              "opset": 17, "precisions": ["fp16"],
                              "batch_sizes": [1], "cluster": {"constraint": "sm_90", "gres": "gpu:h100:2"}}
    cfg = load(raw, check_paths=False)

    def res(dev, rule):
        return {k: kw.cluster_hint(cfg, dev, rule, k, "cpuq") if k == "partition" else kw.cluster_hint(cfg, dev, rule, k)
                for k in ("partition", "constraint", "gres", "gpu_model")} | {"gpu": kw.gpu_count(cfg, dev, rule)}

    # A CPU device: placed on its nodes, never a GPU.
    assert res("cpu", "validate") == {"partition": "cpu", "constraint": "cpu", "gres": None, "gpu_model": None,
                                      "gpu": None}
    assert res("ort90", "build") == {"partition": "gpu", "constraint": "sm_90", "gres": None, "gpu_model": None,
                                     "gpu": None}
    # TensorRT-RTX builds ahead of time: no GPU, no constraint, the profile's default partition.
    assert res("rtx", "build") == {"partition": "cpuq", "constraint": None, "gres": None, "gpu_model": None,
                                   "gpu": None}
    assert res("rtx", "validate") == {"partition": "gpu", "constraint": "sm_89", "gres": None, "gpu_model": "rtx4090",
                                      "gpu": 1}
    # A gres naming GPUs becomes --gpus=TYPE:N (sbatch refuses --gres=gpu:... next to --gpus).
    assert res("h100", "build") == {"partition": "cpuq", "constraint": "sm_90", "gres": None, "gpu_model": "h100",
                                    "gpu": 2}
    assert kw.default_resource(None, "slurm_partition") is None


def test_plugin_turns_the_resources_into_these_sbatch_flags():
    """The installed executor plugin's own functions, fed the resources Kiln's rules declare."""
    pytest.importorskip("snakemake_executor_plugin_slurm")
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    class Resources(dict):
        def __getattr__(self, k):
            return self[k]

    class Job:
        def __init__(self, threads, **res):
            self.threads, self.resources = threads, Resources({k: v for k, v in res.items() if v is not None})

    def sbatch(job):
        params = {"run_uuid": "u", "slurm_logfile": "l", "comment_str": "c", "account": "", "partition": "",
                  "workdir": "/w"}
        return get_submit_command(job, params) + set_gres_string(job)

    from kiln import workflow as kw
    from kiln.config import load

    raw = small_config("models/x.pt")
    raw["devices"]["h100"] = {"backend": "tensorrt", "compute_capability": "9.0", "tensorrt": {"min": "11.0"},
                              "opset": 17, "precisions": ["fp16"],
                              "batch_sizes": [1], "cluster": {"constraint": "sm_90", "gres": "gpu:h100:1"}}
    cfg = load(raw, check_paths=False)

    def job(dev, rule, threads=2):
        return Job(threads, mem_mb=16000, runtime=60, gpu=kw.gpu_count(cfg, dev, rule),
                   constraint=kw.cluster_hint(cfg, dev, rule, "constraint"),
                   gres=kw.cluster_hint(cfg, dev, rule, "gres"), gpu_model=kw.cluster_hint(cfg, dev, rule, "gpu_model"))

    stage = sbatch(Job(1, mem_mb=8000, runtime=30))  # export: no device resources at all
    assert " -C " not in stage and "--gpus" not in stage and "--gres" not in stage and "--ntasks=1" in stage
    rtx_build = sbatch(job("rtx", "build"))
    assert " -C " not in rtx_build and "--gpus" not in rtx_build and "--gres" not in rtx_build
    cpu_validate = sbatch(job("cpu", "validate"))
    assert " -C cpu " in cpu_validate and "--gpus" not in cpu_validate and "--gres" not in cpu_validate
    rtx_validate = sbatch(job("rtx", "validate"))
    assert " -C sm_89 " in rtx_validate and rtx_validate.endswith(" --gpus=rtx4090:1") and "--gres" not in rtx_validate
    h100 = sbatch(job("h100", "validate"))
    assert " -C sm_90 " in h100 and h100.endswith(" --gpus=h100:1") and "--gres" not in h100


# --------------------------------------------------------------------------- on a loopback SLURM


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from tests.slurm.cluster import LoopbackSlurm, ensure_installed

    pytest.importorskip("snakemake_executor_plugin_slurm", reason="pip install snakemake-executor-plugin-slurm")
    reason = ensure_installed()
    if reason:
        pytest.skip(f"no SLURM here: {reason}")
    probe = subprocess.run(["unshare", "--net", "--mount", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make the cluster's private namespaces (unshare --net --mount): {probe.stderr.strip()}")
    c = LoopbackSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
    except BaseException:
        c.stop()
        raise
    yield c
    c.stop()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("kiln-slurm")
    copy_workflow(work / "workflow")  # run from a copy: edits to the repo meanwhile change nothing here
    random_checkpoints(work / "models" / "yolo.pt")
    write_config(work / "config.yaml", small_config("models/yolo.pt"))
    return work


def snakemake_slurm(cluster, work: Path, *args: str, timeout: int = 420) -> subprocess.CompletedProcess:
    """Snakemake in `work` (targets relative to it) through profiles/slurm, inside the cluster's namespaces."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(work / "workflow/Snakefile"), "--configfile", "config.yaml",
           "--workflow-profile", str(work / "workflow/profiles/slurm"),
           *args, *FAST]  # FAST ends with options taking several values: targets go before
    return cluster.run(cmd, timeout=timeout, cwd=work)


def by_rule(jobs: list[dict]) -> dict[tuple[str, str | None], dict]:
    """(rule, device) -> SLURM job, from the executor's comment rule_NAME_wildcards_VALUES: the
    device is the first wildcard value (device names here have no underscore; the group job of
    the CPU stages is rule_stages_...)."""
    out = {}
    for j in jobs:
        comment = j.get("Comment", "")
        rule, _, values = comment.removeprefix("rule_").partition("_wildcards_")
        if rule.startswith("stages"):
            rule, values = "stages", ""
        device = values.split("_")[0] if values.split("_")[0] in DEVICES else None
        assert (rule, device) not in out, f"two SLURM jobs for {(rule, device)}: {comment}"
        out[(rule, device)] = j
    return out


RTX_VALIDATION = "results/validation/rtx/yolo_demo/fp32/validation.json"


@pytest.fixture(scope="module")
def ran(cluster, work):
    """The README's cluster run: cluster=true, so every device's validation is made on the cluster,
    the rtx one too, which this host could not run; it fails on its node (keep-going, from the
    profile, lets everything else finish), so the summary that needs it is not written."""
    proc = snakemake_slurm(cluster, work, "results/report/summary.json", "--config", "cluster=true")
    text = proc.stdout + proc.stderr
    # Snakemake reports the failed job, and (show-failed-logs) the job's own log repeats it.
    failed = {line.strip() for line in text.splitlines() if line.startswith("Error in rule")}
    assert proc.returncode != 0 and failed == {"Error in rule validate:"}, failure_excerpt(proc) + cluster.logs()
    assert "cannot run 'results/engines/rtx/yolo_demo/fp32/model.engine' here" in text, failure_excerpt(proc)
    assert "kiln: gather" not in text  # nothing is expected from other hosts: the nodes make it
    assert not (work / "results/report/summary.json").exists()
    return by_rule(cluster.jobs()), proc


def no_gpu(job: dict) -> bool:
    return "gpu" not in job.get("TresPerJob", "") + job.get("TresPerNode", "") and job.get("JOB_GRES") in (None, "(null)")


def test_every_job_ran_on_slurm_and_completed(ran, cluster):
    jobs, proc = ran
    assert set(jobs) >= {("stages", None), *((r, d) for r in ("build", "baseline", "validate") for d in DEVICES)}, sorted(jobs)
    assert {k for k, j in jobs.items() if j["JobState"] != "COMPLETED"} == {("validate", "rtx")}, jobs
    # jobcomp/filetxt, SLURM's completion log, has the same jobs on the same nodes.
    done = {c["JobId"]: c for c in cluster.completed()}
    for j in jobs.values():
        assert done[j["JobId"]]["JobState"] == j["JobState"]
        assert done[j["JobId"]]["NodeList"] == j["NodeList"]


def test_device_jobs_ran_on_nodes_with_the_device_feature(ran, cluster):
    jobs, _ = ran
    nodes = cluster.nodes()
    for (rule, device), j in jobs.items():
        if not on_device(rule, device):
            continue
        partition, feature, node = PLACEMENT[device]
        assert (j["Partition"], j["Features"], j["NodeList"]) == (partition, feature, node), (rule, device, j)
        assert feature in nodes[j["NodeList"]]["AvailableFeatures"].split(",")
        if device != "rtx":
            assert no_gpu(j), (rule, device, j)  # CPU devices: no GPU asked for or given


def test_cpu_jobs_asked_for_no_gpu_and_no_constraint(ran):
    jobs, _ = ran
    cpu_jobs = [k for k in jobs if not on_device(*k)]
    assert ("stages", None) in cpu_jobs and ("build", "rtx") in cpu_jobs
    for key in cpu_jobs:
        j = jobs[key]
        # Features=(null): no -C at all (an empty -C '' shows as Features=).
        assert j["Features"] == "(null)" and no_gpu(j), (key, j)
        # The profile's default partition, not the cluster's default (gpu): a build job with no
        # hint falls back to default-resources' slurm_partition.
        assert j["Partition"] == "cpu" and j["NodeList"] == "cpu1", (key, j)


def test_summary_has_the_cluster_rows(ran, work):
    """Without cluster=true the summary is this host's view (rtx built, not validated), made here
    from what the cluster made: no stage, build or validation runs again."""
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(work / "workflow/Snakefile"), "--configfile",
                           "config.yaml", "--cores", "1", "results/report/summary.json"],
                          cwd=work, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, failure_excerpt(proc)
    ran_here = {line.strip().removeprefix("local").removesuffix(":") for line in (proc.stdout + proc.stderr).splitlines()
                if line.strip().startswith(("rule ", "localrule ")) and line.strip().endswith(":")}
    assert "rule summary" in ran_here and not ran_here & {f"rule {r}" for r in [*CPU_STAGES, "build", "validate"]}
    rows = {(r["device"], r["precision"]): r for r in read_json(work / "results/report/summary.json")["rows"]}
    assert set(rows) == {("cpu", "fp32"), ("ort90", "fp32"), ("rtx", "fp32")}
    for dev in ("cpu", "ort90"):
        assert rows[(dev, "fp32")]["status"] == "not measurable" and rows[(dev, "fp32")]["latency_median_ms"] > 0
    assert rows[("rtx", "fp32")]["status"] == "built" and rows[("rtx", "fp32")]["engine_bytes"] > 100_000
    # Each validation says which node ran it.
    assert read_json(work / "results/validation/ort90/yolo_demo/fp32/validation.json")["host"]


def test_gpu_jobs_get_the_device_gpu_on_the_device_node(ran, work):
    """The RTX validation (and its PyTorch baseline) ask for the RTX GPU: they run on ada1 with it.
    Kiln's own host check then stops the validation there: this node's GPU is a /dev/null stand-in."""
    jobs, _ = ran
    assert not (work / RTX_VALIDATION).exists()  # removed by Snakemake after the failure
    for rule in ("baseline", "validate"):
        j = jobs[(rule, "rtx")]
        assert (j["Partition"], j["Features"], j["NodeList"]) == PLACEMENT["rtx"], (rule, j)
        assert "gpu:rtx4090:1" in j.get("TresPerJob", ""), (rule, j)  # asked: --gpus=rtx4090:1
        assert j["JOB_GRES"].startswith("gpu:rtx4090:1"), (rule, j)  # given: the node's GPU
    assert jobs[("baseline", "rtx")]["JobState"] == "COMPLETED"  # records "no CUDA" and succeeds
    assert jobs[("validate", "rtx")]["JobState"] == "FAILED"
    logs = list((work / ".snakemake/slurm_logs/rule_validate").glob("rtx_*/*.log"))
    assert logs and "TensorRT-RTX engines need a CUDA driver" in "".join(p.read_text() for p in logs)

