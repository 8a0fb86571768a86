"""What the Snakefile needs from the package: the checked config, the host plan and the targets.

The host plan (:class:`Plan`) is computed once per Snakemake invocation (rules/common.smk holds
it): which devices this host builds and runs, the ONNX variant every engine is built from, each
job's code fingerprint and cluster resources. Rules read its answers; they decide nothing.
"""

from __future__ import annotations

import ast
import functools
import os
import re
import sys
from dataclasses import dataclass, field

from kiln import backends, fingerprint, paths
from kiln.config import KilnConfig, check_files_unique, load, read_yaml
from kiln.errors import KilnError
from kiln.specs import MIXED_PRECISIONS, base_precision

# Each rule's stage module: the one place a rule name leads to its code (README's module table).
STAGES = {
    "dataset": "kiln.dataset", "inputs": "kiln.inputs", "export": "kiln.export", "simplify": "kiln.simplify",
    "surgery": "kiln.surgery", "precision": "kiln.precision.cast", "quantize": "kiln.precision.quantize",
    "sensitivity": "kiln.sensitivity", "fallback": "kiln.precision.fallback",
    "reference": "kiln.reference", "build": "kiln.build", "baseline": "kiln.baseline",
    "validate": "kiln.validate", "diagnose": "kiln.diagnose", "summary": "kiln.summary", "page": "kiln.report.page",
    "serve": "kiln.serve",
}
# Per-device rules, and the rule whose placement each shares on a cluster.
DEVICE_RULES = {"build": "build", "validate": "validate", "baseline": "validate", "diagnose": "build"}


def select_devices(config: dict, config_files: list[str]) -> dict:
    """Apply `--config devices=a,b`: keep those devices of the config files, in that order.

    Snakemake puts the string in place of the devices mapping, so the definitions are
    read back from the config files.
    """
    chosen = config.get("devices")
    if not isinstance(chosen, (str, list)):
        return config
    names = [n.strip() for n in (chosen.split(",") if isinstance(chosen, str) else chosen) if n.strip()]
    defined: dict = {}
    for path in config_files:
        defined.update(read_yaml(path).get("devices") or {})
    unknown = [n for n in names if n not in defined]
    if unknown or not names:
        raise KilnError(
            f"--config devices={chosen}: unknown device {', '.join(map(repr, unknown)) or '(none given)'}; "
            f"the config files define: {', '.join(defined) or 'none'}"
        )
    return {**config, "devices": {n: defined[n] for n in names}}


# Per-run switches given as `--config KEY=VALUE`: not part of the config schema, so taken out of it.
RUN_OPTIONS = {"gather": False, "cluster": False}


def run_options(config: dict) -> dict:
    """Take Kiln's run switches out of `config` (in place) and return them (README: Building on devices).

    `gather=true`: the summary has every device's rows; this host makes those of the devices it
    can build and run, the others were put in storage by their own hosts and are never made here.
    `cluster=true`: the executor's nodes make every device's jobs, wherever the device's cluster
    hints place them; the submitting host's own backends do not matter.
    """
    opts = {}
    for key, default in RUN_OPTIONS.items():
        value = config.pop(key, default)
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            value = value.strip().lower() == "true"
        if not isinstance(value, bool):
            raise KilnError(f"--config {key}={value}: use {key}=true or {key}=false")
        opts[key] = value
    if opts["gather"] and opts["cluster"]:
        raise KilnError("--config gather=true cluster=true: choose one (gather: other hosts made the rest; "
                        "cluster: this run's executor makes everything)")
    return opts


def run_options_or_exit(config: dict) -> dict:
    """run_options(), a mistake printed as one line like load_or_exit's."""
    try:
        return run_options(config)
    except KilnError as err:
        print(f"kiln: {err}", file=sys.stderr)
        raise SystemExit(1) from None


