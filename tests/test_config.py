"""Config loading: defaults from the schema, and one clear message for each user mistake."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest

from kiln.backends import ort_capabilities
from kiln.config import load, load_file, read_yaml
from kiln.errors import KilnError
from tests.conftest import REPO, write_config


def test_demo_config_loads_with_defaults():
    cfg = load_file(REPO / "config.yaml", base=REPO)
    assert set(cfg.models) == {"yolo_demo", "rtdetr_demo"}
    cpu = cfg.devices["cpu"]
    assert cpu.precisions == ("fp32", "fp16", "int8")
    assert cpu.models == ("yolo_demo", "rtdetr_demo")  # default: every model
    y = cfg.models["yolo_demo"]
    assert y.preprocess == "letterbox" and cfg.models["rtdetr_demo"].preprocess == "resize"
    assert y.surgery == ("remove_training_nodes", "fold_constants", "cleanup", "infer_shapes")
    assert y.decode == {"conf_threshold": 0.001, "iou_threshold": 0.6, "max_det": 300}
    assert cfg.validation["thresholds"]["int8"]["map50_drop_max"] == 0.05
    assert cfg.opsets("yolo_demo") == [16, 17]  # the Jetson on TensorRT 8.5 exports at opset 16
    # Variant ONNX files needed: ONNX Runtime and TensorRT 11 use the variants themselves; TensorRT 8.5
    # builds fp16 and calibrated int8 from the fp32 ONNX by builder flags.
    assert cfg.precisions("yolo_demo", 17) == ["fp32", "fp16", "bf16", "int8", "fp8"]
    assert cfg.precisions("yolo_demo", 16) == ["fp32"]
    assert len(cfg.jobs()) == 2 * (3 + 3 + 3 + 5 + 3)  # cpu, h200-ort, rtx-4090, h100, orin-jp5


def test_defaults_are_not_shared_between_models(config_dict):
    cfg = load(config_dict, check_paths=False)
    a, b = cfg.models["yolo_demo"].calibration, cfg.models["rtdetr_demo"].calibration
    assert a == b and a is not b


def _edit(d, path, value):
    *head, last = path
    for k in head:
        d = d[k]
    if value is KeyError:
        del d[last]
    else:
        d[last] = value


BAD = [
    (("models", "yolo_demo", "inputsize"), [256, 256], "unknown key 'models.yolo_demo.inputsize'"),
    # A precision this host's onnxruntime cannot run, as its capability probe says (none: no such case).
    *[(("devices", "cpu", "precisions"), ["fp32", p], f"precision '{p}' cannot run on ONNX Runtime's CPUExecutionProvider")
      for p in [p for p, c in ort_capabilities.capabilities().items() if not c.runs][:1]],
    (("devices", "cpu", "precisions"), ["fp32", "int4"], "'devices.cpu.precisions[1]' is 'int4': use one of fp32"),
    (("devices", "cpu", "precisions"), ["fp32", "fp32"], "'devices.cpu.precisions' lists an item twice"),
    (("devices", "cpu", "opset"), 25, "'devices.cpu.opset': 25 is greater than the maximum of 20"),
    (("devices", "cpu", "opset"), 9, "'devices.cpu.opset': 9 is less than the minimum of 13"),
    (("devices", "cpu", "backend"), "tensorrtx", "'devices.cpu.backend' is 'tensorrtx': use one of onnxruntime"),
    (("devices", "cpu", "models"), ["yolo"], "'devices.cpu.models' names 'yolo', which is not under 'models'"),
    (("devices", "cpu", "batch_sizes"), [0], "'devices.cpu.batch_sizes[0]': 0 is less than the minimum of 1"),
    (("models", "yolo_demo", "dataset"), "coco", "'models.yolo_demo.dataset' names 'coco', which is not under 'datasets'"),
    (("models", "yolo_demo", "input_size"), [250, 256], "'models.yolo_demo.input_size[0]': 250 is not a multiple of 32"),
    (("models", "yolo_demo", "layout"), "ssd", "'models.yolo_demo.layout' is 'ssd': use one of yolo, rtdetr"),
    (("models", "yolo_demo", "factory"), "kiln.demo.models.yolo_demo", "write it as module:function"),
    (("models", "yolo_demo", "checkpoint"), KeyError, "'models.yolo_demo' lacks a required key: 'checkpoint'"),
    (("models", "yolo_demo", "calibration", "images"), 100, "'models.yolo_demo.calibration.images' is 100 but dataset 'demo' has calib.count 8"),
    (("datasets", "demo", "generator"), KeyError, "'datasets.demo.val.images' is missing"),
]


@pytest.mark.parametrize(("path", "value", "message"), BAD, ids=[".".join(b[0]) + "=" + str(b[1]) for b in BAD])
def test_bad_config_is_refused_with_clear_message(config_dict, path, value, message):
    _edit(config_dict, path, value)
    with pytest.raises(KilnError) as err:
        load(config_dict, check_paths=False)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_invalid_name_is_refused(config_dict):
    config_dict["models"]["my model"] = config_dict["models"].pop("yolo_demo")
    with pytest.raises(KilnError, match=r"invalid name 'my model' under 'models': use letters"):
        load(config_dict, check_paths=False)


def test_missing_checkpoint_names_key_and_file(config_dict, tmp_path):
    with pytest.raises(KilnError, match=r"'models.yolo_demo.checkpoint': file 'models/demo_yolo.pt' not found"):
        load(config_dict, base=tmp_path)


def test_missing_dataset_files_named(config_dict, tmp_path):
    config_dict["datasets"]["demo"] = {"val": {"images": "val/img", "annotations": "val.json"}, "calib": {"images": "c"}}
    with pytest.raises(KilnError, match=r"'datasets.demo.val.images': 'val/img' not found"):
        load(config_dict, base=tmp_path, check_paths=True)


def test_duplicate_yaml_key_is_refused(tmp_path):
    text = (REPO / "config.yaml").read_text().replace("  rtdetr_demo:", "  yolo_demo:")
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(KilnError, match=r"dup.yaml: line \d+: duplicate key 'yolo_demo' \(first at line \d+\)"):
        load_file(path, base=REPO)


def test_snakemake_prints_one_line_without_traceback(config_dict, workdir):
    """The same refusal through the workflow: before any job, one line, no Python traceback."""
    tmp_path = workdir  # holds the demo checkpoints, which config load reads (weights-only)
    cannot = [p for p, c in ort_capabilities.capabilities().items() if not c.runs]
    if not cannot:
        pytest.skip("this host's onnxruntime runs every precision on the CPU: no refusal to provoke")
    config_dict["devices"]["cpu"]["precisions"] = [cannot[0]]
    cfgfile = write_config(tmp_path / "bad.yaml", config_dict)
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--cores", "1", "-s", str(REPO / "Snakefile"),
         "--configfile", str(cfgfile), "--directory", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"kiln: config: 'devices.cpu': precision '{cannot[0]}' cannot run on ONNX Runtime's CPUExecutionProvider" in out
    assert "Traceback" not in out and 'File "' not in out
    assert not (tmp_path / "results").exists()


def test_config_devices_selects_some_devices(tmp_path):
    from kiln.workflow import select_devices

    files = [str(REPO / "config.yaml")]
    raw = read_yaml(REPO / "config.yaml")
    picked = select_devices({**raw, "devices": "cpu,rtx-4090"}, files)
    assert list(picked["devices"]) == ["cpu", "rtx-4090"]
    assert picked["devices"]["rtx-4090"]["backend"] == "tensorrt-rtx"
    assert select_devices(raw, files) is raw  # no selection: untouched
    with pytest.raises(KilnError, match=r"--config devices=cpu,tpu: unknown device 'tpu'; the config files define: cpu"):
        select_devices({**raw, "devices": "cpu,tpu"}, files)


@pytest.mark.parametrize("key", ["cosine_min", "match_rate_min", "map50_drop_max", "map_drop_max"])
@pytest.mark.parametrize("value", [5, 1.5, -0.1])
def test_fraction_gates_are_bounded(config_dict, key, value):
    """Every gate is a fraction (0 to 1): `map50_drop_max: 5` could never fail, so the config check refuses it."""
    gates = {"cosine_min": 0.98, "match_rate_min": 0.8, "map50_drop_max": 0.05, "map_drop_max": 0.07}
    config_dict["validation"]["thresholds"] = {"int8": {**gates, key: value}}
    with pytest.raises(KilnError) as err:
        load(config_dict, check_paths=False)
    bound = "greater than the maximum of 1" if value > 1 else "less than the minimum of 0"
    assert str(err.value) == f"config: 'validation.thresholds.int8.{key}': {value} is {bound}"


def test_calibration_images_checked_only_where_calibration_is_used(config_dict):
    """No device builds int8 or fp8 (nor calibrates): calibration.images may exceed the calib split."""
    config_dict["models"]["yolo_demo"]["calibration"]["images"] = 100
    for device in config_dict["devices"].values():
        device["precisions"] = [p for p in device["precisions"] if p not in ("int8", "fp8")]
    assert load(config_dict, check_paths=False).models["yolo_demo"].calibration["images"] == 100
    # One device that quantizes it again: refused, naming what calibrates.
    config_dict["devices"]["cpu"]["precisions"].append("int8")
    with pytest.raises(KilnError, match=r"^config: 'models.yolo_demo.calibration.images' is 100 but dataset 'demo' "
                                        r"has calib.count 8 \(calibrated for cpu/int8\): lower one or raise the other$"):
        load(config_dict, check_paths=False)


def test_class_count_mismatch_is_refused_at_load(workdir, config_dict, tmp_path):
    """Before any job: the demo factory's num_classes, or a checkpoint whose head says 80, against the
    3-class demo dataset."""
    import torch

    from kiln.demo.models import yolo_demo

    wrong = copy.deepcopy(config_dict)
    wrong["models"]["yolo_demo"]["factory_args"] = {"num_classes": 80}
    wrong["models"]["yolo_demo"]["checkpoint"] = "models/y80.pt"
    torch.manual_seed(0)
    torch.save(yolo_demo(num_classes=80).state_dict(), workdir / "models/y80.pt")
    with pytest.raises(KilnError) as err:
        load(wrong, base=workdir)
    assert str(err.value) == (
        "config: 'models.yolo_demo' has 80 classes (checkpoint 'models/y80.pt' head.cls.2.2.weight) but its "
        "dataset 'demo' has 3 (generator shapes): use a checkpoint of a model trained on the 3 classes, or point "
        "'models.yolo_demo.dataset' at the dataset it was trained on")
    # A state_dict the head says nothing known of: the factory's num_classes is what is compared.
    torch.save({"w": torch.zeros(2, 2)}, workdir / "models/plain.pt")
    wrong["models"]["yolo_demo"]["checkpoint"] = "models/plain.pt"
    with pytest.raises(KilnError) as err:
        load(wrong, base=workdir)
    assert str(err.value).startswith("config: 'models.yolo_demo' has 80 classes ('models.yolo_demo.factory_args."
                                     "num_classes') but its dataset 'demo' has 3 (generator shapes): set "
                                     "'models.yolo_demo.factory_args.num_classes: 3'")
    # The demo as committed: 3 and 3.
    assert load(config_dict, base=workdir).models["yolo_demo"].factory_args["num_classes"] == 3
    from kiln.sources import num_classes

    assert num_classes(load(config_dict, base=workdir).models["rtdetr_demo"], workdir)[0] == 3
