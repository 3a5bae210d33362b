"""Architecture rules of the tfpar package, checked on its source (ast, no import of tfpar).

The import graph includes imports inside functions (a lazy import is still a dependency). Each rule
is a row of a table below; add a rule by adding a row.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "tfpar"

# Private Keras / TensorFlow APIs, and the only modules allowed to import them.
PRIVATE_APIS = ("keras.src", "tensorflow.python")
PRIVATE_API_HOMES = ("tfpar._compat", "tfpar.coordinator._patches")

# (why, importer prefix, prefixes it must not import): imports flow one way.
LAYERS = [
    ("the compat package sits below every feature module", "tfpar._compat",
     ("tfpar.coordinator", "tfpar.strategies", "tfpar.job", "tfpar.cli", "tfpar.doctor", "tfpar.launch",
      "tfpar.models", "tfpar.parallel", "tfpar.training", "tfpar.profiling", "tfpar.tuning")),
    ("the coordinator sits below the strategy registry", "tfpar.coordinator",
     ("tfpar.strategies", "tfpar.job", "tfpar.cli", "tfpar.doctor")),
    ("cluster discovery sits below the compat package and every feature module", "tfpar.cluster",
     ("tfpar._compat", "tfpar.coordinator", "tfpar.strategies", "tfpar.job", "tfpar.cli", "tfpar.doctor",
      "tfpar.launch", "tfpar.models", "tfpar.parallel", "tfpar.data", "tfpar.training")),
    ("the launcher uses cluster discovery only (it supervises processes, it trains nothing)", "tfpar.launch",
     ("tfpar._compat", "tfpar.coordinator", "tfpar.strategies", "tfpar.job", "tfpar.cli", "tfpar.doctor",
      "tfpar.models", "tfpar.parallel", "tfpar.data", "tfpar.training", "tfpar.devices")),
    ("the command line's name tables import nothing from tfpar", "tfpar._names", ("tfpar",)),
    ("profiling sits below the job and the command line (and does not tune)", "tfpar.profiling",
     ("tfpar.job", "tfpar.cli", "tfpar.tuning", "tfpar.launch")),
    ("tuning sits below the job and the command line", "tfpar.tuning", ("tfpar.job", "tfpar.cli", "tfpar.launch")),
]

# Packages whose private modules import each other's names: only public (non-underscore) names.
PUBLIC_NAMES_ACROSS_MODULES = ("tfpar.coordinator",)


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, tuple[Path, ast.Module]]:
    return {_module_name(path): (path, ast.parse(path.read_text(), str(path))) for path in sorted(ROOT.rglob("*.py"))}


SOURCES = _sources()


def _imports(module: str, tree: ast.Module) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) for every import, function-level included."""
    package = module if SOURCES[module][0].name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found += [(base, alias.name, node.lineno) for alias in node.names]
    return found


def _targets(base: str, name: str | None) -> str:
    """The tfpar module an import loads: ``from tfpar import x`` is tfpar.x when that is a module."""
    if name is not None and f"{base}.{name}" in SOURCES:
        return f"{base}.{name}"
    while base not in SOURCES and "." in base:
        base = base.rpartition(".")[0]
    return base


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {module: set() for module in SOURCES}
    for module, (_, tree) in SOURCES.items():
        for base, name, _ in _imports(module, tree):
            if base == "tfpar" or base.startswith("tfpar."):
                target = _targets(base, name)
                if target != module:
                    graph[module].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_the_package_has_no_import_cycle():
    assert _cycles(_graph()) == []


@pytest.mark.parametrize(("why", "importer", "forbidden"), LAYERS, ids=[row[1] for row in LAYERS])
def test_imports_flow_one_way(why, importer, forbidden):
    graph = _graph()
    wrong = sorted(
        f"{module} imports {target}"
        for module, targets in graph.items() if _within(module, importer)
        for target in targets if any(_within(target, prefix) for prefix in forbidden)
    )
    assert not wrong, f"{why}: {wrong}"


def test_only_the_compat_modules_import_private_keras_and_tensorflow():
    wrong = sorted(
        f"{module}:{line} imports {base}"
        for module, (_, tree) in SOURCES.items() if not any(_within(module, home) for home in PRIVATE_API_HOMES)
        for base, _, line in _imports(module, tree) if any(_within(base, api) for api in PRIVATE_APIS)
    )
    assert not wrong, wrong


def test_no_other_module_even_names_private_keras_and_tensorflow_paths():
    """Patch targets and docstrings that name them live in the compat modules too (one place to look)."""
    wrong = sorted(
        module for module, (path, _) in SOURCES.items()
        if not any(_within(module, home) for home in PRIVATE_API_HOMES)
        and any(api in path.read_text() for api in PRIVATE_APIS)
    )
    assert not wrong, wrong


@pytest.mark.parametrize("package", PUBLIC_NAMES_ACROSS_MODULES)
def test_sibling_modules_import_public_names(package):
    wrong = sorted(
        f"{module}:{line} imports {name} from {base}"
        for module, (_, tree) in SOURCES.items() if _within(module, package)
        for base, name, line in _imports(module, tree)
        if name and name.startswith("_") and _within(base, package) and base != module
        and f"{base}.{name}" not in SOURCES  # a private module itself is fine
    )
    assert not wrong, wrong


# Imports that must leave TensorFlow and Keras out of sys.modules: (why, Python code). Each row
# runs in a fresh interpreter (an import, not an ast walk: a module-level import anywhere in the
# chain counts), so these tests start processes.
TENSORFLOW_FREE = [
    ("the launcher supervises TensorFlow processes; it is not one", "import tfpar.launch"),
    ("TF_CONFIG parsing and validation", "import tfpar.cluster._tf_config"),
    ("ports, sockets and /proc", "import tfpar.cluster._net"),
    ("the Slurm variables", "import tfpar.cluster._slurm"),
    ("detect and task roles", "import tfpar.cluster._roles"),
    ("the cluster package loads its TensorFlow modules on first use",
     "import tfpar.cluster as c; c.parse_tf_config('{}'); c.free_ports(1); c.listening_addresses([1])"),
    ("the command line's parser", "import tfpar.cli; tfpar.cli.build_parser()"),
    ("the parser's names and defaults", "import tfpar._names, tfpar._train_config"),
]


@pytest.mark.multiprocess
@pytest.mark.parametrize(("why", "code"), TENSORFLOW_FREE, ids=[row[1] for row in TENSORFLOW_FREE])
def test_imports_that_load_no_tensorflow(why, code):
    check = "import sys; print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", f"{code}\n{check}"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines()[-1] == "[]", f"{why}: `{code}` imported {result.stdout.splitlines()[-1]}"


MAX_MODULE_LINES = 650
# Modules still over the limit, each with its reason. The list can only shrink: an entry that is no
# longer over the limit fails the test until it is removed.
OVERSIZED_MODULES: dict[str, str] = {}


def test_no_module_is_over_the_line_limit():
    sizes = {module: len(path.read_text().splitlines()) for module, (path, _) in SOURCES.items()}
    over = sorted(f"{module} ({lines} lines)" for module, lines in sizes.items()
                  if lines > MAX_MODULE_LINES and module not in OVERSIZED_MODULES)
    assert not over, f"split these modules (at most {MAX_MODULE_LINES} lines): {over}"
    fixed = sorted(module for module in OVERSIZED_MODULES if sizes.get(module, 0) <= MAX_MODULE_LINES)
    assert not fixed, f"remove from OVERSIZED_MODULES, now within the limit (or gone): {fixed}"
