"""Every CPU stage gives the same bytes twice, and the lock file (kiln.lock) records and checks them.

The stages run twice from the same random-weight checkpoints of the demo factories, each time in a
fresh Python process with another PYTHONHASHSEED and into another folder: anything that depends on
set/dict ordering, absolute paths, temporary names or clocks shows up as a differing sha256.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from kiln import lock
from kiln.util import read_json, sha256, write_json
from tests.conftest import REPO, random_checkpoints, tiny_config

MODELS = ("yolo_demo", "rtdetr_demo")
ONNX_FILES = ("export", "simplified", "surgery", "fp32", "fp16", "int8")


def run_stages(results: str, ck_yolo: str, ck_rtdetr: str) -> None:
    """The workflow's CPU stages for both demo models at opset 17, called as the rules call them."""
    from kiln import dataset, export, inputs, paths, precision, reference, simplify, surgery
    from kiln.config import load

    raw = tiny_config(ck_yolo, ck_rtdetr)
    raw["results"] = results
    cfg = load(raw, check_paths=False)
    ann = {s: paths.fmt(paths.DATASET, results=results, dataset="demo", split=s) for s in ("calib", "val")}
    for split, path in ann.items():
        dataset.prepare(cfg.datasets["demo"], split, path)
    for m in MODELS:
        def f(pattern, m=m, **kw):
            return paths.fmt(pattern, results=results, model=m, opset=17, **kw)

        for split in ("calib", "val"):
            inputs.preprocess_split(cfg.models[m], ann[split], inputs.params(cfg, m, split)["count"],
                                    f(paths.INPUTS, split=split))
        export.export_onnx(cfg.models[m], 17, f(paths.EXPORT))
        simplify.simplify(f(paths.EXPORT), f(paths.SIMPLIFIED), f(paths.SIMPLIFY_RECORD))
        surgery.run_passes(f(paths.SIMPLIFIED), f(paths.SURGERY), f(paths.SURGERY_RECORD), list(cfg.models[m].surgery))
        for p in ("fp32", "fp16", "int8"):
            calib = {"calib_npz": f(paths.INPUTS, split="calib"), "calib_list": f(paths.CALIB_LIST, precision=p)}
            precision.variant_for_rule(cfg, m, p, f(paths.SURGERY), f(paths.VARIANT, precision=p),
                                       f(paths.VARIANT_RECORD, precision=p), **(calib if p == "int8" else {}))
        reference.make_reference(cfg, m, f(paths.SURGERY), f(paths.INPUTS, split="val"), ann["val"],
                                 f(paths.REFERENCE), f(paths.REFERENCE_RECORD))


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("repro")
    random_checkpoints(base / "y.pt", base / "r.pt")
    runs = []
    for seed, name in ((1, "first"), (2, "second")):  # at the same time: two cores, half the wait
        results = base / name / "results"  # two folders: an absolute path in an artifact would differ
        code = ("from tests.test_reproducible import run_stages; "
                f"run_stages({str(results)!r}, {str(base / 'y.pt')!r}, {str(base / 'r.pt')!r})")
        env = {**os.environ, "PYTHONHASHSEED": str(seed)}
        log = open(base / f"{name}.log", "w+")  # noqa: SIM115 (read and closed below)
        runs.append((results, log, subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=log,
                                                    stderr=subprocess.STDOUT)))
    for _, log, proc in runs:
        try:
            proc.wait(timeout=900)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.seek(0)
        text = log.read()
        log.close()
        assert proc.returncode == 0, text[-5000:]
    return runs[0][0], runs[1][0]


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("stage", ONNX_FILES)
def test_onnx_stage_is_byte_identical(two_runs, model, stage):
    a, b = (r / f"onnx/{model}/opset17/{stage}.onnx" for r in two_runs)
    assert sha256(a) == sha256(b), f"{stage}.onnx of {model} differs between two runs"


