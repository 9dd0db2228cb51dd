"""Open report.html in headless Chromium: no console errors, every <img> decoded.

How: a copy of the page gets a probe <script> as the first child of <head>
that records console.error calls, uncaught errors (window.onerror) and failed
resource loads (capture-phase "error" events), and on "load" writes those
plus each image's naturalWidth into a <pre> element.  ``chromium --dump-dom``
prints the DOM after load, so the probe's JSON can be read from stdout.
Chromium's own log (``--enable-logging=stderr``) is checked too: a
script-free report must produce no CONSOLE lines at all.

Skips only when no Chromium is found and $CI is unset/empty; under CI a
missing browser fails.  Set BRAINENC_CHROMIUM to point at a specific binary.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from brainenc.reports import build_report
from brainenc.reports.demo import write_demo_runs

pytestmark = pytest.mark.browser

PROBE = """<script id="brainenc-probe-script">
(function () {
  var errors = [];
  var origError = console.error;
  console.error = function () {
    errors.push("console.error: " + Array.prototype.map.call(arguments, String).join(" "));
    return origError.apply(console, arguments);
  };
  window.onerror = function (msg, src, line) { errors.push("onerror: " + msg + " @" + line); };
  window.addEventListener("error", function (e) {
    var t = e.target;
    if (t && t !== window && t.tagName) {
      errors.push("resource failed: <" + t.tagName.toLowerCase() + "> " + String(t.src || t.href || "").slice(-60));
    }
  }, true);
  window.addEventListener("load", function () {
    var imgs = Array.prototype.map.call(document.images, function (im) {
      return {alt: im.alt, complete: im.complete, naturalWidth: im.naturalWidth, naturalHeight: im.naturalHeight};
    });
    var pre = document.createElement("pre");
    pre.id = "brainenc-probe";
    pre.textContent = JSON.stringify({errors: errors, images: imgs});
    document.body.appendChild(pre);
  });
})();
</script>"""

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--enable-logging=stderr", "--v=0",
                  "--virtual-time-budget=10000"]


def find_chromium() -> str | None:
    env = os.environ.get("BRAINENC_CHROMIUM")
    if env:
        return env
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


@pytest.fixture(scope="module")
def chromium() -> str:
    path = find_chromium()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("CI is set but no Chromium was found (looked for $BRAINENC_CHROMIUM, "
                        "'chromium'/'chromium-browser' on PATH and /usr/bin/chromium); install it, "
                        "e.g. apt-get install -y chromium")
        pytest.skip("no Chromium found and CI is not set")
    return path


def probe_page(chromium: str, html: Path, work: Path) -> tuple[dict, list[str]]:
    """Load a probed copy of ``html`` in headless Chromium.

    Returns
    -------
    status : {"errors": [str, ...], "images": [{"alt", "complete", "naturalWidth", ...}, ...]}
    console : Chromium log lines that report console messages (CONSOLE) from the page.
    """
    text = html.read_text(encoding="utf-8")
    probed, n = re.subn(r"<head>", "<head>" + PROBE, text, count=1)
    assert n == 1, f"{html}: no <head> to inject the probe into"
    # Next to the original so any relative reference would resolve exactly as it does there.
    copy = html.with_name(f".probe-{html.name}")
    copy.write_text(probed, encoding="utf-8")
    try:
        proc = subprocess.run(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={work / 'chromium-profile'}", "--dump-dom",
             copy.resolve().as_uri()],
            capture_output=True, text=True, timeout=180)
    finally:
        copy.unlink()
    m = re.search(r'<pre id="brainenc-probe">(.*?)</pre>', proc.stdout, re.S)
    assert m, (f"probe output missing (chromium exit {proc.returncode}); "
               f"stderr tail:\n{proc.stderr[-2000:]}")
    status = json.loads(m.group(1).replace("&quot;", '"').replace("&lt;", "<")
                        .replace("&gt;", ">").replace("&amp;", "&"))
    console = [ln for ln in proc.stderr.splitlines() if ":CONSOLE" in ln]
    return status, console


def test_probe_detects_broken_pages(chromium, tmp_path):
    """Negative control: the harness must see a failed image and a console error."""
    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><html><head><title>x</title></head><body>'
                    '<img src="missing.png" alt="missing"><script>console.error("boom")</script>'
                    "</body></html>")
    status, console = probe_page(chromium, page, tmp_path)
    assert [im["naturalWidth"] for im in status["images"]] == [0]
    assert any("boom" in e for e in status["errors"])
    assert any("missing.png" in e for e in status["errors"])
    assert any("boom" in ln for ln in console)


def test_report_renders_in_chromium(chromium, tmp_path):
    runs = write_demo_runs(tmp_path / "runs", models=("afo", "universal"), subjects=("01",),
                           datasets=("simbrain", "mnidata"), n_voxels=80)
    html = build_report(runs, tmp_path / "out", n_boot=50)
    n_img = html.read_text().count("<img ")
    n_png = len(list((tmp_path / "out" / "figures").glob("*.png")))
    assert n_img == n_png >= 8  # 2 datasets x (2 bars, hist, scatter, brain map)
    status, console = probe_page(chromium, html, tmp_path)
    assert status["errors"] == []
    assert console == []
    assert len(status["images"]) == n_img
    bad = [im for im in status["images"] if not (im["complete"] and im["naturalWidth"] > 0)]
    assert bad == []