def load_or_exit(config: dict, config_files: list[str]) -> KilnConfig:
    """Check the config before any job runs; on a mistake print one line and stop (no traceback).

    `--config devices=a,b` is resolved in `config` itself, so that jobs, which read the
    workflow's config, see the chosen devices' definitions rather than the string.
    """
    try:
        check_files_unique(config_files)
        chosen = select_devices(config, config_files)
        if chosen is not config:
            config["devices"] = chosen["devices"]
        return load(config, base=".")
    except KilnError as err:
        print(f"kiln: {err}", file=sys.stderr)
        # os._exit-free: SystemExit from a Snakefile ends Snakemake with this status, quietly.
        raise SystemExit(1) from None


def runnable(cfg: KilnConfig) -> dict[str, str | None]:
    """Device -> reason this host cannot run (validate) its engines (None: it can)."""
    return {name: backends.get(d.backend).check_host(d) for name, d in cfg.devices.items()}


def buildable(cfg: KilnConfig) -> dict[str, str | None]:
    """Device -> reason this host cannot build its engines (None: it can)."""
    return {name: backends.get(d.backend).check_build_host(d) for name, d in cfg.devices.items()}


def validation_targets(cfg: KilnConfig, run: dict[str, str | None], build: dict[str, str | None]) -> list[str]:
    """Validation files of every job whose device this host can build and run."""
    return [
        paths.fmt(paths.VALIDATION, results=cfg.results, device=dev, model=m, precision=p)
        for dev, m, p in cfg.jobs()
        if run[dev] is None and build[dev] is None
    ]


def build_only_targets(cfg: KilnConfig, run: dict[str, str | None], build: dict[str, str | None]) -> list[str]:
    """Engine records of jobs this host can build but not run (ahead-of-time builds)."""
    return [
        paths.fmt(paths.ENGINE_RECORD, results=cfg.results, device=dev, model=m, precision=p)
        for dev, m, p in cfg.jobs()
        if build[dev] is None and run[dev] is not None
    ]


def engine_records(cfg: KilnConfig, build: dict[str, str | None]) -> list[str]:
    """Engine records of every job whose device this host builds: the summary checks its rows against them
    (kiln/summary.py), the page shows their build metadata."""
    return [paths.fmt(paths.ENGINE_RECORD, results=cfg.results, device=dev, model=m, precision=p)
            for dev, m, p in cfg.jobs() if build[dev] is None]


def made_here_targets(cfg: KilnConfig, run: dict[str, str | None], build: dict[str, str | None]) -> list[str]:
    """The engines (file and record) and validations this host makes: rule `all` asks for them besides the
    summary. As a job's inputs only, one that is gone (Snakemake removes a failed job's outputs; a user
    deletes one) would count as done while the summary is up to date; as targets, they are made again."""
    out = []
    for dev, m, p in cfg.jobs():
        key = {"results": cfg.results, "device": dev, "model": m, "precision": p}
        if build[dev] is None:
            out += [paths.fmt(paths.ENGINE_RECORD, **key), paths.fmt(paths.ENGINE_FILE, **key)]
            if run[dev] is None:
                out.append(paths.fmt(paths.VALIDATION, **key))
    return out


def summary_records(cfg: KilnConfig, run: dict[str, str | None], build: dict[str, str | None]) -> list[str]:
    """Simplify and variant records of the rows that have an engine (the summary quotes them)."""
    out: dict[str, None] = {}
    for dev, m, p in cfg.jobs():
        if build[dev] is not None:
            continue
        d = cfg.devices[dev]
        out[paths.fmt(paths.SIMPLIFY_RECORD, results=cfg.results, model=m, opset=d.opset)] = None
        out[paths.fmt(paths.VARIANT_RECORD, results=cfg.results, model=m, opset=d.opset,
                      precision=d.variant_of(p))] = None
        out.update(dict.fromkeys(kept_records(cfg, dev, m, p)))  # a mixed row built from the strict source
    return list(out)


