"""The package's structure rules that import-linter does not check (its layers contract,
`lint-imports`, runs first in `make test`): no import cycle even counting function-level
imports, and methods are data (no comparison with the names "lora"/"full" outside the
method registry)."""

import ast
from pathlib import Path

import loralens

PACKAGE = Path(loralens.__file__).parent


def modules() -> dict[str, tuple[Path, bool]]:
    out = {}
    for p in PACKAGE.rglob("*.py"):
        parts = list(p.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (p, is_pkg)
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the loralens modules it imports anywhere (module level or in a function),
    leaving out imports under ``if TYPE_CHECKING:`` (annotations only)."""
    mods = modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for name, (path, is_pkg) in mods.items():
        tree = ast.parse(path.read_text())
        skip = {id(n) for i in ast.walk(tree) if isinstance(i, ast.If)
                and "TYPE_CHECKING" in ast.unparse(i.test) for n in ast.walk(i)}
        base = name.split(".") if is_pkg else name.split(".")[:-1]
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            targets = []
            if isinstance(node, ast.ImportFrom):
                mod = (".".join(base[:len(base) - node.level + 1] + [node.module or ""])
                       .rstrip(".") if node.level else node.module or "")
                targets = [f"{mod}.{a.name}" for a in node.names] + [mod]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for t in targets:
                if t in mods and t != name and t.startswith("loralens."):
                    edges[name].add(t)
                    break
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_counting_function_level_imports():
    edges = import_graph()
    assert edges["loralens.study.stages"], "the graph sees imports"
    assert cycles(edges) == []


def test_no_comparison_with_lora_or_full_outside_the_method_registry():
    allowed = {PACKAGE / "models" / "methods.py"}
    found = []
    for path in PACKAGE.rglob("*.py"):
        if path in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                consts = [c for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
                seqs = [e for c in [node.left, *node.comparators]
                        if isinstance(c, (ast.Tuple, ast.List, ast.Set)) for e in c.elts
                        if isinstance(e, ast.Constant)]
                if any(c.value in ("lora", "full") for c in consts + seqs):
                    found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert found == []
