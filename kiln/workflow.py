"""What the Snakefile needs from the package: the checked config and the list of targets."""

from __future__ import annotations

import sys

from kiln import backends, paths
from kiln.config import KilnConfig, check_files_unique, load, read_yaml
from kiln.errors import KilnError


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


def load_or_exit(config: dict, config_files: list[str]) -> KilnConfig:
    """Check the config before any job runs; on a mistake print one line and stop (no traceback)."""
    try:
        check_files_unique(config_files)
        return load(select_devices(config, config_files), base=".")
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
    "reference": {"mem_mb": 8000, "runtime": 60},
    "build": {"mem_mb": 16000, "runtime": 120},
    "validate": {"mem_mb": 16000, "runtime": 60},
    "summary": {"mem_mb": 2000, "runtime": 10},
}


def needs_gpu(cfg: KilnConfig, device: str, rule: str) -> int:
    """GPUs a job of `rule` for `device` needs: running engines does; TensorRT-RTX builds do not."""
    d = cfg.devices[device]
    if d.backend == "onnxruntime":
        return int(rule == "validate" and d.providers[0] != "CPUExecutionProvider")
    if d.backend == "tensorrt-rtx" and rule == "build":
        return 0  # ahead-of-time: any host
    return 1


def cluster_hint(cfg: KilnConfig, device: str, rule: str, key: str) -> str:
    """A device's cluster hint (partition, constraint, gres, gpu_model) for jobs that run on it, else ''."""
    if not needs_gpu(cfg, device, rule):
        return ""
    return str(cfg.devices[device].cluster.get(key, ""))