# --------------------------------------------------------------------------- several hosts (README: Building on devices)


def everywhere(cfg: KilnConfig) -> dict[str, None]:
    """What gather/cluster=true put in place of buildable()/runnable(): every device is made somewhere."""
    return dict.fromkeys(cfg.devices)


def device_pattern(can: dict[str, str | None] | None) -> str:
    """A `device` wildcard constraint: the devices `can` maps to None; any device name when `can` is None."""
    if can is None:
        return r"[A-Za-z][A-Za-z0-9_-]*"
    names = [re.escape(d) for d, why in can.items() if why is None]
    return "|".join(names) if names else "(?!)"  # (?!) matches nothing


def kept_records(cfg: KilnConfig, device: str, model: str, precision: str) -> list[str]:
    """[the mixed variant's record] where this engine is built from the strict source, its kept nodes held
    layer by layer (kiln.build reads them); [] otherwise."""
    d = cfg.devices[device]
    if precision not in MIXED_PRECISIONS or d.variant_of(precision) == precision:
        return []
    return [paths.fmt(paths.VARIANT_RECORD, results=cfg.results, model=model, opset=d.opset, precision=precision)]


def artifact_targets(cfg: KilnConfig) -> list[str]:
    """Everything device hosts build and validate from, for every device of the config: the ONNX
    variant each engine is built from, calibration inputs where a build calibrates, the fp32
    references, validation inputs and annotations (rule `artifacts`, on the build host)."""
    out: dict[str, None] = {}
    R = cfg.results
    for dev, m, p in cfg.jobs():
        d = cfg.devices[dev]
        out[paths.fmt(paths.VARIANT, results=R, model=m, opset=d.opset, precision=d.variant_of(p))] = None
        out.update(dict.fromkeys(kept_records(cfg, dev, m, p)))
        if backends.get(d.backend).needs_calibration(d, base_precision(p)):
            out[paths.fmt(paths.INPUTS, results=R, model=m, split="calib")] = None
        out[paths.fmt(paths.REFERENCE, results=R, model=m, opset=d.opset)] = None
        out[paths.fmt(paths.REFERENCE_RECORD, results=R, model=m, opset=d.opset)] = None
        out[paths.fmt(paths.INPUTS, results=R, model=m, split="val")] = None
        out[paths.fmt(paths.DATASET, results=R, dataset=cfg.models[m].dataset, split="val")] = None
    return list(out)


def missing_elsewhere(
    cfg: KilnConfig, run: dict[str, str | None], build: dict[str, str | None], exists
) -> dict[str, tuple[str, list[str]]]:
    """Devices this host cannot build or run whose validations `exists` does not find.

    Returns device -> (why this host cannot, missing validation files).
    """
    missing: dict[str, tuple[str, list[str]]] = {}
    for dev, m, p in cfg.jobs():
        why = run[dev] or build[dev]
        if why is None:
            continue
        path = paths.fmt(paths.VALIDATION, results=cfg.results, device=dev, model=m, precision=p)
        if not exists(path):
            missing.setdefault(dev, (why, []))[1].append(path)
    return missing


def missing_message(missing: dict[str, tuple[str, list[str]]]) -> str:
    """One paragraph per device: what is missing, why this host cannot make it, what to run where."""
    lines = ["kiln: gather: these devices' validations are not in storage yet, and this host cannot make them:"]
    for dev, (why, files) in missing.items():
        lines.append(
            f"  device '{dev}': {len(files)} missing (e.g. {files[0]}); not here: {why}. "
            f"On a host with device '{dev}', run first: snakemake engines --config devices={dev} "
            f"--allowed-rules build baseline validate diagnose engines "
            f"(same --configfile and storage options), then gather again."
        )
    lines.append("  (On a cluster, run with --config cluster=true instead. README: Building on devices)")
    return "\n".join(lines)


# --------------------------------------------------------------------------- resources and routing

