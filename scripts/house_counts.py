"""The house's counts (issue 48): import circles among clevrgen's modules, files over 400 lines,
classes over 250 lines, and benchmarks/' share of the repository's Python lines.

    python scripts/house_counts.py            # prints the counts; exit 1 if a target is missed

An import is any ``import clevrgen.x`` / ``from clevrgen.x import ...`` in a module, at its top or
inside a function (both tie the two modules together for a reader); a circle is a cycle in that
graph, and "back to one that imports it" is a cycle of two.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
MAX_FILE, MAX_CLASS, MAX_BENCH_SHARE = 400, 250, 0.15


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The clevrgen modules ``path`` imports (a ``from pkg import name`` naming a submodule counts)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("clevrgen"):
            subs = {f"{node.module}.{a.name}" for a in node.names} & modules
            found |= subs or ({node.module} & modules)
    return found - {module_name(path)}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def python_lines(folder: Path) -> int:
    return sum(len(p.read_text().splitlines()) for p in folder.rglob("*.py"))


def main() -> int:
    files = sorted((SRC / "clevrgen").rglob("*.py"))
    modules = {module_name(p) for p in files}
    # "import clevrgen" alone (the package's lazy exports) is not an edge to every module
    graph = {module_name(p): imports_of(p, modules) - {"clevrgen"} for p in files}
    circles = cycles(graph)
    long_files = [(str(p.relative_to(ROOT)), n) for p in files if (n := len(p.read_text().splitlines())) > MAX_FILE]
    long_classes = []
    for p in files:
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ClassDef) and (n := node.end_lineno - node.lineno + 1) > MAX_CLASS:
                long_classes.append((f"{p.relative_to(ROOT)}:{node.name}", n))
    repo_files = [p for p in ROOT.rglob("*.py") if ".venv" not in p.parts and "build" not in p.parts]
    total = sum(len(p.read_text().splitlines()) for p in repo_files)
    bench = python_lines(ROOT / "benchmarks")
    share = bench / total if total else 0.0
    print(f"modules: {len(modules)}, Python lines in the repository: {total:,}")
    print(f"import circles: {len(circles)}" + "".join(f"\n  {' <-> '.join(c)}" for c in circles))
    print(f"files over {MAX_FILE} lines: {len(long_files)}" + "".join(f"\n  {f}: {n}" for f, n in long_files))
    print(f"classes over {MAX_CLASS} lines: {len(long_classes)}" + "".join(f"\n  {c}: {n}" for c, n in long_classes))
    print(f"benchmarks/: {bench:,} lines, {share:.1%} of the repository's Python (target <= {MAX_BENCH_SHARE:.0%})")
    return 1 if circles or long_files or long_classes or share > MAX_BENCH_SHARE else 0


if __name__ == "__main__":
    sys.exit(main())
