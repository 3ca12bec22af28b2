"""The layout's rules, checked on the package's import graph (tests/import_graph.py reads
it from the source, with pyproject's package-dir mapping; docs/architecture.md draws it):

- no import cycle among the package's modules;
- no module takes a `_private` name from another module;
- no module of the library changes sys.path;
- only cli/ imports cli/ (argparse stays at the edge; the library takes plain arguments);
- the arrows run one way: models/ never imports methods/ (the plan contract lives in
  models/plan.py), kernels/ neither the model nor the methods, the engine neither eval,
  bench nor the CLI, the server (HTTP front door) neither eval, bench nor the CLI
  (MAY_NOT_IMPORT has the whole table);
- the library never imports a script of benchmarks/.

Each rule is also run on a small package with one planted violation, and must find it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from import_graph import (
    ROOT,
    cycles,
    find_modules,
    ours,
    package_dirs,
    read_imports,
    sys_path_edits,
)

# package -> the packages it may not import (a package is a module name prefix)
MAY_NOT_IMPORT = {
    "rocketkv_jax.kernels": ("rocketkv_jax.models", "rocketkv_jax.methods",
                             "rocketkv_jax.engine", "rocketkv_jax.eval", "rocketkv_jax.bench",
                             "rocketkv_jax.cli"),
    "rocketkv_jax.models": ("rocketkv_jax.methods", "rocketkv_jax.engine", "rocketkv_jax.eval",
                            "rocketkv_jax.bench", "rocketkv_jax.cli"),
    "rocketkv_jax.methods": ("rocketkv_jax.engine", "rocketkv_jax.eval", "rocketkv_jax.bench",
                             "rocketkv_jax.cli"),
    "rocketkv_jax.engine": ("rocketkv_jax.eval", "rocketkv_jax.bench", "rocketkv_jax.cli",
                            "rocketkv_jax.server"),
    # the HTTP front door sits on the engine; only the CLI runs it
    "rocketkv_jax.server": ("rocketkv_jax.eval", "rocketkv_jax.bench", "rocketkv_jax.cli"),
    "rocketkv_jax.convert": ("rocketkv_jax.methods", "rocketkv_jax.engine", "rocketkv_jax.eval",
                             "rocketkv_jax.bench", "rocketkv_jax.cli"),
}
CLI = "rocketkv_jax.cli"


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def layout_violations(root: Path, dirs: dict[str, str]) -> list[str]:
    """Every break of the rules above, one line each (file:line: what)."""
    modules = find_modules(root, dirs)
    scripts = {p.stem for p in (root / "benchmarks").glob("*.py")}
    out: list[str] = []
    edges: dict[str, set[str]] = {m: set() for m in modules}

    def where(imp) -> str:
        return f"{modules[imp.source].relative_to(root)}:{imp.line}"

    for imp in read_imports(modules):
        target = ours(imp.target, modules)
        if target is None:
            if imp.target.split(".")[0] in scripts:
                out.append(f"{where(imp)}: imports benchmarks/{imp.target.split('.')[0]}.py")
            continue
        if target != imp.source:
            edges[imp.source].add(target)
        name = imp.name or ""
        if (target != imp.source and name.startswith("_") and not name.startswith("__")
                and f"{target}.{name}" not in modules):
            out.append(f"{where(imp)}: takes the private name {name} from {target}")
        if _within(target, CLI) and not _within(imp.source, CLI):
            out.append(f"{where(imp)}: imports the CLI ({target}) from outside it")
        for package, forbidden in MAY_NOT_IMPORT.items():
            if _within(imp.source, package):
                for f in forbidden:
                    if _within(target, f):
                        out.append(f"{where(imp)}: {package} imports {target}")
    for cycle in cycles(edges):
        out.append(f"import cycle: {' -> '.join(cycle)}")
    for path in modules.values():
        out += [f"{path.relative_to(root)}:{line}: changes sys.path"
                for line in sys_path_edits(path)]
    return out


def test_the_package_keeps_its_layout():
    assert layout_violations(ROOT, package_dirs()) == []


def test_every_folder_of_the_package_is_read():
    modules = find_modules(ROOT, package_dirs())
    for name in ("rocketkv_jax.cli", "rocketkv_jax.engine.generate", "rocketkv_jax.models.plan",
                 "rocketkv_jax.kernels.backend", "rocketkv_jax.cli.convert",
                 "rocketkv_jax.convert.hf", "rocketkv_jax.bench.grid"):
        assert name in modules, name
    assert not any(m.startswith(("models", "kernels", "convert")) for m in modules)


# ------------------------------------------------------------------ planted violations
CLEAN = {
    "rocketkv_jax/__init__.py": "",
    "rocketkv_jax/names.py": "NAMES = ()\n",
    "rocketkv_jax/cli/__init__.py": "from ..engine import run\n",
    "rocketkv_jax/engine/__init__.py": "",
    "rocketkv_jax/engine/run.py": "from ..methods import full\n_hidden = 1\n",
    "rocketkv_jax/server/__init__.py": "",
    "rocketkv_jax/server/app.py": "from ..engine import run\n",
    "rocketkv_jax/bench/__init__.py": "",
    "rocketkv_jax/bench/grid.py": "",
    "rocketkv_jax/methods/__init__.py": "",
    "rocketkv_jax/methods/full.py": "from ..models import plan\n",
    "models/__init__.py": "",
    "models/plan.py": "from ..kernels import attention\nfrom .. import names\n",
    "kernels/__init__.py": "",
    "kernels/attention.py": "import sys\nprint(sys.path[0])\n",
    "benchmarks/grid_script.py": "",
}
DIRS = {"rocketkv_jax": "rocketkv_jax", "rocketkv_jax.models": "models",
        "rocketkv_jax.kernels": "kernels"}
PLANTED = [
    ("models/plan.py", "from ..methods import full\n", "rocketkv_jax.models imports"),
    ("kernels/attention.py", "from ..models import plan\n", "rocketkv_jax.kernels imports"),
    ("rocketkv_jax/methods/full.py", "from ..engine import run\n", "import cycle"),
    ("rocketkv_jax/methods/full.py", "from ..engine.run import _hidden\n", "private name _hidden"),
    ("rocketkv_jax/engine/run.py", "from ..cli import main\n", "imports the CLI"),
    ("rocketkv_jax/server/app.py", "from ..bench import grid\n", "rocketkv_jax.server imports"),
    ("rocketkv_jax/engine/run.py", "def f():\n    import grid_script\n", "imports benchmarks/"),
    ("kernels/attention.py", "import sys\nsys.path.insert(0, 'x')\n", "changes sys.path"),
    ("rocketkv_jax/names.py", "import sys\nsys.path += ['x']\n", "changes sys.path"),
]


def _tree(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_the_clean_planted_package_passes(tmp_path):
    _tree(tmp_path, CLEAN)
    assert layout_violations(tmp_path, DIRS) == []


@pytest.mark.parametrize("file, added, found", PLANTED)
def test_each_rule_finds_its_planted_violation(tmp_path, file, added, found):
    _tree(tmp_path, {**CLEAN, file: CLEAN[file] + added})
    violations = layout_violations(tmp_path, DIRS)
    assert any(found in v for v in violations), violations
