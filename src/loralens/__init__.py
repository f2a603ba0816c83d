"""loralens: controlled studies of parameter-efficient fine-tuning.

rank-8 LoRA vs full fine-tuning of a causal LM classifier: training, layer-wise
representation drift to the base model, statistics and serving cost.
"""

from loralens.core.version import __version__  # noqa: F401 (the public version)


def __getattr__(name: str):
    """``loralens.results(RUN_DIR)``: the run's tidy DataFrames
    (:func:`loralens.report.results.results`), imported on first use so that
    ``import loralens`` stays light (no pandas, torch or matplotlib)."""
    if name == "results":
        # The root package is the public facade above every layer; nothing below imports it.
        from loralens.report.results import results

        return results
    raise AttributeError(f"module 'loralens' has no attribute {name!r}")
