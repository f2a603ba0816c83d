"""What Tables 3 and 4 share about their tests: the p, p (Bonf.), d and Significant cells
of one comparison, and the notes on its Bonferroni family and bootstrap resamples.
"""

from __future__ import annotations

from typing import Any

from loralens.report.formatting import DASH, d_, finite, pval, yesno
from loralens.report.run_data import RunData

ZERO_SPREAD = "undefined (zero spread)"
NOT_TESTED = "not tested"


def p_cells(c: dict) -> list[str]:
    """p, p (Bonf.), d and Significant of one comparison: "undefined (zero spread)" where
    every paired difference is the same (never significant), "not tested" for a
    descriptive row."""
    if c.get("zero_spread"):
        return [ZERO_SPREAD, DASH, DASH, "no (p undefined)"]
    if c.get("tested") is False:
        return [NOT_TESTED, DASH, d_(c.get("cohens_d")), DASH]
    return [pval(c.get("p")), pval(c.get("p_bonferroni")), d_(c.get("cohens_d")),
            yesno(c.get("significant"))]


def bonferroni_family(src: dict | None, name: str, d: RunData) -> dict | None:
    """A Bonferroni family as the drift stage stored it; without a stored file (Table 3
    computed for the report), the one the drift stage will use: the configured tasks'
    study metrics, or configured tasks x seeds for the example-level tests."""
    fam = ((src or {}).get("families") or {}).get(name)
    if fam or src is not None or not d.tasks or name not in ("table3", "examples"):
        return fam
    from loralens.tasks.registry import get_task

    members = ([f"{t} {get_task(t).metric}" for t in d.tasks] if name == "table3"
               else [f"{t} seed {s}" for t in d.tasks for s in d.seeds])
    return {"size": len(members), "members": members, "alpha": 0.05}


def family_note(fam: dict | None, what: str, fallback_n: Any = None) -> str:
    if not fam:
        return (f"Family not recorded (the stored file predates it): p (Bonf.) = p × "
                f"{fallback_n if fallback_n is not None else '?'}; rerun `loralens drift`.")
    members = fam.get("members") or []
    tests = "test" if fam["size"] == 1 else "tests"
    return (f"Bonferroni family: {fam['size']} {tests}, {what} ({', '.join(members)}); "
            f"p (Bonf.) = min(1, p × {fam['size']}), significant when p (Bonf.) < "
            f"{fam.get('alpha', 0.05)}.")


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
