"""The package's modules and the imports between them, read from the source (ast), as
pyproject's package-dir maps the folders (`models/` is `rocketkv_jax.models`, ...).

Every import statement counts, at module level or inside a function: a lazy import is
still an arrow of the layout. `from pkg import name` is an arrow to `pkg.name` when that is
a module, else to `pkg` (its `__init__`).
"""

from __future__ import annotations

import ast
import dataclasses
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def package_dirs(root: Path = ROOT) -> dict[str, str]:
    """pyproject's package-dir: import name -> folder."""
    config = tomllib.loads((root / "pyproject.toml").read_text())
    return dict(config["tool"]["setuptools"]["package-dir"])


def find_modules(root: Path, dirs: dict[str, str]) -> dict[str, Path]:
    """Module name -> file, for every .py file under the mapped folders (a folder mapped
    on its own is not walked again under its parent)."""
    mapped = {(root / folder).resolve() for folder in dirs.values()}
    modules: dict[str, Path] = {}
    for package, folder in dirs.items():
        base = (root / folder).resolve()
        for path in sorted(base.rglob("*.py")):
            if any(p in mapped and p != base for p in path.parents):
                continue  # inside a folder with a mapping of its own
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([package, *parts])] = path
    return modules


@dataclasses.dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the module imported (a package's __init__ when a name comes from it)
    name: str | None  # the name taken by `from ... import name`, else None
    line: int


def _absolute(module: str, is_package: bool, level: int, name: str | None) -> str:
    if not level:
        return name or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def read_imports(modules: dict[str, Path]) -> list[Import]:
    out = []
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                out += [Import(module, a.name, None, node.lineno) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(module, is_package, node.level, node.module)
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    out.append(Import(module, sub if sub in modules else base, a.name,
                                      node.lineno))
    return out


def ours(target: str, modules: dict[str, Path]) -> str | None:
    """The module of ours an import target lands in (the deepest one it names), or None."""
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target or None


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def sys_path_edits(path: Path) -> list[int]:
    """Lines that change the import path: `sys.path.<method>(...)`, an assignment to
    `sys.path` (or to an item or slice of it), `site.addsitedir(...)`."""

    def is_sys_path(node) -> bool:
        return (isinstance(node, ast.Attribute) and node.attr == "path"
                and isinstance(node.value, ast.Name) and node.value.id == "sys")

    lines = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if is_sys_path(node.func.value) or node.func.attr == "addsitedir":
                lines.append(node.lineno)
        targets = (node.targets if isinstance(node, ast.Assign)
                   else [node.target] if isinstance(node, ast.AugAssign | ast.AnnAssign)
                   else [])
        for t in targets:
            if is_sys_path(t) or (isinstance(t, ast.Subscript) and is_sys_path(t.value)):
                lines.append(node.lineno)
    return lines