# Runtimes (minutes) and memory (MiB) each rule asks a cluster for; generous for the demo's sizes.
RULE_RESOURCES = {
    "dataset": {"mem_mb": 2000, "runtime": 20},
    "inputs": {"mem_mb": 4000, "runtime": 20},
    "export": {"mem_mb": 8000, "runtime": 30},
    "simplify": {"mem_mb": 8000, "runtime": 30},
    "surgery": {"mem_mb": 8000, "runtime": 30},
    "precision": {"mem_mb": 8000, "runtime": 60},
    "quantize": {"mem_mb": 16000, "runtime": 120},
    "sensitivity": {"mem_mb": 8000, "runtime": 120},
    "fallback": {"mem_mb": 16000, "runtime": 240},
    "reference": {"mem_mb": 8000, "runtime": 60},
    "build": {"mem_mb": 16000, "runtime": 120},
    "validate": {"mem_mb": 16000, "runtime": 60},
    "summary": {"mem_mb": 2000, "runtime": 10},
    "page": {"mem_mb": 2000, "runtime": 10},
    "serve": {"mem_mb": 4000, "runtime": 20},  # copies engines (hard links where it can) and writes text
}


def on_device(cfg: KilnConfig, device: str, rule: str) -> bool:
    """Whether a job of `rule` for `device` must run on the device: validations always; builds
    unless the backend builds ahead of time on any host."""
    d = cfg.devices[device]
    return rule == "validate" or backends.get(d.backend).builds_on_device(d)


def needs_gpu(cfg: KilnConfig, device: str, rule: str) -> int:
    """GPUs a job of `rule` for `device` needs (the backend says: running engines on a GPU does)."""
    d = cfg.devices[device]
    return int(backends.get(d.backend).needs_gpu(d, rule))


# `cluster.gres` naming GPUs, e.g. "gpu", "gpu:2", "gpu:h100:1".
_GPU_GRES = re.compile(r"^gpu(?::(?P<type>[A-Za-z0-9_.-]+?))??(?::(?P<count>\d+))?$")


def _gpu_gres(cfg: KilnConfig, device: str) -> re.Match | None:
    return _GPU_GRES.match(str(cfg.devices[device].cluster.get("gres", "")).strip())


def gpu_count(cfg: KilnConfig, device: str, rule: str) -> int | None:
    """The `gpu` resource of a job: needs_gpu, times the count of a `cluster.gres` like gpu:h100:2.

    None (unset) for a job that needs none: the Kubernetes executor asks for a GPU whenever the
    resource is set, even to 0.
    """
    n = needs_gpu(cfg, device, rule)
    m = _gpu_gres(cfg, device)
    return (n * int(m["count"]) if m and m["count"] else n) or None


def cluster_hint(cfg: KilnConfig, device: str, rule: str, key: str, default: str | None = None) -> str | None:
    """A device's cluster hint for one job as a Snakemake resource value; None leaves it unset.

    partition and constraint place jobs that run on the device (on_device), GPU or not (a CPU
    device's latency is measured on that CPU); gres and gpu_model only go with jobs that need a
    GPU, so CPU stages never ask for one. A gres naming GPUs (gpu:h100:1) becomes gpu_model
    (h100) plus the `gpu` count: the SLURM executor turns those into --gpus=h100:1, and
    sbatch refuses --gres=gpu:h100:1 next to the --gpus it adds for `gpu`. `default` (the
    profile's default-resources value) applies where no hint does: a rule's resource replaces
    the default for all its jobs.
    """
    hints = cfg.devices[device].cluster
    value = None
    if key in ("partition", "constraint", "machine_type"):
        value = hints.get(key) if on_device(cfg, device, rule) else None
    elif key == "gpu_manufacturer":  # the Kubernetes executor's GPU vendor: TensorRT runs on NVIDIA's
        value = "nvidia" if needs_gpu(cfg, device, rule) else None
    elif needs_gpu(cfg, device, rule):
        gres = _gpu_gres(cfg, device)
        if key == "gres":
            value = None if gres else hints.get("gres")
        elif key == "gpu_model":
            value = hints.get("gpu_model") or (gres["type"] if gres else None)
    value = str(value).strip() if value is not None else ""
    return value or default or None


