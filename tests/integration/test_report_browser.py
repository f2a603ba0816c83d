"""The HTML report in a real browser: headless Chromium (Debian's ``chromium`` package).

A copy of report.html gets a strict Content-Security-Policy (nothing but inline CSS,
inline script and data: images may load) and a small script that, after the load
event, writes the state of every image and the id of every table into the DOM;
``--dump-dom`` prints the DOM. A figure that is not embedded, or any request to the
network or the file system, therefore shows up as an image that did not load.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path


from loralens.core.run_dir import RunDir
from tests.helpers.report_run import TASKS, SEEDS, synthetic_run, write_metrics

from tests.helpers.browser import CSP, chromium

PROBE = """<pre id="loralens-probe"></pre><script>
window.addEventListener("load", function () {
  var images = Array.prototype.map.call(document.images, function (im) {
    return {alt: im.alt, complete: im.complete, width: im.naturalWidth,
            height: im.naturalHeight, data: im.src.slice(0, 22) === "data:image/png;base64,"};
  });
  var tables = Array.prototype.map.call(document.querySelectorAll("table"), function (t) {
    return {id: t.id, rows: t.tBodies.length ? t.tBodies[0].rows.length : 0,
            caption: t.caption ? t.caption.textContent : ""};
  });
  var resources = performance.getEntriesByType("resource").map(function (r) { return r.name; });
  document.getElementById("loralens-probe").textContent = JSON.stringify({
    images: images, tables: tables, resources: resources,
    missing: document.querySelectorAll("p.missing").length, title: document.title});
});
</script>"""

FULL_TABLES = {"table-status", "table-provenance", "table-timings", "table-throughput",
               "table-sanity", "table-1-data", "table-2-spaces", "table-2-search",
               "table-3-accuracy", "table-4-drift", "table-5-serving", "table-5-multi",
               "table-6-loadtest"}


def probe(report: Path, tmp: Path) -> dict:
    """Load a copy of ``report`` with the CSP and the probe; return what the probe saw."""
    page = tmp / "probe.html"
    text = report.read_text()
    page.write_text(text.replace("<head>", "<head>" + CSP, 1).replace("</body>",
                                                                      PROBE + "</body>", 1))
    dom = chromium(["--virtual-time-budget=10000", "--dump-dom", page.as_uri()], tmp)
    m = re.search(r'<pre id="loralens-probe">(.*?)</pre>', dom, re.S)
    assert m and m.group(1), f"the probe did not run; DOM starts: {dom[:500]}"
    return json.loads(html.unescape(m.group(1)))


def test_full_report_in_chromium(tmp_path):
    from loralens.report import build_report

    report = build_report(synthetic_run(tmp_path / "run"))
    seen = probe(report, tmp_path)
    assert seen["resources"] == []  # nothing fetched: figures are embedded
    assert sorted(im["alt"].split(":")[0] for im in seen["images"]) == [
        f"Figure {i}" for i in range(1, 10)]
    for im in seen["images"]:
        assert im["complete"] and im["width"] > 0 and im["height"] > 0 and im["data"], im
    tables = {t["id"]: t for t in seen["tables"]}
    assert FULL_TABLES <= set(tables)
    for tid in FULL_TABLES:
        assert tables[tid]["rows"] > 0 and tables[tid]["caption"], tid
    # the study metric per task: accuracy for SST-2 and RTE (F1 only where it is MRPC's)
    assert tables["table-3-accuracy"]["rows"] == len(TASKS)
    # three tested measures and two descriptive standardised-CKA rows per task
    assert tables["table-4-drift"]["rows"] == 5 * len(TASKS)
    assert tables["table-5-serving"]["rows"] == 4 * len(TASKS)       # four strategies
    assert tables["table-6-loadtest"]["rows"] == 27                  # 3 servers x 3 x 3 cells
    # one: Table 3c, because the synthetic accuracies (e.g. 0.81 of 40 rows) are off the
    # 1/n grid, so no val_logits.npy can match them (tests/helpers/report_run.py builds one)
    assert seen["missing"] == 1

    shot = tmp_path / "report.png"
    chromium(["--window-size=1400,3000", f"--screenshot={shot}", report.as_uri()], tmp_path)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 50_000


def test_partial_report_in_chromium(tmp_path):
    """One finished job: no figure, the tables that exist, and what is missing."""
    from loralens.study.config import load_config
    from loralens.report import build_report

    run = RunDir(tmp_path / "run")
    run.bind_config(load_config(overrides={"tasks": list(TASKS), "seeds": list(SEEDS)}))
    write_metrics(run, "sst2", "full", 42, 0.75)
    seen = probe(build_report(run), tmp_path)
    assert seen["images"] == [] and seen["resources"] == []
    ids = {t["id"] for t in seen["tables"]}
    assert {"table-status", "table-provenance", "table-1-data", "table-3-accuracy"} <= ids
    assert "table-4-drift" not in ids and "table-5-serving" not in ids
    assert seen["missing"] >= 5  # status summary, sanity, search, drift, serving, figures
