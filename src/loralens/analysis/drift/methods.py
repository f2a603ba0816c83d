"""Former home of the per-method drift table; it lives with its stage now:
:func:`loralens.analysis.drift.stage.method_drift` and
:func:`loralens.analysis.drift.stats.method_accuracy`. Kept only for
``loralens.study.stages.run_drift``'s import until that imports from the stage.
"""

from loralens.analysis.drift.stage import method_drift
from loralens.analysis.drift.stats import job_scores, method_accuracy

__all__ = ["job_scores", "method_accuracy", "method_drift"]
