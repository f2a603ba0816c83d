"""The study's report: tables and figures from a run directory alone.

``build_report(run)`` reads whatever the stages have written under ``RUN_DIR`` and
writes ``RUN_DIR/report/report.md``, ``RUN_DIR/report/report.html`` (one
self-contained page: figures embedded, no network needed) and
``RUN_DIR/report/figures/*.png|svg``. A partial run gives a partial report that
says what is missing and how to produce it; it never fails for lack of results.

Modules, in the order the report is built: :mod:`.run_data` (read the run directory),
:mod:`.status` (which stages have run), the tables (cells formatted by
:mod:`.formatting`): :mod:`.provenance_tables`, :mod:`.timing_tables`,
:mod:`.data_tables`, :mod:`.accuracy_tables` and :mod:`.drift_tables` (their tests'
cells and notes in :mod:`.significance`; for a study of more methods than LoRA and full
fine-tuning, :mod:`.methods_report`), :mod:`.serving_tables`; :mod:`.figures`
(the list of figures, drawn by :mod:`.drift_figures`, :mod:`.methods_figures` and
:mod:`.serving_figures`, one colour per method from :mod:`.colors`),
:mod:`.compose` (the sections), :mod:`.render` (write Markdown and HTML).
"""

from __future__ import annotations

from pathlib import Path

from loralens.core.run_dir import RunDir
from loralens.core.files import atomic_write_text
from loralens.report.compose import compose
from loralens.report.figures import draw_all
from loralens.report.render import to_html, to_markdown
from loralens.report.run_data import load_run

__all__ = ["build_report"]


def build_report(run: RunDir | str | Path) -> Path:
    """Write the report of ``run`` (a :class:`RunDir` or its path); return the HTML path.

    Files are written atomically (figures first, the HTML last), so a reader never sees
    half a file. Raises FileNotFoundError only when the directory does not exist.
    """
    run = run if isinstance(run, RunDir) else RunDir(run)
    if not run.root.is_dir():
        raise FileNotFoundError(f"run directory {run.root} does not exist")
    data = load_run(run)
    figures, fig_missing = draw_all(data)
    blocks = compose(data, figures, fig_missing)
    atomic_write_text(run.report_md, to_markdown(blocks))
    atomic_write_text(run.report_html, to_html(blocks))
    return run.report_html
