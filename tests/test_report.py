"""Kiln's comparison page from a crafted results tree, and the Snakemake report of a real (small) run."""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

pytest.importorskip("matplotlib", reason="matplotlib is a Kiln dependency: pip install -e . installs it")

from kiln import paths  # noqa: E402
from kiln.errors import KilnError  # noqa: E402
from kiln.report import data, plots  # noqa: E402
from kiln.report.page import write_page  # noqa: E402
from kiln.util import read_json, write_json  # noqa: E402
from tests.conftest import REPO, copy_run  # noqa: E402
from tests.report_tree import (  # noqa: E402
    BUILD_FAIL,
    EXPECTED,
    H100_REASON,
    MAP_FAIL,
    PICTURE_IDS,
    RTX_BUILD_FAIL,
    RTX_REASON,
    make_results,
)


class Page(HTMLParser):
    """The parts of the page the tests look at: engine rows per model, table headers, images, links."""
    def __init__(self, text: str):
        super().__init__()
        self.rows: dict[tuple[str, str, str], dict] = {}  # (model, device, precision) -> attrs + cells
        self.headers: dict[str, list[str]] = {}  # model -> engines table headers
        self.reasons: dict[str, list[str]] = {}  # model -> items of its failures and skips list
        self.images: list[dict] = []
        self.links: list[str] = []
        self._model = self._table = self._list = None
        self._row: dict | None = None
        self._text: list[str] | None = None
        self._in = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self._model = a.get("data-model")
        elif tag == "table":
            self._table = a.get("class")
        elif tag == "tr" and self._table == "engines" and "data-device" in a:
            self._row = {"status": a["data-status"], "cells": []}
            self.rows[(self._model, a["data-device"], a["data-precision"])] = self._row
        elif tag == "ul":
            self._list = a.get("class")
        elif tag in ("td", "th") or (tag == "li" and self._list == "reasons"):
            self._text, self._in = [], tag
        elif tag == "img":
            self.images.append(a)
        elif tag == "a":
            self.links.append(a.get("href", ""))

    def handle_data(self, d):
        if self._text is not None:
            self._text.append(d)

    def handle_endtag(self, tag):
        if tag == self._in and self._text is not None:
            text = "".join(self._text).strip()
            if tag == "td" and self._row is not None and self._table == "engines":
                self._row["cells"].append(text)
            elif tag == "th" and self._table == "engines":
                self.headers.setdefault(self._model, []).append(text)
            elif tag == "li":
                self.reasons.setdefault(self._model, []).append(text)
            self._text = self._in = None
        elif tag == "tr":
            self._row = None
        elif tag == "table":
            self._table = None
        elif tag == "ul":
            self._list = None


@pytest.fixture
def tree(tmp_path):
    results = make_results(tmp_path)
    html, md = results / "report/kiln.html", results / "report/kiln.md"
    run = write_page(results, html, md)
    return results, html, md, run


def _cells(page: Page, model: str, key: tuple[str, str]) -> dict[str, str]:
    return dict(zip(page.headers[model], page.rows[(model, *key)]["cells"]))


def test_page_has_a_row_per_summary_row_with_its_status(tree):
    results, html, _, run = tree
    page = Page(html.read_text())
    assert {k: r["status"] for k, r in page.rows.items()} == EXPECTED
    assert run.total == len(EXPECTED) and run.count("passed") == 4 and run.count("not run") == 2
    summary = read_json(results / "report/summary.json")["rows"]
    assert len(page.rows) == len(summary)


def test_rows_show_the_summary_numbers(tree):
    _, html, _, _ = tree
    page = Page(html.read_text())
    yolo = _cells(page, "yolo_demo", ("cpu", "fp16"))
    assert yolo["status"] == "passed"
    assert yolo["mAP50-95"] == "0.6196" and yolo["mAP50-95 drop vs fp32"] == "+0.0004"
    assert yolo["p50 ms"] == "14.00" and yolo["p99 ms"] == "21.00" and yolo["batch"] == "1"
    assert yolo["engine size"] == "2.1 MiB" and yolo["min cosine"] == "0.999980"
    assert "detection match" not in page.headers["yolo_demo"]  # a yolo model has no detection matching
    assert _cells(page, "rtdetr_demo", ("cpu", "fp32"))["detection match"] == "0.995"
    assert _cells(page, "yolo_demo", ("cpu", "int8"))["reason"] == MAP_FAIL
    # No summary column for a PyTorch baseline here: no such column on the page.
    assert not any("PyTorch" in h for hs in page.headers.values() for h in hs)


