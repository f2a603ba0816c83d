#!/usr/bin/env python3
"""Fail, naming the package, when an installed distribution's version differs from its pin.

    .venv/bin/python .ci/check_constraints.py [constraints.txt constraints-test.txt ...]

Run by `make test` (so by CI) after the install: the environment the tests run in is the
one the constraints files describe. A pinned package that is not installed is not an error
(constraints-test.txt pins every extra, and not every extra is installed: gpu); an
installed version with a local label (torch 2.13.0+cpu) matches its pin (==2.13.0), as pip
matches it. Standard library and ``packaging`` only.
"""

from __future__ import annotations

import importlib.metadata as md
import sys
from pathlib import Path
from typing import Callable

from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
FILES = ("constraints.txt", "constraints-test.txt")


def read_pins(text: str) -> dict[str, str]:
    """canonical name -> pinned version of a constraints file's ``name==version`` lines
    (comments and blank lines skipped); anything else is a ValueError naming the line."""
    pins = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep or not name.strip() or not version.strip() or " " in version.strip():
            raise ValueError(f"line {n}: not an exact pin (name==version): {line!r}")
        pins[canonicalize_name(name.strip())] = version.strip()
    return pins


def installed_version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def differences(pins: dict[str, str],
                installed: Callable[[str], str | None] = installed_version) -> list[str]:
    """One line per pinned package installed at another version: "name: installed X,
    pinned Y"."""
    out = []
    for name, version in sorted(pins.items()):
        have = installed(name)
        if have is not None and have not in SpecifierSet(f"=={version}"):
            out.append(f"{name}: installed {have}, pinned {version}")
    return out


def main(argv: list[str]) -> int:
    files = [Path(a) for a in argv] or [ROOT / f for f in FILES if (ROOT / f).is_file()]
    bad = []
    for path in files:
        bad += [f"{path.name}: {d}" for d in differences(read_pins(path.read_text()))]
    if bad:
        print("installed versions differ from the constraints (reinstall with `make "
              "install-test`, or regenerate with .ci/freeze_constraints.py):", file=sys.stderr)
        print("\n".join(f"  {b}" for b in bad), file=sys.stderr)
        return 1
    print(f"installed versions match {', '.join(p.name for p in files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
