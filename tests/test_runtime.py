"""kiln.runtime and `kiln predict` on the engines of a tiny workflow run (ONNX Runtime's CPU provider, fp32 and int8).

The detections `predict` returns are the validated ones: their mAP over the validation images equals
validation.json's. Concurrent predict from two threads gives the same detections. Bad input is one line.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from kiln.errors import KilnError
from kiln.util import read_json, write_json
from tests.conftest import REPO, tiny_config, write_config

pytestmark = pytest.mark.integration

MODELS = ("yolo_demo", "rtdetr_demo")
PRECISIONS = ("fp32", "int8")
VAL = "results/data/demo/val"


@pytest.fixture(scope="module")
def run(tiny_run) -> Path:
    """The session's tiny workflow run (tests/conftest.py tiny_run; its cpu device makes fp32, fp16 and int8
    engines, the ones read here are fp32 and int8): read, never changed."""
    return tiny_run


def engine_dir(work: Path, model: str = "yolo_demo", precision: str = "int8") -> Path:
    return work / "results/engines/cpu" / model / precision


def val_images(work: Path) -> tuple[list[int], list[Path]]:
    """The validation split's image ids and files, by id (the order the inputs stage preprocesses them in)."""
    data = read_json(work / VAL / "annotations.json")
    images = sorted(data["images"], key=lambda im: im["id"])
    return [im["id"] for im in images], [work / VAL / "images" / im["file_name"] for im in images]