@pytest.mark.parametrize("model", MODELS)
def test_calibration_inputs_and_reference_are_identical(two_runs, model):
    a, b = two_runs
    for rel in (f"inputs/{model}/calib.npz", f"inputs/{model}/val.npz", f"onnx/{model}/opset17/int8.calib.txt",
                f"reference/{model}/opset17/outputs.npz"):
        assert sha256(a / rel) == sha256(b / rel), rel
    # int8 calibrated on the 8 images the list names, in that order.
    assert len((a / f"onnx/{model}/opset17/int8.calib.txt").read_text().split()) == 8
    # np.savez leaves zip entries at the fixed 1980 date (no clock in the bytes); the lock hashes the
    # arrays anyway, so another NumPy's zip metadata would not read as a different artifact.
    with zipfile.ZipFile(a / f"reference/{model}/opset17/outputs.npz") as z:
        assert {i.date_time for i in z.infolist()} == {(1980, 1, 1, 0, 0, 0)}


def test_lock_of_one_run_verifies_the_other(two_runs, tmp_path):
    a, b = two_runs
    written = lock.write_lock(a, tmp_path / "kiln.lock")
    assert read_json(tmp_path / "kiln.lock") == written
    arts = written["artifacts"]
    for m in MODELS:
        for stage in ONNX_FILES:
            entry = arts[f"onnx/{m}/opset17/{stage}.onnx"]
            assert entry["sha256"] == sha256(a / f"onnx/{m}/opset17/{stage}.onnx") and entry["compare"] == "onnx"
            assert len(entry["structure_sha256"]) == 64 and entry["weights"]["values"] > 0
        assert arts[f"reference/{m}/opset17/outputs.npz"]["compare"] == "arrays"
        assert arts[f"inputs/{m}/val.npz"]["compare"] == "bytes"
        assert f"onnx/{m}/opset17/int8.calib.txt" in arts
    assert arts["data/demo/val/images/"]["files"] == 16
    assert all(k.endswith("/annotations.json") for k in arts if k.endswith(".json"))  # no timed records
    assert lock.check(b, tmp_path / "kiln.lock") == ([], [])  # byte-identical: nothing needed the tolerance


def test_reference_outputs_on_another_summation_order_are_within_tolerance(two_runs, tmp_path):
    """ONNX Runtime's fusions (ORT_ENABLE_ALL against no optimization) change the order of float sums, as
    another CPU's kernels do: the bytes differ, the lock's 'arrays' comparison accepts them, and a real
    change of the outputs it refuses."""
    import numpy as np

    from kiln import batches
    from kiln.backends.onnxruntime import OrtRunner
    from kiln.config import load

    a, _ = two_runs
    spec = load(tiny_config(), check_paths=False).models["yolo_demo"]
    feeds = batches.load(a / "inputs/yolo_demo/val.npz").feeds(spec, 0, 8)
    outs = {}
    for optimize in (True, False):
        runner = OrtRunner(a / "onnx/yolo_demo/opset17/surgery.onnx", providers=["CPUExecutionProvider"], threads=1,
                           optimize=optimize)
        outs[optimize] = runner.infer(feeds)
    np.savez(tmp_path / "all.npz", **outs[True])
    np.savez(tmp_path / "none.npz", **outs[False])
    want, have = lock.arrays_digest(tmp_path / "all.npz"), lock.arrays_digest(tmp_path / "none.npz")
    if lock.arrays_sha256(tmp_path / "all.npz") == lock.arrays_sha256(tmp_path / "none.npz"):
        pytest.skip("this onnxruntime gives the same bytes with and without its fusions: no order to contrast")
    assert lock._arrays_differ(want, have) is None
    worse = {k: (v * (1 + 1e-2 * np.sign(np.sin(np.arange(v.size))).reshape(v.shape))).astype(v.dtype)
             for k, v in outs[True].items()}
    np.savez(tmp_path / "worse.npz", **worse)
    assert "values differ by" in lock._arrays_differ(want, lock.arrays_digest(tmp_path / "worse.npz"))


