"""The report's cells: numbers formatted once, so the Markdown and the HTML show the same text.

:class:`Table` is what every ``table_*`` function returns: a grid of cells that are
already strings. The formatters below turn stored numbers into those strings; each
gives a dash for a missing or non-finite value. ``f`` and ``g`` are named after the
format codes they apply (fixed decimals, significant digits).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from loralens.models.methods import LABELS

DASH = "–"
# Display names of methods (the method registry's), serving strategies and drift measures
# (tables and figures).
METHODS = LABELS
KINDS = {"full": "full fine-tuning", "lora_merged": "LoRA merged",
         "lora_separate": "LoRA separate (PEFT)", "lora_runtime": "LoRA, our runtime"}
MEASURES = {"cka": "1 − linear CKA (biased)", "cka_debiased": "1 − linear CKA (debiased)",
            "cosine": "1 − mean cosine"}


@dataclass
class Table:
    id: str                         # HTML id, stable (tests and links use it)
    title: str
    columns: list[str]
    rows: list[list[str]]
    caption: str = ""
    notes: list[str] = field(default_factory=list)
    numeric: bool = True            # right-align cells that hold numbers (HTML)


def finite(x: Any) -> bool:
    """A real number (not a bool, not NaN or inf)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def f(x: Any, digits: int = 4) -> str:
    """Fixed decimals (accuracy, F1, seconds); a dash for a missing value."""
    return f"{x:.{digits}f}" if finite(x) else DASH


def g(x: Any, digits: int = 3) -> str:
    """Significant digits (drift values span orders of magnitude)."""
    return f"{x:.{digits}g}" if finite(x) else DASH


def d_(x: Any) -> str:
    """Cohen's d: three significant digits, trailing zeros kept (-3.00, not -3)."""
    return f"{x:#.3g}".rstrip(".") if finite(x) else DASH


def pm(mean: Any, sd: Any, fmt=f) -> str:
    """"mean ± sd"; the mean alone when there is no sd."""
    if not finite(mean):
        return DASH
    return fmt(mean) + (f" ± {fmt(sd)}" if finite(sd) else "")


def ci(interval: Any, fmt=g) -> str:
    """"[low, high]"; empty when there is no interval."""
    if not isinstance(interval, (list, tuple)) or len(interval) != 2 \
            or not all(finite(v) for v in interval):
        return ""
    return f"[{fmt(interval[0])}, {fmt(interval[1])}]"


def pval(p: Any) -> str:
    if not finite(p):
        return DASH
    if p == 0:
        return "0"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def yesno(x: Any) -> str:
    return DASH if x is None else ("yes" if x else "no")


def signed_pct(x: Any, digits: int = 1) -> str:
    if not finite(x):
        return DASH
    text = f"{x:+.{digits}f}%"
    return "±" + text[1:] if float(text[1:-1]) == 0 else text  # no "-0.0%"


def seconds(s: Any) -> str:
    """A duration in the unit that reads best: ms, s, min or h."""
    if not finite(s):
        return DASH
    if s < 1:
        return f"{s * 1000:.0f} ms" if s >= 0.01 else f"{s * 1000:.2g} ms"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def pct(x: Any) -> str:
    """A fraction as a percent: one decimal, two significant digits below 1% (0.25 ->
    "25.0%", 0.0004 -> "0.04%")."""
    if not finite(x):
        return DASH
    v = 100 * x
    return f"{v:.1f}%" if abs(v) >= 1 or v == 0 else f"{v:.2g}%"


def rate(x: Any, scale: float = 1.0) -> str:
    """A rate divided by ``scale`` (1e9: GFLOP/s): whole numbers with thousands
    separators from 100 on, else three significant digits (186.3 -> "186",
    12345.6 -> "12,346", 7.25 -> "7.25")."""
    if not finite(x):
        return DASH
    v = x / scale
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def per_seed(values: dict | None, fmt=f) -> str:
    """``{seed: value}`` as "42: 0.8123, 1337: 0.8200"."""
    if not values:
        return DASH
    items = sorted(((int(k), v) for k, v in values.items()), key=lambda kv: kv[0])
    return ", ".join(f"{k}: {fmt(v)}" for k, v in items)


def label_counts(task: str, counts: dict | None) -> str:
    """``{label id: rows}`` as "negative 30 (47%), positive 34 (53%)"."""
    if not counts:
        return DASH
    try:
        from loralens.tasks.registry import get_task

        names = get_task(task).label_names
    except (KeyError, ValueError):  # a task file this process has not read: ids
        names = ()
    total = sum(counts.values()) or 1
    parts = []
    for k, v in sorted(counts.items(), key=lambda kv: int(kv[0])):
        name = names[int(k)] if int(k) < len(names) else str(k)
        parts.append(f"{name} {v} ({100 * v / total:.0f}%)")
    return ", ".join(parts)


def short_list(items: list[str], n: int = 6) -> str:
    """The first ``n`` items and how many more."""
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")
