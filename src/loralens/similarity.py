"""Compatibility: ``loralens.similarity`` is :mod:`loralens.analysis.similarity`.

Kept because the README's library section and users' code import it by this name.
"""

from loralens.analysis.similarity import *  # noqa: F401,F403
from loralens.analysis.similarity import __all__  # noqa: F401