def test_every_failure_and_skip_has_its_reason(tree):
    _, html, md, _ = tree
    page = Page(html.read_text())
    yolo, rtdetr = " ".join(page.reasons["yolo_demo"]), " ".join(page.reasons["rtdetr_demo"])
    assert MAP_FAIL in yolo and "int8: failed" in yolo
    assert f"build failed: {BUILD_FAIL}" in rtdetr
    assert f"build failed: {RTX_BUILD_FAIL}" in rtdetr
    for text in (yolo, rtdetr):
        assert f"not validated on this host: {RTX_REASON}" in text
        assert f"not run on this host: {H100_REASON}" in text
    # Engines with the same reason are one line: rtx fp32, fp16 and int8 of yolo.
    assert "rtx fp32, fp16, int8: built" in yolo
    markdown = md.read_text()
    for reason in (MAP_FAIL, BUILD_FAIL, RTX_BUILD_FAIL, RTX_REASON, H100_REASON):
        assert reason in markdown


def test_figures_are_embedded_pngs_equal_to_the_plot_files(tree):
    from PIL import Image

    results, html, _, _ = tree
    page = Page(html.read_text())
    expected = []
    for m in ("yolo_demo", "rtdetr_demo"):
        expected += [paths.fmt(paths.MODEL_PLOT, results=results, model=m, plot=p)
                     for p in ("accuracy_latency", "build_time")]
        expected += [paths.fmt(paths.DEVICE_PLOT, results=results, model=m, device="cpu", plot=p)
                     for p in ("latency", "throughput")]
        expected += [paths.fmt(paths.DEVICE_PICTURE, results=results, model=m, device="cpu", plot=f"detections_{i}")
                     for i in PICTURE_IDS]
    files = {Path(p).read_bytes() for p in expected}
    assert len(page.images) == len(expected) == len(files)
    embedded = set()
    for img in page.images:
        mime, _, b64 = img["src"].partition(";base64,")
        assert mime in ("data:image/png", "data:image/jpeg") and img["alt"]
        raw = base64.b64decode(b64)
        with Image.open(io.BytesIO(raw)) as im:
            assert im.format == mime.split("/")[1].upper() and im.width >= 400 and im.height >= 250
        embedded.add(raw)
    assert embedded == files
    # Devices without latency get no latency figures, and the page says why.
    assert not Path(paths.fmt(paths.DEVICE_PLOT, results=results, model="yolo_demo", device="rtx",
                              plot="latency")).exists()
    assert "No latency or throughput figures for rtx, h100: not validated on this host" in html.read_text()


def test_detection_pictures_side_by_side_across_precisions(tree):
    from PIL import Image

    results, html, md, _ = tree
    for model, precisions in (("yolo_demo", 3), ("rtdetr_demo", 2)):  # rtdetr int8 never built: no pictures
        for i in PICTURE_IDS:
            p = Path(paths.fmt(paths.DEVICE_PICTURE, results=results, model=model, device="cpu", plot=f"detections_{i}"))
            with Image.open(p) as im:
                assert im.format == "JPEG"
                # One 256-pixel picture per precision, 8 pixels apart, under a 26-pixel label strip.
                assert im.size == (256 * precisions + 8 * (precisions - 1), 256 + 26)
                # Each precision's picture is pasted at full size: its box outline is there, in its colour
                # (the middle of its 3-pixel outline; near it: JPEG is lossy), and the background around it.
                for k in range(precisions):
                    x = k * (256 + 8)
                    assert all(abs(a - b) <= 40 for a, b in zip(im.getpixel((x + 41 + 10 * i, 26 + 110)), (255, 200, 0)))
                    assert all(abs(a - b) <= 20 for a, b in zip(im.getpixel((x + 20, 26 + 20)), (90, 110, 90)))
            assert p.relative_to(html.parent).as_posix() in html.read_text()
            assert f"(plots/devices/{model}/cpu/detections_{i}.jpg)" in md.read_text()
    assert "<h3>Detections</h3>" in html.read_text()


def test_page_is_self_contained_and_its_links_resolve(tree):
    results, html, md, _ = tree
    text = html.read_text()
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", text)
    assert "<script" not in text and "<link" not in text
    page = Page(text)
    files = [h for h in page.links if not h.startswith("#")]
    assert files, "no file links on the page"
    for href in files:
        assert not Path(href).is_absolute() and (html.parent / href).is_file(), href
    # Each cpu engine links its build log, and those it validated their validation log.
    for m in ("yolo_demo", "rtdetr_demo"):
        for p in ("fp32", "fp16", "int8"):
            assert f"../logs/build/cpu_{m}_{p}.log" in files
    assert "../logs/validate/cpu_yolo_demo_int8.log" in files
    assert "../logs/validate/cpu_rtdetr_demo_int8.log" not in files  # its build failed: never validated
    # The Markdown twin links the same logs and figures, relative to itself.
    for link in re.findall(r"\]\(([^)]+)\)", md.read_text()):
        assert (md.parent / link).is_file(), link


def test_markdown_has_the_same_rows(tree):
    _, _, md, _ = tree
    text = md.read_text()
    for (model, device, prec), status in EXPECTED.items():
        section = text.split(f"## {model}\n", 1)[1].split("\n## ", 1)[0]
        assert f"| {device} | {prec} | {status} |" in section, (model, device, prec)


