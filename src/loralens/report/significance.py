"""What Tables 3 and 4 share about their tests: the p, corrected p, d and Significant cells
of one comparison, and the notes on its family (declared from the config:
:mod:`loralens.analysis.families`; Holm or Bonferroni, ``stats.correction``) and
bootstrap resamples.
"""

from __future__ import annotations

from typing import Any

from loralens.report.formatting import DASH, d_, finite, pval, yesno
from loralens.report.run_data import RunData

ZERO_SPREAD = "undefined (zero spread)"
NOT_TESTED = "not tested"


def resolved_correction(d: RunData) -> str:
    """The family-wise correction of this run (``"holm"`` or ``"bonferroni"``), resolved
    once for every table: config.yaml's ``stats.correction`` as the report rebuilds the
    config (:attr:`RunData.protocol`, which the differences table also reads); a
    config.yaml written before the key existed resolves to the correction its stored
    tests were made with (:func:`run_data.stored_correction`), else today's default, which
    the stages apply to such a config. Without a config.yaml the current default."""
    pr = d.protocol
    if pr is not None and pr.correction:
        return pr.correction
    from loralens.core.config import StatsConfig

    return StatsConfig().correction


def correction_name(d: RunData) -> str:
    """The family correction of the run ("Holm" or "Bonferroni"): :func:`resolved_correction`."""
    return "Holm" if resolved_correction(d) == "holm" else "Bonferroni"


def corrected_cell(c: dict) -> str:
    """The family-wise corrected p of one comparison: Holm's adjusted p labelled "(Holm)",
    Bonferroni's as it is (a file written before the correction was a choice: its
    ``p_bonferroni``)."""
    if "p_adjusted" not in c:
        return pval(c.get("p_bonferroni"))
    text = pval(c.get("p_adjusted"))
    return f"{text} (Holm)" if c.get("correction") == "holm" and text != DASH else text


def p_cells(c: dict) -> list[str]:
    """p, corrected p, d and Significant of one comparison: "undefined (zero spread)" where
    every paired difference is the same (never significant; the test stays in its family),
    "not tested" for a descriptive row or a contrast true by construction."""
    if c.get("zero_spread"):
        return [ZERO_SPREAD, DASH, DASH, "no (p undefined)"]
    if c.get("tested") is False:
        return [NOT_TESTED, DASH, d_(c.get("cohens_d")), DASH]
    return [pval(c.get("p")), corrected_cell(c), d_(c.get("cohens_d")),
            yesno(c.get("significant"))]


def declared_family(src: dict | None, name: str, d: RunData) -> dict | None:
    """A test family as the drift stage stored it; without a stored file (Table 3 computed
    for the report), the one it was corrected with here (:func:`report_families`), the
    one the drift stage will use."""
    fam = ((src or {}).get("families") or {}).get(name)
    if fam or src is not None or not d.tasks or name not in ("table3", "examples"):
        return fam
    return report_families(d).get(name)


def report_families(d: RunData, tasks: list[str] | None = None) -> dict:
    """The drift stage's families of Table 3 and the example-level tests, declared from the
    run's config (configured tasks and seeds) with its resolved correction
    (:func:`resolved_correction`): what the report corrects Table 3 with when the drift
    stage has not written drift/table3.json yet."""
    if "families" not in d.cache:
        from loralens.analysis.drift.stats import families

        d.cache["families"] = families(d.tasks or list(tasks or []), d.seeds, None, 0.05,
                                       resolved_correction(d))
    return d.cache["families"]


def family_note(fam: dict | None, what: str, fallback_n: Any = None) -> str:
    if not fam:
        return (f"Family not recorded (the stored file predates it): p (Bonf.) = p × "
                f"{fallback_n if fallback_n is not None else '?'}; rerun `loralens drift`.")
    members = fam.get("members") or []
    tests = "test" if fam["size"] == 1 else "tests"
    m, alpha = fam["size"], fam.get("alpha", 0.05)
    if fam.get("one_per_measure"):
        what = f"one family per measure, each of {m} {tests}: {fam.get('description') or what}"
    else:
        what = f"{m} {tests}, {what}"
    undefined = (" A test undefined by zero spread stays in its family (counted in m) and is "
                 "shown undefined.")
    if fam.get("correction") == "holm":
        return (f"Holm family (declared from the config before any number is computed): "
                f"{what} ({', '.join(members)}); p (Holm) = Holm's step-down adjusted p (the "
                f"i-th smallest of the m = {m} p-values × (m − i + 1), made monotone, capped "
                f"at 1; the family-wise error rate of Bonferroni, never less power), "
                f"significant when p (Holm) < {alpha}." + undefined)
    return (f"Bonferroni family: {what} ({', '.join(members)}); "
            f"p (Bonf.) = min(1, p × {m}), significant when p (Bonf.) < {alpha}."
            + (undefined if "correction" in fam else ""))


def resamples_note(entries: list[dict], where: str) -> str:
    """How many distinct resamples the seeds allow (computed from their number)."""
    from math import comb

    ns = sorted({int(c.get("n_seeds")) for c in entries
                 if finite(c.get("n_seeds")) and c.get("n_seeds") >= 2})
    if not ns:
        return ""
    parts = [f"{n} seeds allow only {comb(2 * n - 1, n)} distinct resamples" for n in ns]
    return (f"{where}: percentile bootstrap over seed pairs; " + "; ".join(parts)
            + ", whatever the number drawn, so each interval end is one of those values.")
