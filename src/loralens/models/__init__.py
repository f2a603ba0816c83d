"""Models and methods: the model registry and its safetensors cache
(:mod:`.registry`, :mod:`.cache`, the tiny random model in :mod:`.tiny`), the causal-LM
classifier (:mod:`.classifier`), model families' pooling and layouts (:mod:`.families`), the
method registry (:mod:`.methods`: a method is data), which path serves each method
(:mod:`.serving_paths`), artifacts in PEFT/transformers layouts (:mod:`.artifacts`) and
model cards (:mod:`.cards`). May import :mod:`loralens.core` only.
"""

__all__ = ["load_trained"]


def __getattr__(name: str):
    # `loralens.models.load_trained` is written into exported model cards' loading snippets.
    if name == "load_trained":
        from loralens.models.saving import load_trained

        return load_trained
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
