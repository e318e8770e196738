"""The shape of the package, read from its source with ``ast`` (nothing is imported):

* the import graph of ``hf_cka`` has no cycle, counting EVERY import: module-level ones,
  function-level (lazy) ones and those under ``if TYPE_CHECKING:`` (a cycle through a type-only
  import still ties two modules together: neither can be read, typed or moved without the other);
* the runner does not import the seed-compatible ``engine`` (both build on ``capture``);
* no module is over MAX_LINES lines;
* the version is written once: ``hf_cka.__version__``, which pyproject.toml reads.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = "hf_cka"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE
# At most 450 lines a module (issue 14): a module that grows past it must be split along a
# real seam, not squeezed.
MAX_LINES = 450


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


def _imported(module: str, path: Path) -> set[str]:
    """The ``hf_cka`` modules that ``module`` imports anywhere in its source.

    ``from X import name`` counts as an import of ``X.name`` when that is a module (a submodule
    imported through its package), else of ``X``.
    """
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                targets.add(submodule if submodule in MODULES else source)
    return {target for target in targets if target in MODULES and target != module}


GRAPH = {module: _imported(module, path) for module, path in MODULES.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if start in state:
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            child = next(stack[-1], None)
            if child is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(child) == 1:
                return path[path.index(child) :] + [child]
            elif child not in state:
                state[child] = 1
                path.append(child)
                stack.append(iter(sorted(graph[child])))
    return None


def test_the_graph_is_read_from_every_module() -> None:
    assert {"hf_cka", "hf_cka.runner", "hf_cka.engine", "hf_cka.capture"} <= set(MODULES)
    assert "hf_cka.capture" in GRAPH["hf_cka.runner"]  # a module-level import
    assert "hf_cka.result" in GRAPH["hf_cka.auto"]  # a lazy or TYPE_CHECKING one


def test_the_cycle_finder_finds_cycles() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_import_graph_has_no_cycle() -> None:
    cycle = _cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_runner_does_not_import_the_engine() -> None:
    assert "hf_cka.engine" not in GRAPH["hf_cka.runner"]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_is_too_long(module: str) -> None:
    lines = len(MODULES[module].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{module} has {lines} lines; split it along a real seam"


def test_the_version_is_written_once() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT.parent / "pyproject.toml").read_text(encoding="utf-8"))
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "hf_cka.__version__"}
    init = ast.parse((ROOT / "__init__.py").read_text(encoding="utf-8"))
    (version,) = [
        node.value.value
        for node in init.body
        if isinstance(node, ast.Assign)
        and [getattr(t, "id", None) for t in node.targets] == ["__version__"]
        and isinstance(node.value, ast.Constant)  # a literal: setuptools reads it statically
    ]
    shown = subprocess.run(
        [sys.executable, "-m", PACKAGE, "--version"], capture_output=True, text=True, check=True
    )
    assert shown.stdout.split() == ["hf-cka", version]
