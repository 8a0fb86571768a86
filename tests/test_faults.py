"""Faults that are nobody's model: a full disk or quota in any stage, and a quantize job cut short.

A full disk is simulated by a writer that raises OSError ENOSPC / EDQUOT; the stages run through
their real `scripts/<rule>.py` and kiln.entry, as Snakemake's `script:` runs them, with a stand-in
for the `snakemake` object.
"""

from __future__ import annotations

import errno
import json
import logging
import re
import runpy
import shutil
import sys
from collections import namedtuple
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from kiln.backends.trt import diagnose
from kiln.config import load
from kiln.precision import quantize, variant
from kiln.util import disk_error
from tests.conftest import REPO, tiny_config

Usage = namedtuple("Usage", "total used free")
FREE = Usage(total=100 << 30, used=(100 << 30) - (12 << 10), free=12 << 10)  # "12.0 KiB free of 100.0 GiB"


class Named(list):
    """Snakemake's input/output/log lists: by index and by name."""

    def __init__(self, items=(), **named):
        super().__init__([*items, *named.values()])
        self.__dict__.update(named)


class Wildcards(dict):
    """Snakemake's wildcards: items() and attributes."""

    __getattr__ = dict.__getitem__


def smk(rule: str, tmp_path: Path, wildcards: dict, input: Named, output: Named, params: dict) -> SimpleNamespace:
    return SimpleNamespace(rule=rule, wildcards=Wildcards(wildcards), input=input, output=output, params=SimpleNamespace(**params),
                           log=[str(tmp_path / f"{rule}.log")], config=tiny_config(), threads=1)


@pytest.fixture
def run_script(monkeypatch):
    """Run scripts/<rule>.py with `snakemake` injected; the root logger is put back after (entry sets it up)."""
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)

    def run(rule: str, snakemake: SimpleNamespace) -> None:
        runpy.run_path(str(REPO / "scripts" / f"{rule}.py"), init_globals={"snakemake": snakemake})

    yield run
    for h in root.handlers:
        if h not in saved[0]:
            h.close()
    root.handlers[:], root.level = saved


@pytest.fixture
def disk(monkeypatch):
    """shutil.disk_usage reports 12 KiB free, for exact messages."""
    monkeypatch.setattr(shutil, "disk_usage", lambda path: FREE)


def relu_model(path: Path) -> Path:
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 4, 4])
    y = helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 3, 4, 4])
    nodes = [helper.make_node("Relu", ["images"], ["r"], name="/relu"),
             helper.make_node("Sigmoid", ["r"], ["output0"], name="/sigmoid")]
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)],
                                ir_version=8), str(path))
    return path


def one_line(capsys) -> str:
    """The job's stderr: no traceback, and its last line (the one Snakemake shows under the rule's error)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Logging error" not in err
    return err.strip().splitlines()[-1]


def test_simplify_on_a_full_disk_stops_with_one_line_and_no_output(tmp_path, monkeypatch, run_script, disk, capsys):
    """onnxsim succeeded, its output could not be written: not an onnxsim failure, no pass-through copy."""
    folder = tmp_path / "results/onnx/yolo_demo/opset17"
    src = relu_model(folder / "export.onnx")
    dst, record = folder / "simplified.onnx", folder / "simplify.json"

    def full_disk(model, path, *args, **kwargs):
        Path(path).write_bytes(b"half a model")
        raise OSError(errno.ENOSPC, "No space left on device")  # what write() raises: no file name

    monkeypatch.setattr(onnx, "save", full_disk)
    job = smk("simplify", tmp_path, {"model": "yolo_demo", "opset": "17"}, Named([str(src)]),
              Named(onnx=str(dst), record=str(record)), {"spec": {"simplify": True}})
    with pytest.raises(SystemExit) as exit_:
        run_script("simplify", job)
    assert exit_.value.code == 1
    message = (f"no space left on device writing '{dst}' (12.0 KiB free of 100.0 GiB on its filesystem): free some "
               f"space there, or point 'results' at a larger disk, then rerun")
    assert one_line(capsys) == f"kiln: {message}"
    assert message in Path(job.log[0]).read_text()  # the rule's log says it too
    assert not dst.exists() and not record.exists()
    assert sorted(p.name for p in folder.iterdir()) == ["export.onnx"]  # the atomic temporary is gone too


def test_surgery_over_quota_stops_with_one_line_naming_the_file(tmp_path, monkeypatch, run_script, disk, capsys):
    folder = tmp_path / "results/onnx/yolo_demo/opset17"
    src = relu_model(folder / "simplified.onnx")
    dst, record = folder / "surgery.onnx", folder / "surgery.json"

    def over_quota(model, path, *args, **kwargs):
        raise OSError(errno.EDQUOT, "Disk quota exceeded", str(path))  # as open() raises it: with the file

    monkeypatch.setattr(onnx, "save", over_quota)
    job = smk("surgery", tmp_path, {"model": "yolo_demo", "opset": "17"}, Named([str(src)]),
              Named(onnx=str(dst), record=str(record)), {"spec": {"surgery": ["infer_shapes"]}})
    with pytest.raises(SystemExit):
        run_script("surgery", job)
    line = one_line(capsys)
    assert re.fullmatch(
        rf"kiln: disk quota exceeded writing '{re.escape(str(folder))}/\.surgery\.onnx\.\w{{8}}\.onnx\.tmp' "
        r"\(12\.0 KiB free of 100\.0 GiB on its filesystem, but your quota there is used up\): delete some of your "
        r"files there or ask for a larger quota, then rerun", line), line
    assert not dst.exists() and not record.exists()
    assert sorted(p.name for p in folder.iterdir()) == ["simplified.onnx"]


def test_a_tool_wrapping_the_disk_error_is_still_a_full_disk():
    """ModelOpt's failures are re-raised as RuntimeError (kiln/precision/); child processes keep only text."""
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/data/quant.onnx")
        except OSError as e:
            raise RuntimeError("ModelOpt int8 quantization failed on surgery.onnx: OSError: ...") from e
    except RuntimeError as wrapped:
        assert disk_error(wrapped).filename == "/data/quant.onnx"
    found = disk_error(RuntimeError("polygraphy: OSError: [Errno 28] No space left on device: '/x/static.onnx'"))
    assert (found.errno, found.filename) == (errno.ENOSPC, "/x/static.onnx")
    assert disk_error(RuntimeError("[E] write failed: Disk quota exceeded")).errno == errno.EDQUOT
    assert disk_error(RuntimeError("onnxsim: graph has a dangling input")) is None