def coco_map_of_records(annotations: Path, records: list[dict]) -> tuple[float, float]:
    """pycocotools' mAP50-95 and mAP50 of COCO result records, as kiln.metrics.coco_map evaluates them."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(annotations))
        ev = COCOeval(gt, gt.loadRes(records), iouType="bbox")
        ev.params.imgIds = sorted(im["id"] for im in read_json(annotations)["images"])
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0]), float(ev.stats[1])


# --------------------------------------------------------------------------- the record


def test_build_records_what_the_runtime_needs(run):
    from kiln import build, coco
    from kiln.config import load_file

    cfg = load_file(run / "config.yaml", base=run)
    for model in MODELS:
        for p in PRECISIONS:
            rt = read_json(engine_dir(run, model, p) / "engine.json")["runtime"]
            spec = cfg.models[model]
            assert rt["model"] == build.runtime_model(spec)
            assert rt["model"]["input_size"] == list(spec.input_size) and rt["model"]["decode"] == spec.decode
            assert rt["model"]["output_names"] == list(spec.output_names)
            assert rt["classes"] == coco.categories(run / VAL / "annotations.json")
            assert [c["name"] for c in rt["classes"]] == ["circle", "square", "triangle"]
            assert rt["device"]["backend"] == "onnxruntime" and rt["device"]["providers"] == ["CPUExecutionProvider"]
            assert "batch_sizes" not in rt["device"] and "threads" not in rt["device"]


def test_runtime_section_follows_the_decode_config(run, tmp_path):
    """A changed threshold reruns the builds (their records carry it), not only the validations."""
    cfg = tiny_config()
    cfg["models"]["yolo_demo"]["decode"] = {"conf_threshold": 0.25}
    path = write_config(tmp_path / "edited.yaml", cfg)
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(run),
           "--configfile", str(path), "--cores", "2", "-n"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    planned = proc.stdout + proc.stderr
    for p in PRECISIONS:
        assert f"model=yolo_demo, precision={p}" in planned
    assert "model=rtdetr_demo, precision=" not in planned  # the other model's engines stay
    assert "rule build:" in planned and "rule validate:" in planned


# --------------------------------------------------------------------------- predict is validation


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_predict_map_equals_validation(run, model, precision):
    from kiln.metrics import detections_to_coco
    from kiln.runtime import Detector

    ids, files = val_images(run)
    with Detector.load(engine_dir(run, model, precision)) as det:
        dets = det.predict(files)
        cats = [c["id"] for c in det.categories]
    assert len(dets) == len(files) and sum(len(d) for d in dets) > 0
    for d, f in zip(dets, files):
        assert d.boxes.shape == (len(d), 4) and d.boxes.dtype == np.float32
        assert d.class_names == [["circle", "square", "triangle"][i] for i in d.class_ids]
        from PIL import Image

        with Image.open(f) as im:
            assert d.image_size == im.size
    got = coco_map_of_records(run / VAL / "annotations.json",
                              detections_to_coco(ids, [d.as_labels() for d in dets], cats))
    acc = read_json(run / "results/validation/cpu" / model / precision / "validation.json")["accuracy"]
    assert got[0] == pytest.approx(acc["map50_95"], abs=1e-6)
    assert got[1] == pytest.approx(acc["map50"], abs=1e-6)
    assert acc["map50"] > 0.3  # a trained model: the equality is not one of two zeros


def test_predict_takes_arrays_like_paths(run):
    from PIL import Image

    from kiln.runtime import Detector

    _, files = val_images(run)
    files = files[:5]
    arrays = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    with Detector.load(engine_dir(run)) as det:
        by_path, by_array = det.predict(files), det.predict(arrays)
        single = det.predict(arrays[0])  # one image, not a list
        assert det.max_batch == 8  # ONNX Runtime's dynamic batch: validation's default batch_size
        with pytest.raises(KilnError, match=r"^an image array must be HxWx3 uint8 RGB, not float32 \(4, 4, 3\)"):
            det.predict([np.zeros((4, 4, 3), np.float32)])
    for a, b in zip(by_path, by_array):
        np.testing.assert_array_equal(a.boxes, b.boxes)
        np.testing.assert_array_equal(a.scores, b.scores)
        np.testing.assert_array_equal(a.class_ids, b.class_ids)
    assert len(single) == 1 and len(single[0]) == len(by_array[0])


def test_two_threads_get_their_own_runner_and_the_same_detections(run):
    from kiln.runtime import Detector

    _, files = val_images(run)
    det = Detector.load(engine_dir(run), threads=1)
    want = det.predict(files)
    results: dict[int, list] = {}
    runners: dict[int, object] = {}
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            barrier.wait()
            for _ in range(2):
                results[k] = det.predict(files)
            runners[k] = det.runner()
        except BaseException as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert runners[0] is not runners[1] and runners[0].session is not runners[1].session
    assert len(det._runners) == 3  # the loading thread's and one per worker thread
    for k in range(2):
        for a, b in zip(want, results[k]):
            np.testing.assert_array_equal(a.boxes, b.boxes)
            np.testing.assert_array_equal(a.scores, b.scores)
            np.testing.assert_array_equal(a.class_ids, b.class_ids)
    det.close()
    with pytest.raises(KilnError, match="is closed: load it again"):
        det.predict(files[:1])


# --------------------------------------------------------------------------- kiln predict


def test_kiln_predict_on_the_validation_split_scores_as_validation(run, tmp_path):
    """The command of the issue's "done means", on the tiny run's engine."""
    out = tmp_path / "predictions"  # not in the shared run's folder
    cmd = [sys.executable, "-m", "kiln.cli", "predict", "results/engines/cpu/yolo_demo/int8",
           "results/data/demo/val/images", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=run, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    ids, files = val_images(run)
    for f in files:
        assert (out / f.name).is_file()
    records = read_json(out / "detections.json")
    assert set(records[0]) == {"image_id", "category_id", "bbox", "score"}
    assert {r["image_id"] for r in records} <= set(ids) and {r["category_id"] for r in records} <= {1, 2, 3}
    images = read_json(out / "images.json")
    assert sorted(im["id"] for im in images) == ids  # the split's own ids
    got = coco_map_of_records(run / VAL / "annotations.json", records)
    acc = read_json(run / "results/validation/cpu/yolo_demo/int8/validation.json")["accuracy"]
    assert got == pytest.approx((acc["map50_95"], acc["map50"]), abs=1e-6)
    assert f"] {len(files)}/{len(files)} images" in proc.stderr  # the progress bar
    assert f"kiln predict: {len(files)} images in " in proc.stderr and " images/s " in proc.stderr


def test_kiln_predict_numbers_other_images_and_annotates_video(run, tmp_path):
    import cv2
    from PIL import Image

    from kiln.cli import main
    from kiln.runtime import Detector

    _, files = val_images(run)
    clip = tmp_path / "in" / "clip.avi"
    clip.parent.mkdir()
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"MJPG"), 5.0, (256, 256))
    for f in files[:5]:
        writer.write(cv2.cvtColor(np.asarray(Image.open(f).convert("RGB")), cv2.COLOR_RGB2BGR))
    writer.release()
    shutil.copy(files[0], tmp_path / "in" / "still.png")
    out = tmp_path / "out"
    assert main(["predict", str(engine_dir(run)), str(tmp_path / "in"), "--out", str(out), "--no-progress"]) == 0
    images = read_json(out / "images.json")
    assert [im["id"] for im in images] == list(range(1, 7))  # not a split: numbered in input order
    assert [im.get("frame") for im in images] == [0, 1, 2, 3, 4, None]
    assert (out / "still.png").is_file()
    cap = cv2.VideoCapture(str(out / "clip.mp4"))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 5 and cap.read()[0]
    cap.release()
    # Each frame's detections are those of the frame as OpenCV decodes it.
    cap, frames = cv2.VideoCapture(str(clip)), []
    ok, frame = cap.read()
    while ok:
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
        ok, frame = cap.read()
    cap.release()
    with Detector.load(engine_dir(run)) as det:
        want = det.predict(frames)
    records = read_json(out / "detections.json")
    for i, d in enumerate(want, start=1):
        mine = [r for r in records if r["image_id"] == i]
        assert len(mine) == len(d)
        np.testing.assert_allclose([r["score"] for r in mine], d.scores, rtol=1e-6)


# --------------------------------------------------------------------------- bad input: one line each


def predict_cli(capsys, *args: str) -> tuple[int, str]:
    from kiln.cli import main

    rc = main(["predict", *args, "--no-progress"])
    return rc, capsys.readouterr().err


def copy_engine(run: Path, dst: Path, **edits) -> Path:
    shutil.copytree(engine_dir(run), dst)
    record = read_json(dst / "engine.json")
    for key, value in edits.items():
        if key == "device":
            record["runtime"]["device"].update(value)
        else:
            record[key] = value
    write_json(dst / "engine.json", record)
    return dst


def test_unreadable_image_is_one_line_and_skipped(run, tmp_path, capsys):
    _, files = val_images(run)
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(files[0], folder / "good.png")
    (folder / "bad.png").write_bytes(b"not a png at all")
    rc, err = predict_cli(capsys, str(engine_dir(run)), str(folder), "--out", str(tmp_path / "out"))
    assert rc == 1
    lines = err.splitlines()
    assert lines[0].startswith(f"kiln: predict: skipped: image '{folder / 'bad.png'}' cannot be read (cannot identify "
                               f"image file")
    assert lines[-1] == (f"kiln: predict: 1 input could not be read (listed above) and was skipped; the others are "
                         f"in {tmp_path / 'out'}")
    assert (tmp_path / "out/good.png").is_file() and not (tmp_path / "out/bad.png").exists()
    assert [im["file_name"] for im in read_json(tmp_path / "out/images.json")] == [str(folder / "good.png")]


def test_engine_for_another_gpu_is_refused_with_the_backends_reason(run, tmp_path, capsys):
    """A TensorRT-RTX record (device rtx, compute capability 8.9) on this CPU host: refused before its engine is read."""
    from kiln import backends
    from kiln.runtime import device_profile

    rtx = copy_engine(run, tmp_path / "rtx", backend="tensorrt-rtx",
                      device={"name": "rtx", "backend": "tensorrt-rtx", "compute_capability": "8.9", "providers": []})
    reason = backends.get("tensorrt-rtx").check_host(device_profile(read_json(rtx / "engine.json")))
    assert reason  # no GPU here
    _, files = val_images(run)
    rc, err = predict_cli(capsys, str(rtx), str(files[0]), "--out", str(tmp_path / "out"))
    assert rc == 1
    assert err == f"kiln: engine '{rtx}' is for device 'rtx' (TensorRT-RTX) and cannot run on this host: {reason}\n"
    assert not (tmp_path / "out").exists()


def test_onnxruntime_engine_without_its_provider_is_refused(run, tmp_path, capsys):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this host has ONNX Runtime's CUDA provider")
    cuda = copy_engine(run, tmp_path / "cuda", providers=["CUDAExecutionProvider"],
                       device={"name": "gpu", "providers": ["CUDAExecutionProvider"]})
    _, files = val_images(run)
    rc, err = predict_cli(capsys, str(cuda), str(files[0]), "--out", str(tmp_path / "out"))
    assert rc == 1
    assert err == (f"kiln: engine '{cuda}' is for device 'gpu' (ONNX Runtime) and cannot run on this host: ONNX "
                   f"Runtime {ort.__version__} here lacks CUDAExecutionProvider (has "
                   f"{', '.join(ort.get_available_providers())})\n")


def test_missing_or_broken_engine_folder_is_one_line(run, tmp_path, capsys):
    _, files = val_images(run)
    missing = tmp_path / "nowhere"
    rc, err = predict_cli(capsys, str(missing), str(files[0]), "--out", str(tmp_path / "out"))
    assert rc == 1
    assert err == (f"kiln: engine folder '{missing}' does not exist: pass a folder the build stage wrote "
                   f"(results/engines/DEVICE/MODEL/PRECISION, with engine.json)\n")
    # An engine changed after its build: the integrity check's line.
    changed = copy_engine(run, tmp_path / "changed")
    engine = changed / "model.engine"
    size = engine.stat().st_size
    engine.write_bytes(engine.read_bytes()[: size // 2])
    rc, err = predict_cli(capsys, str(changed), str(files[0]), "--out", str(tmp_path / "out"))
    assert rc == 1
    assert err == (f"kiln: {engine} does not match its record {changed / 'engine.json'} (it is {size // 2} bytes, the "
                   f"record says {size}): it changed after it was built. Run Snakemake again with --forcerun "
                   f"{changed / 'engine.json'} to rebuild it\n")
    # A record from before the runtime section.
    old = tmp_path / "old"
    shutil.copytree(engine_dir(run), old)
    record = read_json(old / "engine.json")
    del record["runtime"]
    write_json(old / "engine.json", record)
    rc, err = predict_cli(capsys, str(old), str(files[0]), "--out", str(tmp_path / "out"))
    assert err == (f"kiln: {old / 'engine.json'} has no 'runtime' section (an older Kiln built it): rebuild it with "
                   f"snakemake --forcerun {old / 'engine.json'}\n")
    # A missing input, and a file that is no image or video.
    rc, err = predict_cli(capsys, str(engine_dir(run)), str(tmp_path / "no.png"), "--out", str(tmp_path / "out"))
    assert rc == 1 and err == f"kiln: input '{tmp_path / 'no.png'}' does not exist: pass image files, video files or folders of them\n"
    (tmp_path / "notes.txt").write_text("hi")
    rc, err = predict_cli(capsys, str(engine_dir(run)), str(tmp_path / "notes.txt"), "--out", str(tmp_path / "out"))
    assert rc == 1 and err.startswith(f"kiln: input '{tmp_path / 'notes.txt'}' is neither an image (.jpg, ")
    assert not (tmp_path / "out").exists()


def test_unreadable_video_is_one_line(run, tmp_path, capsys):
    (tmp_path / "broken.mp4").write_bytes(b"\x00" * 100)
    rc, err = predict_cli(capsys, str(engine_dir(run)), str(tmp_path / "broken.mp4"), "--out", str(tmp_path / "out"))
    assert rc == 1
    import cv2

    assert err.splitlines()[0] == (f"kiln: predict: skipped: video '{tmp_path / 'broken.mp4'}' cannot be read "
                                   f"(OpenCV {cv2.__version__} decodes no frame of it)")
    assert json.loads((tmp_path / "out/detections.json").read_text()) == []
