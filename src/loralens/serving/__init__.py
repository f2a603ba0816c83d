"""Serving: a lean multi-adapter runtime for LoRA classifiers and the serving-cost benchmark.

``runtime``: :class:`MultiLoraClassifier` (one frozen base, many adapters and heads)
and :class:`LoraAdapter` (a PEFT adapter directory read without PEFT).
``bench``: the ``loralens bench`` stage, :func:`run_bench` (with ``bench_task``,
``bench_multi``, ``identity`` (the float64 identity checks), ``bench_results`` and
``measure``).
``backends``: ours / PEFT / merged behind one interface; ``server``: ``loralens serve``
(FastAPI + uvicorn, dynamic batching); ``loadtest``: ``loralens loadtest``.

Importing this package is cheap (no torch): the names below load on first use, so
the CLI can build its parser with :func:`add_serve_arguments` and
:func:`add_loadtest_arguments`.
"""

from __future__ import annotations

from loralens.serving.cli_args import add_loadtest_arguments, add_serve_arguments

__all__ = ["LoraAdapter", "LoraLinear", "MultiLoraClassifier", "run_bench",
           "add_serve_arguments", "add_loadtest_arguments"]


def __getattr__(name: str):
    if name in ("LoraAdapter", "LoraLinear", "MultiLoraClassifier"):
        from loralens.serving import runtime

        return getattr(runtime, name)
    if name == "run_bench":
        from loralens.serving.bench.stage import run_bench

        return run_bench
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