def test_npz_digest_is_of_arrays_not_zip_container(tmp_path):
    import numpy as np

    arrays = {"b": np.arange(6, dtype=np.float32).reshape(2, 3), "a": np.array([1, 2], dtype=np.int64)}
    np.savez(tmp_path / "x.npz", **arrays)
    np.savez_compressed(tmp_path / "y.npz", **dict(reversed(arrays.items())))  # other container bytes
    assert sha256(tmp_path / "x.npz") != sha256(tmp_path / "y.npz")
    assert lock.arrays_sha256(tmp_path / "x.npz") == lock.arrays_sha256(tmp_path / "y.npz")
    np.savez(tmp_path / "z.npz", a=arrays["a"], b=arrays["b"].astype(np.float64))  # same values, other dtype
    assert lock.arrays_sha256(tmp_path / "z.npz") != lock.arrays_sha256(tmp_path / "x.npz")


def _fake_results(root: Path) -> Path:
    """A small results folder with one artifact of every kind the lock knows."""
    import numpy as np

    r = root / "results"
    (r / "data/demo/val/images").mkdir(parents=True)
    (r / "data/demo/val/images/0.png").write_bytes(b"png0")
    write_json(r / "data/demo/val/annotations.json", {"images": []})
    (r / "inputs/m").mkdir(parents=True)
    np.savez(r / "inputs/m/val.npz", images=np.zeros((2, 3), np.uint8))
    (r / "onnx/m/opset17").mkdir(parents=True)
    for stage in ("export", "surgery", "int8"):
        (r / f"onnx/m/opset17/{stage}.onnx").write_bytes(stage.encode())
    write_json(r / "onnx/m/opset17/int8.json", {"wall_s": 1.0})  # a record: not locked
    (r / "onnx/m/opset17/int8.calib.txt").write_text("a.png\nb.png\n")
    for dev, backend, extra in (("cpu", "onnxruntime", {"ops_out": {"Conv": 3}}), ("rtx", "tensorrt-rtx", {})):
        folder = r / f"engines/{dev}/m/int8"
        folder.mkdir(parents=True)
        write_json(folder / "engine.json", {"device": dev, "backend": backend, "backend_version": "1.0",
                                            "status": "built", "onnx_sha256": "ab", "build_seconds": 3.2,
                                            "engine_sha256": "plan-bytes-differ-every-build", **extra})
        if backend != "onnxruntime":
            write_json(folder / "layers.json", {"source": "network", "num_layers": 2, "layers": [1, 2]})
    return r


def test_compare_names_every_difference(tmp_path):
    import numpy as np

    r = _fake_results(tmp_path)
    lock.write_lock(r, tmp_path / "kiln.lock")
    assert lock.compare(r, tmp_path / "kiln.lock") == []
    # Timings, plan bytes and records are not part of the lock: changing them is no difference.
    rec = read_json(r / "engines/rtx/m/int8/engine.json")
    write_json(r / "engines/rtx/m/int8/engine.json", {**rec, "build_seconds": 9.9, "engine_sha256": "other"})
    write_json(r / "onnx/m/opset17/int8.json", {"wall_s": 2.0})
    assert lock.compare(r, tmp_path / "kiln.lock") == []

    (r / "onnx/m/opset17/int8.onnx").write_bytes(b"changed")
    (r / "onnx/m/opset17/export.onnx").unlink()
    (r / "onnx/m/opset17/fp16.onnx").write_bytes(b"new")
    (r / "data/demo/val/images/0.png").write_bytes(b"other pixels")
    np.savez(r / "inputs/m/val.npz", images=np.ones((2, 3), np.uint8))
    write_json(r / "engines/rtx/m/int8/layers.json", {"source": "network", "num_layers": 3, "layers": [1, 2, 3]})
    write_json(r / "engines/cpu/m/int8/engine.json", {**read_json(r / "engines/cpu/m/int8/engine.json"),
                                                      "backend_version": "2.0", "ops_out": {"Conv": 2}})
    diffs = lock.compare(r, tmp_path / "kiln.lock")
    text = "\n".join(diffs)
    assert "onnx/m/opset17/export.onnx: missing (the lock has it)" in diffs
    assert "onnx/m/opset17/fp16.onnx: not in the lock" in diffs
    assert any(d.startswith("onnx/m/opset17/int8.onnx: sha256 is ") for d in diffs)
    assert any(d.startswith("data/demo/val/images/: tree_sha256 is ") for d in diffs)
    assert any(d.startswith("inputs/m/val.npz: arrays_sha256 is ") for d in diffs)
    assert "engines/rtx/m/int8/: num_layers is 3, the lock has 2" in diffs
    assert any(d.startswith("engines/rtx/m/int8/: layers_sha256 is ") for d in diffs)
    assert "engines/cpu/m/int8/: backend_version is '2.0', the lock has '1.0'" in diffs
    assert any(d.startswith("engines/cpu/m/int8/: ops_sha256 is ") for d in diffs)
    assert len(diffs) == 9, text