def test_speedup_column_shows_when_the_summary_has_it(tree):
    results, html, md, _ = tree
    s = read_json(results / "report/summary.json")
    s["columns"].append("speedup_vs_pytorch")
    for r in s["rows"]:
        r["speedup_vs_pytorch"] = 1.5 if r["status"] == "passed" else None
    write_json(results / "report/summary.json", s)
    write_page(results, html, md)
    page = Page(html.read_text())
    assert _cells(page, "yolo_demo", ("cpu", "fp32"))["speed-up vs PyTorch"] == "1.50x"
    assert _cells(page, "yolo_demo", ("rtx", "fp32"))["speed-up vs PyTorch"] == ""


def test_build_metadata_comes_from_engine_records(tree):
    _, html, md, _ = tree
    text = html.read_text()
    assert "images 1x3x256x256 / 1x3x256x256 / 8x3x256x256<br>orig_target_sizes 1x2 / 1x2 / 8x2" in text
    assert "images 1x3x256x256 / 1x3x256x256 / 8x3x256x256; orig_target_sizes 1x2 / 1x2 / 8x2" in md.read_text()
    assert "tensorrt_rtx 1.7.1.116, polygraphy 0.53.6" in text
    assert "builder_optimization_level=1, tf32=True, int8_mode=qdq" in text
    assert "| rtx | fp32 | built | tensorrt_rtx 1.7.1.116" in md.read_text()


def test_missing_summary_is_one_clear_error(tmp_path):
    with pytest.raises(KilnError, match=r"summary.json does not exist: run the workflow"):
        data.load(tmp_path / "results")


@pytest.mark.parametrize(
    ("points", "front"),
    [
        ([(10.0, 0.5), (5.0, 0.4), (20.0, 0.6), (12.0, 0.45)], [1, 0, 2]),  # (12, .45) is beaten by (10, .5)
        ([(5.0, 0.4), (5.0, 0.6), (8.0, 0.6)], [1]),  # same latency: the more accurate; same mAP: the faster
        ([(1.0, 0.1)], [0]),
        ([], []),
    ],
)
def test_pareto_front(points, front):
    assert plots.pareto_front(points) == front


# --------------------------------------------------------------------------- the real workflow


def _snakemake(work: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(work),
           "--configfile", str(work / "config.yaml"), "--cores", "2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


@pytest.mark.integration
def test_workflow_writes_the_page_and_snakemake_report(random_yolo_run, tmp_path):
    """A small real run (random-weight yolo checkpoint; conftest random_yolo_config): the page rule, then
    `snakemake --report` on a copy of it."""
    work = copy_run(random_yolo_run, tmp_path / "work")  # --report writes into it
    results = work / "results"
    page = Page((results / "report/kiln.html").read_text())
    statuses = {k: r["status"] for k, r in page.rows.items()}
    assert set(statuses) == {("yolo_demo", "cpu", "fp32"), ("yolo_demo", "cpu", "int8"), ("yolo_demo", "rtx", "fp16"),
                             ("yolo_demo", "h100", "fp16")}
    assert statuses[("yolo_demo", "rtx", "fp16")] == "built" and statuses[("yolo_demo", "h100", "fp16")] == "not run"
    # Random weights: both were validated, and a reference with random weights measures nothing (issue 15).
    assert statuses[("yolo_demo", "cpu", "fp32")] == "not measurable"
    assert statuses[("yolo_demo", "cpu", "int8")] == "not measurable"
    # Accuracy vs latency, build time, cpu latency, cpu throughput vs batch and vs streams, and the detection
    # pictures side by side.
    pictures = read_json(results / "validation/cpu/yolo_demo/fp32/validation.json").get("pictures") or []
    assert len(page.images) == 5 + len(pictures)
    assert (results / "logs/page/page.log").is_file()

    proc = _snakemake(work, "--report", str(results / "report/report.html"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = (results / "report/report.html").read_text()
    assert "Kiln turns PyTorch detection checkpoints" in report  # the landing page, report/workflow.rst
    categories = json.loads(re.search(r"var categories = (\{.*?\});\n", report).group(1))
    assert set(categories) == {"Summary", "yolo_demo"}
    assert sorted(categories["Summary"]["Other"]) == ["results/report/kiln.html", "results/report/summary.csv"]
    assert sorted(categories["yolo_demo"]["all devices"]) == [
        "results/report/plots/models/yolo_demo/accuracy_latency.png", "results/report/plots/models/yolo_demo/build_time.png"]
    cpu = "results/report/plots/devices/yolo_demo/cpu/"
    assert sorted(categories["yolo_demo"]["cpu"]) == sorted(
        [cpu + "latency.png", cpu + "throughput.png", cpu + "streams.png"] + [cpu + Path(p).stem + ".jpg" for p in pictures])
    assert "Pareto front" in report  # the figure captions, report/plot.rst, rendered per figure

    proc = _snakemake(work, "-n")
    assert proc.returncode == 0 and "Nothing to be done" in proc.stdout + proc.stderr
