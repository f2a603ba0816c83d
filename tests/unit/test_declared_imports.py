"""Every third-party package loralens imports is declared in pyproject.toml (issue 28.6).

A package that arrives only through another one's dependencies (SQLAlchemy through optuna,
pydantic and starlette through fastapi, ...) disappears the day that package drops it, and
``pip install loralens`` then installs a package that cannot import. The imports are read
from the source with ``ast`` (module-level and function-level ``import``/``from``, and
``importlib.import_module("name")`` with a literal name), mapped to the distributions that
provide them in this environment (``importlib.metadata.packages_distributions``), and each
must be named in ``[project] dependencies`` or an extra other than ``test`` (the test extra
installs the test suite's tools, not a user's)."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import loralens

PACKAGE = Path(loralens.__file__).parent
PYPROJECT = PACKAGE.parents[1] / "pyproject.toml"

# Imported modules that need a distribution other than their own package's: torch's
# SummaryWriter imports the tensorboard distribution.
IMPLIED = {"torch.utils.tensorboard": "tensorboard"}
# Optional packages not installed in the test environment, so packages_distributions cannot
# name their distribution: bitsandbytes (8-bit AdamW, GPU only).
NOT_INSTALLED_HERE = {"bitsandbytes": "bitsandbytes"}


def normalize(name: str) -> str:
    """PEP 503's normalized project name: ``PyYAML`` and ``pyyaml``, ``mlflow_skinny`` and
    ``mlflow-skinny`` are the same distribution."""
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_modules(path: Path) -> set[str]:
    """The absolute module names ``path`` imports (dotted, as written)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            found |= {a.name for a in n.names}
        elif isinstance(n, ast.ImportFrom) and n.level == 0 and n.module:
            found.add(n.module)
        elif (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
              and n.func.attr == "import_module" and n.args
              and isinstance(n.args[0], ast.Constant) and isinstance(n.args[0].value, str)):
            found.add(n.args[0].value)
    return found


def third_party_imports() -> dict[str, set[str]]:
    """Top-level third-party module (or IMPLIED module) -> the files importing it."""
    out: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for module in imported_modules(path):
            top = module.split(".")[0]
            if top == "loralens" or top in sys.stdlib_module_names or top == "__future__":
                continue
            key = next((m for m in IMPLIED if module == m or module.startswith(m + ".")), top)
            out.setdefault(key, set()).add(path.relative_to(PACKAGE).as_posix())
    return out


def declared_distributions() -> set[str]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    reqs = list(project.get("dependencies", []))
    for extra, extra_reqs in project.get("optional-dependencies", {}).items():
        if extra != "test":
            reqs += extra_reqs
    return {normalize(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", r.strip()).group(0))
            for r in reqs}


def distributions_of(module: str, installed: dict[str, list[str]]) -> set[str]:
    """The distributions providing ``module``; ``installed``: packages_distributions()."""
    if module in IMPLIED:
        return {normalize(IMPLIED[module])}
    if module in NOT_INSTALLED_HERE:
        return {normalize(NOT_INSTALLED_HERE[module])}
    return {normalize(d) for d in installed.get(module, [])}


def test_the_import_reader_sees_every_kind_of_import(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("import a.b, c\nfrom d.e import f\nfrom . import g\n"
                   "def h():\n    import i\n    importlib.import_module('j.k')\n")
    assert imported_modules(src) == {"a.b", "c", "d.e", "i", "j.k"}


def test_normalized_names_match_as_pip_matches_them():
    assert normalize("PyYAML") == normalize("pyyaml")
    assert normalize("mlflow_skinny") == normalize("mlflow-skinny") == "mlflow-skinny"
    assert normalize("zope.interface") == "zope-interface"


def test_every_imported_package_is_declared():
    declared = declared_distributions()
    installed = packages_distributions()
    missing = []
    for module, files in sorted(third_party_imports().items()):
        dists = distributions_of(module, installed)
        assert dists, (f"{module} (imported by {sorted(files)}) is not installed here and "
                       "has no entry in NOT_INSTALLED_HERE")
        if not dists & declared:
            missing.append(f"{module} -> {'/'.join(sorted(dists))} "
                           f"(imported by {', '.join(sorted(files)[:3])})")
    assert not missing, ("imported but not declared in pyproject.toml's dependencies or "
                         "extras:\n  " + "\n  ".join(missing))