def test_cli_lock_and_verify(tmp_path, capsys):
    from kiln.cli import main

    r = _fake_results(tmp_path)
    out = tmp_path / "kiln.lock"
    assert main(["lock", "--results", str(r), "--out", str(out)]) == 0
    assert main(["verify", "--results", str(r), "--lock", str(out)]) == 0
    assert "all 9 artifacts" in capsys.readouterr().out
    (r / "onnx/m/opset17/surgery.onnx").write_bytes(b"x")
    assert main(["verify", "--results", str(r), "--lock", str(out)]) == 1
    captured = capsys.readouterr()
    assert "DIFF onnx/m/opset17/surgery.onnx: sha256 is" in captured.out
    assert "1 difference(s)" in captured.err
    shutil.rmtree(r)
    assert main(["lock", "--results", str(r), "--out", str(tmp_path / "other.lock")]) == 2  # nothing to lock
    (tmp_path / "bad.lock").write_text("{}")
    assert main(["verify", "--results", str(tmp_path), "--lock", str(tmp_path / "bad.lock")]) == 2
    assert "not a Kiln lock file" in capsys.readouterr().err


# ------------------------------------------------------------------ export bytes across CPU float paths

# Two hosts' worth of float paths on one machine: ATen's avx2 kernels, MKL restricted to AVX2 (the code path
# it takes on AMD CPUs) and oneDNN to AVX2, with 2 threads; against this CPU's native paths with 1 thread.
CONDITIONS = {
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "OMP_NUM_THREADS": "2"},
    "native": {"OMP_NUM_THREADS": "1"},
}