def test_diagnose_tool_on_a_full_disk_is_no_diagnosis(tmp_path, monkeypatch, capsys):
    """A Polygraphy (or check) process that could not write raises the disk error, not a 'failed' diagnosis."""
    crash = "import sys; sys.exit(\"OSError: [Errno 28] No space left on device: '/x/static.onnx'\")"
    with pytest.raises(OSError) as err:
        diagnose._run([sys.executable, "-c", crash], tmp_path, "polygraphy surgeon sanitize")
    assert (err.value.errno, err.value.filename) == (errno.ENOSPC, "/x/static.onnx")

    # The check process: its own exit code (exit 1 would tell `polygraphy debug reduce` "fails the same way"),
    # and a line the parent turns back into the disk error.
    def full_disk(*args):
        raise OSError(errno.ENOSPC, "No space left on device", "/x/build-1/model.engine")

    monkeypatch.setattr(diagnose, "check", full_disk)
    device = tmp_path / "device.json"
    device.write_text(diagnose.device_json(load(tiny_config(), check_paths=False).devices["rtx"]))
    assert diagnose.main(["check", "--device-json", str(device), "m.onnx"]) == diagnose.DISK_FULL
    back = disk_error(RuntimeError(capsys.readouterr().err))
    assert (back.errno, back.filename) == (errno.ENOSPC, "/x/build-1/model.engine")


def test_baseline_on_a_full_disk_is_not_recorded_as_pytorch_failing(tmp_path, monkeypatch):
    from kiln import baseline, sources

    def full_disk(spec):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sources, "build_module", full_disk)
    out = tmp_path / "baseline.json"
    with pytest.raises(OSError):
        baseline.run_baseline(load(tiny_config(), check_paths=False), "cpu", "yolo_demo", tmp_path / "none.npz", out)
    assert not out.exists()


# --------------------------------------------------------------------------------------------------
# Item 7: the calibration list is written last, after the ONNX it belongs to


@pytest.fixture
def quantize_job(tmp_path, monkeypatch):
    """variant_for_rule's int8 inputs (two calibration images), with ModelOpt's work replaced by a write of
    the ONNX through the stage's own atomic writer."""
    cfg = load(tiny_config(), check_paths=False)
    calib = tmp_path / "calib.npz"
    np.savez(calib, images=np.zeros((2, 3, 256, 256), np.uint8), image_ids=np.array([7, 9]),
             orig_sizes=np.full((2, 2), 256), ratios=np.ones(2), pads=np.zeros((2, 2)))
    ann = tmp_path / "annotations.json"
    ann.write_text(json.dumps({"images": [{"id": 7, "file_name": "a.png"}, {"id": 9, "file_name": "b.png"}]}))

    out = tmp_path / "results/onnx/yolo_demo/opset17"
    seen = {}

    def quantized(src, dst, options, calib=None, log=print):
        variant.atomic_write(b"int8 onnx", dst)
        seen["calib list when the ONNX was written"] = (out / "int8.calib.txt").exists()
        return {"wall_s": 0.0}

    monkeypatch.setattr(quantize, "make_variant", quantized)

    def run():
        return quantize.variant_for_rule(cfg, "yolo_demo", "int8", tmp_path / "surgery.onnx", out / "int8.onnx",
                                         out / "int8.json", calib_npz=calib, calib_list=out / "int8.calib.txt",
                                         annotations=ann)

    return SimpleNamespace(run=run, out=out, seen=seen)


def test_calib_list_is_not_left_when_the_onnx_write_fails(quantize_job, monkeypatch):
    def interrupted(data, dst):
        raise KeyboardInterrupt  # SIGINT (or a kill) while the ONNX is being written

    monkeypatch.setattr(variant, "atomic_write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        quantize_job.run()
    assert not (quantize_job.out / "int8.calib.txt").exists()
    assert not (quantize_job.out / "int8.onnx").exists()
    assert not [p for p in quantize_job.out.parent.rglob("*") if p.is_file()]  # no temporary either


def test_calib_list_is_written_after_a_successful_quantization(quantize_job):
    quantize_job.run()
    out = quantize_job.out
    assert (out / "int8.calib.txt").read_text() == "a.png\nb.png\n"
    assert (out / "int8.onnx").read_bytes() == b"int8 onnx"
    assert quantize_job.seen == {"calib list when the ONNX was written": False}  # written after it
    assert json.loads((out / "int8.json").read_text())["calibration_images"] == 2