# Resources of a device's jobs (build, validate, baseline, diagnose) and the cluster hint each comes from:
# SLURM's executor reads slurm_partition, constraint, gres, gpu_model and gpu; Kubernetes' machine_type
# (a node selector on the instance type), gpu and gpu_manufacturer. Any other executor ignores them.
DEVICE_HINTS = {"slurm_partition": "partition", "constraint": "constraint", "gres": "gres", "gpu_model": "gpu_model",
                "machine_type": "machine_type", "gpu_manufacturer": "gpu_manufacturer"}


def device_resources(cfg: KilnConfig, rule: str, default_partition: str | None = None, like: str | None = None) -> dict:
    """The `resources:` of a rule whose jobs are per device, as Snakemake takes them (callables of the
    wildcards). `like` is the rule whose placement they share (baseline runs like validate, diagnose
    like build)."""
    placed = like or rule
    res = {"mem_mb": RULE_RESOURCES[placed]["mem_mb"], "runtime": RULE_RESOURCES[placed]["runtime"],
           "gpu": lambda w: gpu_count(cfg, w.device, placed)}
    for name, key in DEVICE_HINTS.items():
        default = default_partition if key == "partition" else None
        res[name] = lambda w, key=key, default=default: cluster_hint(cfg, w.device, placed, key, default)
    return res


def default_resource(defaults, name: str) -> str | None:
    """The value `--default-resources NAME=VALUE` (or a profile's default-resources) gives, as text.

    `defaults` is workflow.resource_settings.default_resources (None when none were given).
    """
    if defaults is None:
        return None
    try:
        raw = defaults.get(name).raw
    except Exception:  # noqa: BLE001 - an unfamiliar Snakemake structure: no default
        return None
    if raw is None or raw == "":
        return None
    try:
        value = ast.literal_eval(raw) if isinstance(raw, str) else raw
    except (ValueError, SyntaxError):
        value = raw  # Snakemake takes a bare word as a string too
    return str(value) if value not in (None, "") else None


def in_storage(workflow, path: str) -> bool:
    """Whether an artifact exists where this run reads it: the default storage, else this folder.

    Mirrors how Snakemake maps a plain path to the default storage provider (prefix + path).
    """
    s = workflow.storage_settings
    if s.default_storage_provider in (None, "none"):
        return os.path.exists(path)
    prefix = s.default_storage_prefix or ""
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    try:
        provider = workflow.storage_registry.default_storage_provider
        return provider.object(prefix + os.path.normpath(path)).exists()
    except Exception as err:  # noqa: BLE001 - an unfamiliar Snakemake: let Snakemake find out itself
        print(f"kiln: gather: cannot check storage for {path} ({err})", file=sys.stderr)
        return True


def check_gathered(workflow, cfg: KilnConfig, run: dict[str, str | None], build: dict[str, str | None]) -> list:
    """The summary's input function with gather=true: no files, a check.

    The validations of devices this host cannot make must already be in storage (with
    gather=true no rule makes them here): stop before any job if not, naming the devices and
    what to run on their hosts (a dry run only prints it).
    """
    missing = missing_elsewhere(cfg, run, build, lambda path: in_storage(workflow, path))
    if missing:
        message = missing_message(missing)
        if workflow.dryrun:
            print(message.replace("kiln: gather:", "kiln: gather (dry run):", 1), file=sys.stderr)
        else:
            from snakemake.exceptions import WorkflowError

            raise WorkflowError(message)
    return []


# --------------------------------------------------------------------------- the host plan


