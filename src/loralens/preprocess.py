"""Compatibility: ``loralens.preprocess`` is :mod:`loralens.tasks.preprocess`.

Kept because every exported model card's snippet imports ``format_input`` from here.
"""

from loralens.tasks.preprocess import format_input  # noqa: F401

__all__ = ["format_input"]
