"""Load and check config.yaml: schema first (defaults filled), then what a schema cannot say."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import yaml

from kiln.errors import KilnError
from kiln.specs import MIXED_PRECISIONS, PRECISIONS, DatasetSpec, DeviceProfile, KilnConfig, ModelSpec, base_precision

__all__ = ["PRECISIONS", "DatasetSpec", "DeviceProfile", "KilnConfig", "ModelSpec", "load", "load_file", "read_yaml"]

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schemas" / "config.schema.yaml"
# Defaults that follow the source framework where its own differ from the schema's (docs/config.md):
# Ultralytics' preprocessing (cv2 INTER_LINEAR letterbox, kiln.preprocess) and its validator's NMS IoU
# (ultralytics/cfg/default.yaml: iou 0.7; conf 0.001 and max_det 300 are the schema's too).
SOURCE_DEFAULTS = {"ultralytics": {"resize_backend": "cv2", "decode": {"iou_threshold": 0.7}}}
NAME_HINT = "use letters, digits, '_' and '-', starting with a letter (names become file paths)"


# --------------------------------------------------------------------------- loading


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML loader that refuses duplicate keys: PyYAML silently keeps the last one."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise KilnError(
                f"{loader.name}: line {key_node.start_mark.line + 1}: duplicate key '{key}' "
                f"(first at line {seen[key] + 1}): give each entry its own name"
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_yaml(path: str | Path) -> dict:
    """Read a config file, refusing duplicate keys and naming the file in every error."""
    path = Path(path)
    if not path.is_file():
        raise KilnError(f"config file '{path}' not found: pass an existing file with --configfile")
    try:
        with path.open() as fh:
            loader = _UniqueKeyLoader(fh)
            loader.name = str(path)
            try:
                data = loader.get_single_data()
            finally:
                loader.dispose()
    except yaml.YAMLError as err:
        raise KilnError(f"{path}: not valid YAML: {err}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise KilnError(f"{path}: the top level must be a mapping of keys (models, devices, datasets)")
    return data


def check_files_unique(paths: list[str | Path]) -> None:
    """Check each config file for duplicate keys (Snakemake's own loader does not)."""
    for p in paths:
        read_yaml(p)


def _key_path(parts) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def _schema_message(err) -> str:
    """One line for a jsonschema error: which key, what is wrong, how to fix it."""
    where = _key_path(err.absolute_path)
    if err.validator == "additionalProperties":
        allowed = sorted(err.schema.get("properties", {}))
        extra = sorted(set(err.instance) - set(allowed))
        keys = ", ".join(f"'{_key_path([*err.absolute_path, k])}'" for k in extra)
        return f"unknown key {keys}: remove it or fix its spelling (allowed here: {', '.join(allowed)})"
    if err.validator == "propertyNames" or "propertyNames" in err.absolute_schema_path:
        return f"invalid name '{err.instance}' under '{where}': {NAME_HINT}"
    if err.validator == "pattern" and err.absolute_path and err.absolute_path[-1] == "factory":
        return f"'{where}' is '{err.instance}': write it as module:function (e.g. kiln.demo.models:yolo_demo)"
    if err.validator == "required":
        return f"'{where}' lacks a required key: {err.message}"
    if err.validator == "enum":
        return f"'{where}' is {err.instance!r}: use one of {', '.join(map(str, err.validator_value))}"
    if err.validator == "uniqueItems":
        return f"'{where}' lists an item twice: list each once"
    return f"'{where}': {err.message}"


def validate_schema(raw: dict, schema_path: Path = SCHEMA_PATH) -> dict:
    """Validate against the JSON schema and fill defaults; returns a new dict."""
    import jsonschema
    from snakemake.utils import validate as snakemake_validate

    data = copy.deepcopy(raw)
    schema = yaml.safe_load(schema_path.read_text())
    errors = sorted(
        jsonschema.Draft202012Validator(schema).iter_errors(data),
        key=lambda e: (list(map(str, e.absolute_path)), e.validator != "additionalProperties"),
    )
    if errors:
        best = jsonschema.exceptions.best_match(errors)
        raise KilnError(f"config: {_schema_message(best)}")
    # Snakemake's validator is the one that fills defaults from the schema.
    snakemake_validate(data, str(schema_path), set_default=True)
    # Defaults are shared objects of the schema: copy so no two keys alias one dict.
    return copy.deepcopy(data)


def load(raw: dict, base: str | Path = ".", check_paths: bool = True) -> KilnConfig:
    """Validate a raw config dict and build the typed, cross-checked KilnConfig."""
    _check_streams(raw)
    data = validate_schema(raw)
    base = Path(base)

    datasets = {}
    for name, d in data["datasets"].items():
        spec = DatasetSpec(
            name=name,
            generator=d.get("generator"),
            seed=d["seed"],
            image_size=d["image_size"],
            calib_images=d["calib"].get("images"),
            calib_count=d["calib"]["count"],
            val_images=d["val"].get("images"),
            val_annotations=d["val"].get("annotations"),
            val_count=d["val"]["count"],
        )
        if spec.generator is None:
            for key, value in (
                ("val.images", spec.val_images),
                ("val.annotations", spec.val_annotations),
                ("calib.images", spec.calib_images),
            ):
                if not value:
                    raise KilnError(
                        f"config: 'datasets.{name}.{key}' is missing: a dataset either sets "
                        f"'generator: shapes' or names its image folders and COCO annotations"
                    )
                if check_paths and not (base / value).exists():
                    raise KilnError(
                        f"config: 'datasets.{name}.{key}': '{value}' not found: fix the path "
                        f"(relative to {base.resolve()})"
                    )
        datasets[name] = spec

    trusted = data["trusted_factories"]
    packages = tuple(trusted["packages"])
    folders = tuple(str((base / f).resolve()) for f in trusted["folders"])
    for i, (value, folder) in enumerate(zip(trusted["folders"], folders)):
        if check_paths and not Path(folder).is_dir():
            raise KilnError(f"config: 'trusted_factories.folders[{i}]': folder '{value}' not found: fix the path "
                            f"(relative to {base.resolve()})")

    models = {}
    for name, m in data["models"].items():
        if m["dataset"] not in datasets:
            raise KilnError(
                f"config: 'models.{name}.dataset' names '{m['dataset']}', which is not under 'datasets' "
                f"(known: {', '.join(datasets)})"
            )
        from kiln.sources import check_model

        check_model(name, m, base, check_paths, packages, folders)
        sens = m["sensitivity"]
        _check_sensitivity_runs(name, sens.get("precisions", []))
        if sens.get("images", 0) > datasets[m["dataset"]].calib_count:
            raise KilnError(
                f"config: 'models.{name}.sensitivity.images' is {sens['images']} but dataset "
                f"'{m['dataset']}' has calib.count {datasets[m['dataset']].calib_count}: lower one or raise the other"
            )
        models[name] = ModelSpec(
            name=name,
            source=m["source"],
            factory=m.get("factory"),
            factory_args=dict(m["factory_args"]),
            # The file the weights come from: the checkpoint, or an Ultralytics model YAML (random weights).
            checkpoint=m.get("checkpoint") or m.get("ultralytics_yaml"),
            layout=m["layout"],
            dataset=m["dataset"],
            input_size=tuple(m["input_size"]),
            preprocess=m.get("preprocess") or ("resize" if m["layout"] in ("rtdetr", "ultralytics_rtdetr") else "letterbox"),
            resize_backend=m.get("resize_backend") or SOURCE_DEFAULTS.get(m["source"], {}).get("resize_backend", "pil"),
            dynamic_batch=m["dynamic_batch"],
            dynamic_hw=m["dynamic_hw"],
            surgery=tuple(m["surgery"]),
            simplify=m["simplify"],
            decode={**m["decode"], **{k: v for k, v in SOURCE_DEFAULTS.get(m["source"], {}).get("decode", {}).items()
                                      if k not in (raw["models"][name].get("decode") or {})}},
            calibration=dict(m["calibration"]),
            sensitivity=dict(sens),
            trust_checkpoint=m["trust_checkpoint"],
            ultralytics_yaml=m.get("ultralytics_yaml"),
            rtdetr_repo=m.get("rtdetr_repo"),
            rtdetr_config=m.get("rtdetr_config"),
            nms=m["nms"],
            trusted_packages=packages,
            trusted_folders=folders,
        )
        if check_paths:
            _check_classes(models[name], datasets[m["dataset"]], base)

    from kiln import backends

    devices = {}
    for name, d in data["devices"].items():
        if d["backend"] not in backends.names():  # Kiln's own and those other packages register
            raise KilnError(f"config: 'devices.{name}.backend' is {d['backend']!r}: use one of "
                            f"{', '.join(backends.names())}")
        for m in d.get("models", []):
            if m not in models:
                raise KilnError(
                    f"config: 'devices.{name}.models' names '{m}', which is not under 'models' "
                    f"(known: {', '.join(models)})"
                )
        device = DeviceProfile(
            name=name,
            backend=d["backend"],
            opset=d["opset"],
            precisions=tuple(d["precisions"]),
            providers=tuple(d["providers"]),
            threads=d["threads"],
            batch_sizes=tuple(d["batch_sizes"]),
            models=tuple(d.get("models") or models),
            compute_capability=d.get("compute_capability"),
            tensorrt_min=d.get("tensorrt", {}).get("min"),
            tensorrt_max=d.get("tensorrt", {}).get("max") or d.get("tensorrt", {}).get("min"),
            jetson=d["jetson"],
            workspace_mb=d.get("workspace_mb"),
            builder_optimization_level=d["builder_optimization_level"],
            hardware_compatibility=d["hardware_compatibility"],
            version_compatible=d["version_compatible"],
            tf32=d["tf32"],
            int8_mode=d["int8_mode"],
            dla_core=d.get("dla_core"),
            profiles=tuple(d.get("profiles") or ()),
            cluster=dict(d["cluster"]),
            max_streams=d["max_streams"],
        )
        backend = backends.get(device.backend)
        # Backends know the strict precisions: a mixed variant is checked as the precision it stands for.
        strict = dataclasses.replace(device, precisions=tuple(dict.fromkeys(map(base_precision, device.precisions))))
        for problem in backend.check_device(strict):
            raise KilnError(f"config: 'devices.{name}': {problem}")
        device = dataclasses.replace(device, variants=_variants(backend, device, strict))
        for m in device.models:  # what the backend's parser cannot build (its op table)
            for problem in backend.model_problems(strict, models[m]):
                raise KilnError(f"config: 'devices.{name}' builds model '{m}', whose {problem}")
        for bs in device.batch_sizes:
            for m in device.models:
                if bs > 1 and not models[m].dynamic_batch:
                    raise KilnError(
                        f"config: 'devices.{name}.batch_sizes' has {bs} but model '{m}' is exported with a "
                        f"static batch: set 'models.{m}.dynamic_batch: true' or use batch size 1"
                    )
        devices[name] = device

    _check_calibration(models, datasets, devices)

    # A precision's thresholds given in part keep the defaults of the keys left out (e.g. one written
    # before the per-part keys existed): the gates read every key.
    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    defaults = schema["properties"]["validation"]["properties"]["thresholds"]["properties"]
    thresholds = data["validation"]["thresholds"]
    for precision, given in thresholds.items():
        thresholds[precision] = {**defaults[precision]["default"], **given}

    return KilnConfig(
        results=data["results"].rstrip("/"),
        datasets=datasets,
        models=models,
        devices=devices,
        validation=data["validation"],
        raw=data,
    )


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _check_streams(raw: dict) -> None:
    """`validation.streams` and `devices.<name>.max_streams`, with their fixes (before the schema's generic words)."""
    streams = (raw.get("validation") or {}).get("streams") if isinstance(raw.get("validation"), dict) else None
    key = "config: 'validation.streams'"
    if streams is not None:
        if not isinstance(streams, list):
            raise KilnError(f"{key} is {streams!r}: write a list of stream counts, e.g. [1, 2, 4, 8]")
        if not streams:
            raise KilnError(f"{key} is an empty list: list at least one stream count, e.g. [1], or leave the key "
                            f"out for the default [1, 2, 4, 8]")
        for i, n in enumerate(streams):
            if not _positive_int(n):
                raise KilnError(f"config: 'validation.streams[{i}]' is {n!r}: stream counts are whole numbers of 1 "
                                f"or more")
        twice = sorted({n for n in streams if streams.count(n) > 1})
        if twice:
            raise KilnError(f"{key} lists {', '.join(map(str, twice))} twice: list each count once")
    for name, d in (raw.get("devices") or {}).items():
        if isinstance(d, dict) and "max_streams" in d and not _positive_int(d["max_streams"]):
            raise KilnError(f"config: 'devices.{name}.max_streams' is {d['max_streams']!r}: use a whole number of "
                            f"1 or more (default 8)")


def _variants(backend, device: DeviceProfile, strict: DeviceProfile) -> dict[str, str]:
    """Engine precision -> the variant ONNX it is built from. A mixed one from its own Q/DQ variant, or where
    the backend builds its strict precision from another source (TensorRT < 10's int8 calibrator), from that
    source with per-layer precision constraints from the mixed variant's kept nodes (Backend.constrains_layers)."""
    variants = {}
    for p in device.precisions:
        base = base_precision(p)
        source = backend.source_precision(base, strict)
        if p in MIXED_PRECISIONS and source != base and not backend.constrains_layers(strict):
            raise KilnError(
                f"config: 'devices.{device.name}.precisions' lists {p}, but this device builds {base} from the "
                f"{source} ONNX (not its Q/DQ variant), so a mixed variant cannot reach it: remove {p} "
                f"or build {base} from Q/DQ (int8_mode: qdq)"
            )
        variants[p] = p if p in MIXED_PRECISIONS and source == base else source
    return variants


def _check_sensitivity_runs(model: str, precisions: list[str]) -> None:
    """Sensitivity ranks regions with ONNX Runtime CPU (kiln.judge): refuse a precision it cannot run, with the
    reason its capability probe found (kiln.backends.ort_capabilities; bf16 Conv is NOT_IMPLEMENTED there)."""
    if not precisions:
        return
    from kiln.backends.ort_capabilities import capabilities

    for p in precisions:
        if p == "fp16":  # judged on its emulation in fp32 arithmetic (kiln.fp16_emulation), not ORT's fp16
            continue
        cap = capabilities("CPUExecutionProvider")[p]
        if not cap.runs:
            raise KilnError(f"config: 'models.{model}.sensitivity.precisions' lists {p}, but ONNX Runtime's CPU "
                            f"provider, on which rule sensitivity judges variants, cannot run {p} here "
                            f"({' '.join(cap.note.split())}): remove {p} from the list")


def _check_calibration(models: dict, datasets: dict, devices: dict) -> None:
    """``calibration.images`` fits the calibration split, for the models something calibrates.

    Calibration is used by ModelOpt's Q/DQ variants (int8, fp8) and by a backend's own calibrator
    (``needs_calibration``: TensorRT's INT8 calibrator, "best"); a model no device builds so never
    reads the split, and its setting is not checked.
    """
    from kiln import backends

    for name, spec in models.items():
        users = [f"{d.name}/{p}" for d in devices.values() if name in d.models for p in d.precisions
                 if base_precision(d.variant_of(p)) in ("int8", "fp8")
                 or backends.get(d.backend).needs_calibration(d, base_precision(p))]
        have = datasets[spec.dataset].calib_count
        if users and spec.calibration["images"] > have:
            raise KilnError(
                f"config: 'models.{name}.calibration.images' is {spec.calibration['images']} but dataset "
                f"'{spec.dataset}' has calib.count {have} (calibrated for {', '.join(users)}): lower one or "
                f"raise the other"
            )

def dataset_classes(spec: DatasetSpec, base: Path) -> tuple[int, str] | None:
    """(class count, where it was read) of a dataset: its generator's classes or its COCO annotations' categories."""
    if spec.generator:
        from kiln.dataset import generator

        return len(generator(spec.generator).CLASS_NAMES), f"generator {spec.generator}"
    import json

    try:
        categories = json.loads((base / spec.val_annotations).read_text())["categories"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # the dataset stage names what is wrong with the file
    return len(categories), f"'{spec.val_annotations}' categories"


def _check_classes(model: ModelSpec, dataset: DatasetSpec, base: Path) -> None:
    """Refuse a model whose class count (read from its checkpoint or config) is not its dataset's."""
    from kiln.sources import num_classes

    have, want = num_classes(model, base), dataset_classes(dataset, base)
    if have is None or want is None or have[0] == want[0]:
        return
    key = "nc" if model.source == "ultralytics" else "num_classes"
    from_config = "factory_args" in have[1] or bool(model.ultralytics_yaml)  # not from trained weights
    fix = (f"set 'models.{model.name}.factory_args.{key}: {want[0]}'" if from_config
           else f"use a checkpoint of a model trained on the {want[0]} classes")
    raise KilnError(f"config: 'models.{model.name}' has {have[0]} classes ({have[1]}) but its dataset "
                    f"'{dataset.name}' has {want[0]} ({want[1]}): {fix}, or point 'models.{model.name}.dataset' "
                    f"at the dataset it was trained on")


def load_file(path: str | Path, base: str | Path | None = None, check_paths: bool = True) -> KilnConfig:
    """Read a config file and load it (used by tests and the command line)."""
    path = Path(path)
    return load(read_yaml(path), base=base if base is not None else path.parent, check_paths=check_paths)
