"""A four-method micro study (full, head, LoRA, DoRA) through every stage up to the report,
and the report in headless Chromium: every table that lists methods lists all four, every
figure is embedded and loads, and every drawn figure's legend names all four methods (read
from ``report/figures/legends.json``, which the report writes from the matplotlib legends).

The serving benchmark is left out: it takes most of the wall time of a micro study and has
its own tests; the other stages run as ``loralens run`` runs them.
"""

from __future__ import annotations

import html
import json
import os
import re
import subprocess
import sys
from pathlib import Path


from tests.helpers.browser import CSP, chromium

METHODS = ("full", "head", "lora", "dora")
LABELS = ("full FT", "head only", "LoRA", "DoRA")
STAGES = "sanity,search,train,extract,drift,weights,report"
SETTINGS = ["--preset", "micro", "tasks=[rte]", f"methods=[{','.join(METHODS)}]",
            "sanity.epochs=3", "search.trials=1"]
# tables with a row (or column) per method in a study without the serving benchmark
METHOD_TABLES = {"table-throughput", "table-sanity", "table-2-spaces", "table-2-search",
                 "table-3-accuracy", "table-3b-fit", "table-4-drift", "table-4b-outliers",
                 "table-7-weights", "table-7b-intruders", "table-8-forgetting"}
FIGURES = {"Figure 1", "Figure 2", "Figure 3", "Figure 5", "Figure 7", "Figure 8"}
PROBE = """<pre id="loralens-probe"></pre><script>
window.addEventListener("load", function () {
  function text(c) { return c.textContent.trim(); }
  var tables = Array.prototype.map.call(document.querySelectorAll("table"), function (t) {
    return {id: t.id, head: Array.prototype.map.call(t.querySelectorAll("thead th"), text),
            rows: Array.prototype.map.call(t.querySelectorAll("tbody tr"), function (r) {
              return Array.prototype.map.call(r.cells, text); })};
  });
  var images = Array.prototype.map.call(document.images, function (im) {
    return {alt: im.alt, ok: im.complete && im.naturalWidth > 0};
  });
  document.getElementById("loralens-probe").textContent = JSON.stringify({
    tables: tables, images: images,
    resources: performance.getEntriesByType("resource").length});
});
</script>"""


def _probe(report: Path, tmp: Path) -> dict:
    page = tmp / "probe.html"
    page.write_text(report.read_text().replace("<head>", "<head>" + CSP, 1)
                    .replace("</body>", PROBE + "</body>", 1))
    dom = chromium(["--virtual-time-budget=10000", "--dump-dom", page.as_uri()], tmp)
    m = re.search(r'<pre id="loralens-probe">(.*?)</pre>', dom, re.S)
    assert m and m.group(1), f"the probe did not run; DOM starts: {dom[:500]}"
    return json.loads(html.unescape(m.group(1)))


def _methods_named(table: dict) -> set[str]:
    """The method labels a table names: its Method/Model column, else its header."""
    for col in ("Method", "Model"):
        if col in table["head"]:
            i = table["head"].index(col)
            return {r[i] for r in table["rows"] if len(r) > i}
    return set(table["head"])


def test_four_method_study_report_in_chromium(tmp_path, glue_dir):
    run_dir = tmp_path / "run"
    exe = os.path.join(os.path.dirname(sys.executable), "loralens")
    out = subprocess.run([exe, "run", "--stages", STAGES, "--run-dir", str(run_dir),
                          "--glue-dir", str(glue_dir), "--no-progress", *SETTINGS],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    seen = _probe(run_dir / "report" / "report.html", tmp_path)
    assert seen["resources"] == 0  # nothing fetched: figures are embedded
    tables = {t["id"]: t for t in seen["tables"]}
    assert METHOD_TABLES <= set(tables), sorted(METHOD_TABLES - set(tables))
    for tid in METHOD_TABLES:
        assert set(LABELS) <= _methods_named(tables[tid]), (tid, _methods_named(tables[tid]))
    # no table names a method without naming them all
    for tid, t in tables.items():
        named = _methods_named(t) & set(LABELS)
        assert not named or named == set(LABELS), (tid, named)
    alts = {im["alt"].split(":")[0] for im in seen["images"]}
    assert FIGURES <= alts, sorted(FIGURES - alts)
    assert all(im["ok"] for im in seen["images"]), seen["images"]
    # every drawn figure's legend, as the report wrote it from the matplotlib artists
    legends = json.loads((run_dir / "report" / "figures" / "legends.json").read_text())
    assert legends["methods"] == list(METHODS)
    method_figs = [f for f in legends["figures"] if not f.startswith(("fig4", "fig6", "fig9"))]
    assert len(method_figs) == len(FIGURES), legends["figures"].keys()
    for fid in method_figs:
        for label in LABELS:
            assert any(x.startswith(label) for x in legends["figures"][fid]), (fid, label)
    # the head-only method's drift tests are undefined, not a p-value
    t4 = tables["table-4-drift"]
    p = t4["head"].index("p")
    heads = [r for r in t4["rows"] if r[t4["head"].index("Method")] == "head only"]
    assert heads and all(r[p] == "undefined (head only: 0 by construction)" for r in heads)
