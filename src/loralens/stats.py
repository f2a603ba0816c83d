"""Compatibility: ``loralens.stats`` is :mod:`loralens.analysis.stats`.

Kept because the README's library section and users' code import it by this name.
"""

from loralens.analysis.stats import *  # noqa: F401,F403
from loralens.analysis.stats import __all__  # noqa: F401