def job_modules(cfg: KilnConfig, rule: str, wildcards) -> tuple[str, ...]:
    """The modules a job of `rule` runs beyond its stage's static imports: those registries import by name."""
    w = dict(wildcards)
    extra: list[str] = []
    if rule == "dataset":
        d = cfg.datasets[w["dataset"]]
        if d.generator:
            from kiln.dataset import GENERATORS

            extra.append(GENERATORS[d.generator])
    if rule in ("export", "baseline"):
        from kiln.sources import ADAPTERS

        extra.append(ADAPTERS[cfg.models[w["model"]].source])
    if rule in DEVICE_RULES:
        extra.append(backends.module_of(cfg.devices[w["device"]].backend))
    return tuple(extra)


@dataclass
class Plan:
    """What this Snakemake run makes, and where: computed once, read by every rule (rules/common.smk)."""

    cfg: KilnConfig
    run: dict  # run switches: gather, cluster (run_options)
    host_can_build: dict[str, str | None]  # device -> why this host cannot build its engines (None: it can)
    host_can_run: dict[str, str | None]  # device -> why this host cannot run them
    default_partition: str | None = None  # the profile's default slurm_partition
    _code: dict = field(default_factory=dict, repr=False)

    @classmethod
    def create(cls, config: dict, config_files: list[str], default_resources=None) -> Plan:
        """The checked config and this host's answers; a mistake is one line and exit 1 (load_or_exit)."""
        run = run_options_or_exit(config)
        cfg = load_or_exit(config, config_files)
        return cls(cfg, run, buildable(cfg), runnable(cfg), default_resource(default_resources, "slurm_partition"))

    @functools.cached_property
    def can_build(self) -> dict[str, str | None]:
        """Which devices' engines this run makes: with gather=true or cluster=true, every device's
        rows are made somewhere (other hosts' storage, the executor's nodes)."""
        return everywhere(self.cfg) if self.run["gather"] or self.run["cluster"] else self.host_can_build

    @functools.cached_property
    def can_run(self) -> dict[str, str | None]:
        return everywhere(self.cfg) if self.run["gather"] or self.run["cluster"] else self.host_can_run

    @functools.cached_property
    def build_here(self) -> str:
        """The `device` wildcard of build jobs rules may make: with gather=true only this host's
        devices (other hosts' outputs in storage are taken as they are), otherwise any."""
        return device_pattern(self.host_can_build if self.run["gather"] else None)

    @functools.cached_property
    def run_here(self) -> str:
        """Likewise for validations and baselines."""
        if not self.run["gather"]:
            return device_pattern(None)
        return device_pattern({d: self.host_can_run[d] or self.host_can_build[d] for d in self.cfg.devices})

    # ---------------------------------------------------------------- per job

    def engine_source(self, device: str, model: str, precision: str) -> str:
        """The precision-variant ONNX this engine is built from (the device's backend decided at load)."""
        d = self.cfg.devices[device]
        return paths.fmt(paths.VARIANT, results=self.cfg.results, model=model, opset=d.opset,
                         precision=d.variant_of(precision))

    def needs_calibration(self, device: str, precision: str) -> bool:
        d = self.cfg.devices[device]
        return backends.get(d.backend).needs_calibration(d, base_precision(precision))  # int8-mixed as int8

    def kept_inputs(self):
        """The build rule's `kept` input: the mixed variant's record (its kept nodes) where the engine is built
        from the strict source with per-layer constraints; [] for every other job."""
        if not any(kept_records(self.cfg, d, m, p) for d, m, p in self.cfg.jobs()):
            return []
        return lambda w: kept_records(self.cfg, w.device, w.model, w.precision)

    def code(self, rule: str):
        """The `code` param of `rule`: its stage's fingerprint, with the modules registries add per job.
        A constant where every job of the rule runs the same modules (Snakemake then calls nothing per job)."""
        stage = STAGES[rule]
        if rule not in ("dataset", "export", "baseline", *DEVICE_RULES):
            return fingerprint.code_fingerprint(stage)
        keys = {(stage, *job_modules(self.cfg, rule, w)) for w in self._wildcards(rule)}
        if len(keys) == 1:
            return fingerprint.code_fingerprint(*keys.pop())

        def job_code(w) -> str:
            key = (stage, *job_modules(self.cfg, rule, w))
            if key not in self._code:
                self._code[key] = fingerprint.code_fingerprint(*key)
            return self._code[key]

        return job_code

    def _wildcards(self, rule: str) -> list[dict]:
        """The wildcard values a registry looks at, over every job of `rule` the config can ask for."""
        if rule == "dataset":
            return [{"dataset": d} for d in self.cfg.datasets]
        if rule == "export":
            return [{"model": m} for m in self.cfg.models]
        return [{"device": d, "model": m} for d, dev in self.cfg.devices.items() for m in dev.models]

    def per_device(self, fn):
        """`fn(device)` as a param or input: a constant where every device gives the same, else per job."""
        return _constant_or_lookup({d: fn(d) for d in self.cfg.devices}, "device")

    def per_model(self, fn):
        """`fn(model)` as a param: a constant where every model gives the same, else per job."""
        return _constant_or_lookup({m: fn(m) for m in self.cfg.models}, "model")

    def reference_inputs(self, device: str, model: str) -> dict[str, str]:
        """The fp32 reference a device's validation compares with: at the device's opset."""
        key = {"results": self.cfg.results, "model": model, "opset": self.cfg.devices[device].opset}
        return {"reference": paths.fmt(paths.REFERENCE, **key), "reference_record": paths.fmt(paths.REFERENCE_RECORD, **key)}

    def calibration_inputs(self):
        """The build rule's calibration input: the model's calib split where the device's backend
        calibrates this precision (an INT8 calibrator); [] for every job where none does."""
        if not any(self.needs_calibration(d, p) for d, dev in self.cfg.devices.items() for p in dev.precisions):
            return []
        return lambda w: ([paths.partial(paths.INPUTS, results=self.cfg.results, model=w.model, split="calib")]
                          if self.needs_calibration(w.device, w.precision) else [])

    def resources(self, rule: str) -> dict:
        """`resources:` of `rule`: memory and runtime; for per-device rules the GPU and cluster hints,
        a constant where every device gives the same (Snakemake then calls nothing per job)."""
        placed = DEVICE_RULES.get(rule, rule)
        res: dict = {"mem_mb": RULE_RESOURCES[placed]["mem_mb"], "runtime": RULE_RESOURCES[placed]["runtime"]}
        if rule not in DEVICE_RULES:
            return res
        per_device = {"gpu": {d: gpu_count(self.cfg, d, placed) for d in self.cfg.devices}}
        for name, key in DEVICE_HINTS.items():
            default = self.default_partition if key == "partition" else None
            per_device[name] = {d: cluster_hint(self.cfg, d, placed, key, default) for d in self.cfg.devices}
        for name, values in per_device.items():
            distinct = set(values.values())
            if distinct == {None}:
                continue  # unset for every device: Snakemake's defaults apply
            if len(distinct) == 1:
                res[name] = distinct.pop()
            else:
                res[name] = lambda w, values=values: values[w.device]
        return res

    def threads(self, rule: str):
        """Threads of a device's timed jobs (validate, baseline): its own setting, else every core Snakemake has."""
        return self.per_device(lambda d: self.cfg.devices[d].threads or 1024)


def _constant_or_lookup(table: dict, wildcard: str):
    """The one value where every key of `table` gives the same (Snakemake then calls nothing per job),
    else a function of the job's `wildcard` looking it up."""
    values = list(table.values())
    if values and all(v == values[0] for v in values):
        return values[0]
    return lambda w: table[getattr(w, wildcard)]