def _exports(base: Path, pinned: bool) -> dict[str, dict[str, str]]:
    """sha256 of both demo models' export at opset 17, per condition, each in a fresh process."""
    fn = "export_onnx" if pinned else "_export"  # _export: the same export without kiln.numerics
    procs = {}
    for name, env in CONDITIONS.items():
        out = base / f"{name}-{fn}"
        code = (
            "import sys; from kiln import export; from kiln.config import load; from tests.conftest import tiny_config;"
            f"cfg = load(tiny_config({str(REPO / 'models/demo_yolo.pt')!r}, {str(REPO / 'models/demo_rtdetr.pt')!r}),"
            " check_paths=False);"
            f"[getattr(export, {fn!r})(cfg.models[m], 17, f'{out}/{{m}}.onnx') for m in {MODELS!r}]"
        )
        clean = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR", *env)}
        procs[name] = (out, subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env={**clean, **env},
                                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    got = {}
    for name, (out, proc) in procs.items():
        text = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, text[-3000:]
        got[name] = {m: sha256(out / f"{m}.onnx") for m in MODELS}
    return got


def test_export_bytes_do_not_depend_on_cpu_float_paths(tmp_path):
    got = _exports(tmp_path, pinned=True)
    assert got["avx2"] == got["native"], got


def test_unpinned_export_depends_on_cpu_float_paths(tmp_path):
    """The control: without kiln.numerics the same two conditions give other bytes, so the test above can fail."""
    import torch

    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        pytest.skip("this CPU has no AVX-512: its native float paths are the avx2 condition's, nothing to contrast")
    got = _exports(tmp_path, pinned=False)
    assert got["avx2"] != got["native"], got


def _qdq_onnx(path: Path, w_scale: float = 1.0, weight_noise: float = 0.0, extra_node: bool = False) -> None:
    """A small Q/DQ Conv graph, its weights and Q/DQ scale set by the arguments."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((8, 4, 3, 3)).astype(np.float32)
    w = w * (1 + weight_noise * np.random.default_rng(1).standard_normal(w.shape)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(0.02 * w_scale, np.float32), "s"),
             numpy_helper.from_array(np.array(0, np.int8), "z")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"]),
             helper.make_node("Conv", ["dq", "w"], ["y" if not extra_node else "c"])]
    if extra_node:
        nodes.append(helper.make_node("Relu", ["c"], ["y"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), str(path))


@pytest.mark.parametrize(("change", "verdict"), [
    ({"weight_noise": 1e-7}, "tolerance"),   # an ulp or two: another CPU's folding
    ({"w_scale": 1.0005}, "tolerance"),      # a Q/DQ scale 0.05 % off: calibration statistics on other kernels
    ({"weight_noise": 1e-3}, "weights: values differ by"),
    ({"w_scale": 1.1}, "scales: values differ by"),
    ({"extra_node": True}, "the graph differs"),
])
def test_onnx_within_tolerance_or_not(tmp_path, change, verdict):
    r = _fake_results(tmp_path)
    onnx_file = r / "onnx/m/opset17/int8.onnx"
    _qdq_onnx(onnx_file)
    rec = r / "engines/cpu/m/int8/engine.json"
    write_json(rec, {**read_json(rec), "onnx_sha256": sha256(onnx_file)})
    lock.write_lock(r, tmp_path / "kiln.lock")
    assert lock.read_lock(tmp_path / "kiln.lock")["artifacts"]["onnx/m/opset17/int8.onnx"]["compare"] == "onnx"
    _qdq_onnx(onnx_file, **change)
    write_json(rec, {**read_json(rec), "onnx_sha256": sha256(onnx_file)})
    diffs, tolerated = lock.check(r, tmp_path / "kiln.lock")
    if verdict == "tolerance":
        assert diffs == []
        assert tolerated == ["onnx/m/opset17/int8.onnx: same graph, values within tolerance (bytes differ)",
                             "engines/cpu/m/int8/: built from onnx/m/opset17/int8.onnx, which matches within tolerance"]
    else:
        assert any(d.startswith("onnx/m/opset17/int8.onnx: ") and verdict in d for d in diffs), diffs
        # An engine built from an ONNX that really differs is a difference too, not explained away.
        assert any(d.startswith("engines/cpu/m/int8/: onnx_sha256 is ") for d in diffs), diffs


def test_verify_reports_the_environment_first(tmp_path, capsys):
    from kiln.cli import main

    r = _fake_results(tmp_path)
    out = tmp_path / "kiln.lock"
    shutil.copy(REPO / "requirements.lock", tmp_path / "requirements.lock")
    assert main(["lock", "--results", str(r), "--out", str(out)]) == 0
    capsys.readouterr()
    data = read_json(out)
    data["environment"]["packages"]["onnxruntime"] = "1.0.0"
    data["environment"]["cpu"] = "Another CPU"
    write_json(out, data)
    (tmp_path / "requirements.lock").write_text((tmp_path / "requirements.lock").read_text().replace(
        "\nnumpy==", "\nnumpy==0.0.0\n#"))
    assert main(["verify", "--results", str(r), "--lock", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "environment: 1 installed package(s) differ from requirements.lock:"
    assert lines[1].startswith("  numpy: ") and lines[1].endswith("installed, the lock has 0.0.0")
    assert lines[2] == "environment: this host differs from the host that wrote kiln.lock:"
    assert "  cpu: " in lines[3] and lines[3].endswith(", Another CPU in the lock")
    assert lines[4].startswith("  onnxruntime: ") and lines[4].endswith("here, 1.0.0 in the lock")
