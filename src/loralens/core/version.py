"""loralens's version: one string for the source tree, and the installed distribution's."""

from __future__ import annotations

__version__ = "0.1.0"  # keep equal to pyproject.toml's [project] version


def package_version() -> str:
    """The installed distribution's version (importlib.metadata), else the source tree's
    ``__version__`` (a checkout run without ``pip install``)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("loralens")
    except PackageNotFoundError:
        return __version__
