"""Kiln's page in a real browser (headless Debian chromium over the DevTools protocol): it loads without
console errors or network requests, its tables hold the expected rows, its figures decode; a screenshot
is kept under the test's tmp dir."""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.is_file():
    pytest.skip(f"{CHROMIUM} is absent: the browser test needs Debian's chromium (apt-get install -y chromium)",
                allow_module_level=True)
websocket = pytest.importorskip("websocket", reason="websocket-client is a test extra: pip install -e '.[test]'")
pytest.importorskip("matplotlib", reason="matplotlib is a Kiln dependency: pip install -e . installs it")

from kiln.report.page import write_page  # noqa: E402
from tests.report_tree import EXPECTED, MAP_FAIL, PICTURE_IDS, make_results  # noqa: E402

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", "--window-size=1400,1000"]
TIMEOUT = 30.0  # seconds, for each wait below


class DevTools:
    """A minimal DevTools protocol client: commands by id, events kept in order."""

    def __init__(self, url: str):
        self.ws = websocket.create_connection(url, timeout=TIMEOUT, suppress_origin=True)
        self.events: list[dict] = []
        self._id = 0

    def send(self, method: str, **params) -> dict:
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]
            self.events.append(msg)
        raise TimeoutError(f"{method}: no answer in {TIMEOUT} s")

    def wait_event(self, method: str) -> dict:
        deadline = time.monotonic() + TIMEOUT
        for e in self.events:
            if e.get("method") == method:
                return e
        while time.monotonic() < deadline:
            msg = json.loads(self.ws.recv())
            self.events.append(msg)
            if msg.get("method") == method:
                return msg
        raise TimeoutError(f"no {method} in {TIMEOUT} s")

    def evaluate(self, expression: str):
        r = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"page script failed: {r['exceptionDetails']}")
        return r["result"].get("value")  # absent for undefined


@contextlib.contextmanager
def chromium(tmp_path: Path):
    """A headless chromium with a new empty profile; yields a DevTools client on its one page."""
    profile = tmp_path / "profile"
    profile.mkdir()
    stderr = (tmp_path / "chromium.log").open("w")
    proc = subprocess.Popen([str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=stderr)
    client = None
    try:
        port_file, deadline = profile / "DevToolsActivePort", time.monotonic() + TIMEOUT
        while not (port_file.is_file() and port_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"chromium did not open its DevTools port (exit {proc.poll()}); "
                            f"see {tmp_path / 'chromium.log'}")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=TIMEOUT) as r:
            pages = [t for t in json.load(r) if t["type"] == "page"]
        client = DevTools(pages[0]["webSocketDebuggerUrl"])
        yield client
    finally:
        if client:
            client.ws.close()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        stderr.close()


# What the page script reports back: rows of the engine tables, matrix cells, and each image's decoding.
PROBE = """
(async () => {
  const imgs = [...document.images];
  await Promise.all(imgs.map(i => i.decode().catch(() => null)));
  return {
    title: document.title,
    rows: [...document.querySelectorAll('section[data-model] table.engines tbody tr')].map(tr => ({
      model: tr.closest('section').dataset.model, device: tr.dataset.device, precision: tr.dataset.precision,
      status: tr.dataset.status, background: getComputedStyle(tr).backgroundColor,
      cells: [...tr.cells].map(td => td.textContent)})),
    matrixCells: document.querySelectorAll('table.matrix tbody td').length,
    images: imgs.map(i => ({alt: i.alt, complete: i.complete, width: i.naturalWidth, height: i.naturalHeight,
                            shown: i.getBoundingClientRect().width})),
    reasons: [...document.querySelectorAll('ul.reasons li')].map(li => li.textContent),
    height: document.documentElement.scrollHeight,
  };
})()
"""


def test_page_in_chromium(tmp_path):
    results = make_results(tmp_path)
    html = results / "report/kiln.html"
    write_page(results, html, results / "report/kiln.md")

    with chromium(tmp_path) as dt:
        for domain in ("Page", "Runtime", "Log", "Network"):
            dt.send(f"{domain}.enable")
        dt.send("Page.navigate", url=html.as_uri())
        dt.wait_event("Page.loadEventFired")
        got = dt.evaluate(PROBE)
        shot = dt.send("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                       clip={"x": 0, "y": 0, "width": 1400, "height": min(got["height"], 6000), "scale": 1})
        events = list(dt.events)

    import base64

    screenshot = tmp_path / "kiln-page.png"
    screenshot.write_bytes(base64.b64decode(shot["data"]))
    from PIL import Image

    with Image.open(screenshot) as im:
        assert im.width == 1400 and im.height > 1000

    errors = [e["params"] for e in events if e.get("method") == "Runtime.exceptionThrown"
              or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert"))
              or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]
    assert errors == []
    requests = [e["params"]["request"]["url"] for e in events if e.get("method") == "Network.requestWillBeSent"]
    assert requests and all(u.startswith(("file:", "data:")) for u in requests), requests
    assert html.as_uri() in requests

    assert got["title"] == "Kiln report"
    rows = {(r["model"], r["device"], r["precision"]): r for r in got["rows"]}
    assert {k: r["status"] for k, r in rows.items()} == EXPECTED
    # Pass/fail is coloured: the stylesheet gives each status its own background.
    colours = {r["status"]: r["background"] for r in got["rows"]}
    assert len(set(colours.values())) == 4 and "rgba(0, 0, 0, 0)" not in colours.values()
    assert MAP_FAIL in rows[("yolo_demo", "cpu", "int8")]["cells"]
    assert got["matrixCells"] == 2 * 3 * 3  # per model: 3 devices x 3 precisions (absent ones say so)
    assert any(MAP_FAIL in r for r in got["reasons"])
    assert len(got["images"]) == 2 * (4 + len(PICTURE_IDS))  # per model: 4 plots, one row of pictures per image
    for img in got["images"]:
        assert img["complete"] and img["width"] >= 400 and img["height"] >= 250 and img["shown"] > 0, img
