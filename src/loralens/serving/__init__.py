"""Serving: a lean multi-adapter runtime for LoRA classifiers and the serving-cost benchmark.

``runtime``: :class:`MultiLoraClassifier` (one frozen base, many adapters and heads)
and :class:`LoraAdapter` (a PEFT adapter directory read without PEFT).
``bench``: the ``loralens bench`` stage, :func:`run_bench`.
``backends``: ours / PEFT / merged behind one interface; ``server``: ``loralens serve``
(FastAPI + uvicorn, dynamic batching); ``loadtest``: ``loralens loadtest``.

Importing this package is cheap (no torch): the names below load on first use, so
the CLI can build its parser with :func:`add_bench_arguments`.
"""

from __future__ import annotations

from .cli_args import add_loadtest_arguments, add_serve_arguments

__all__ = ["LoraAdapter", "LoraLinear", "MultiLoraClassifier", "run_bench", "add_bench_arguments",
           "add_serve_arguments", "add_loadtest_arguments"]


def add_bench_arguments(p) -> None:
    """Arguments of ``loralens bench`` (besides the common ones), for ``bench.cli_command``."""
    p.add_argument("--task", action="append", help="task (repeatable; default: every trained one)")
    p.add_argument("--batch-size", action="append", type=int,
                   help="request batch size (repeatable; default 1)")
    p.add_argument("--requests", type=int, default=100,
                   help="validation examples timed per model (default 100)")
    p.add_argument("--warmup", type=int, default=10, help="untimed warm-up requests per model")
    p.add_argument("--mixed-batch-size", type=int, default=8,
                   help="rows per mixed-adapter batch in the multi-adapter benchmark (default 8)")
    p.add_argument("--threads", type=int,
                   help="torch CPU threads (default: train.threads, else torch's default)")


def __getattr__(name: str):
    if name in ("LoraAdapter", "LoraLinear", "MultiLoraClassifier"):
        from . import runtime

        return getattr(runtime, name)
    if name == "run_bench":
        from .bench import run_bench

        return run_bench
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
