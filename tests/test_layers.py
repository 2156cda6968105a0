"""The package's layers are its folders, and they import one way.

A module belongs to the layer of its package (core, data, engine, stages, publish), or, for the
few modules at the top of the package, to the layer listed for its own name. A module imports
only from its own layer or the layers below it; no two modules import each other, directly or
around a cycle; and a module imports the package's own modules inside a function only where
that keeps mlx out of `--help` (the commands). README.md ("Architecture") and the package's
docstring list the same layers; this test keeps the three in step and reads the import graph
from the source."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mipo_mlx"

# Bottom to top: (layer, the packages and top-level modules in it). A module's layer is that of
# the longest dotted prefix of its name listed here: `engine.trainer` is in engine, and
# `embedded.build`, a command, is not in `embedded`'s layer.
LAYERS = [
    ("core", ["__init__", "core", "embedded"]),
    ("data", ["data"]),
    ("engine", ["engine"]),
    ("stages", ["stages"]),
    ("publish", ["publish"]),
    ("jobs", ["pipeline"]),
    ("commands", ["train", "evaluate", "export", "embedded.build"]),
]
# Command modules import the rest only after checking for an mlx backend (`--help` and
# config errors need none), so their package imports may sit inside functions.
LAZY_IMPORTS_ALLOWED = {"train", "evaluate", "export"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(name: str) -> int:
    """The layer of the longest listed prefix of `name` (KeyError: none is listed)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        for number, (_, members) in enumerate(LAYERS):
            if prefix in members:
                return number
    raise KeyError(name)


def package_imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, inside a function?) for each import of the package's own modules."""
    name = module_name(path)
    here = (
        name.split(".")
        if path.name == "__init__.py" and name != "__init__"
        else name.split(".")[:-1]
    )
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(
                child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
            )
            targets: list[str] = []
            if isinstance(child, ast.ImportFrom) and child.level:
                base = here[: len(here) - (child.level - 1)]
                if child.module:
                    targets = [".".join([*base, child.module])]
                else:
                    targets = [".".join([*base, alias.name]) for alias in child.names]
            elif isinstance(child, ast.ImportFrom) and (child.module or "").startswith("mipo_mlx"):
                module = child.module.split(".", 1)[1] if "." in child.module else ""
                targets = [module] if module else [alias.name for alias in child.names]
            elif isinstance(child, ast.Import):
                targets = [
                    a.name.split(".", 1)[1] for a in child.names if a.name.startswith("mipo_mlx.")
                ]
            found.extend((t, in_function) for t in targets)
            visit(child, nested)

    visit(ast.parse(path.read_text(encoding="utf-8")), False)
    return found


def import_graph() -> dict[str, list[tuple[str, bool]]]:
    return {module_name(p): package_imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_has_a_layer():
    missing = [name for name in import_graph() if _no_layer(name)]
    assert not missing, (
        f"place these modules in a layer (tests/test_layers.py and README.md): {missing}"
    )


def _no_layer(name: str) -> bool:
    try:
        layer_of(name)
    except KeyError:
        return True
    return False


def test_imports_go_down_the_layers():
    upward = [
        f"{name} ({LAYERS[layer_of(name)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
        for name, imports in import_graph().items()
        for target, _ in imports
        if layer_of(target) > layer_of(name)
    ]
    assert not upward, upward


def test_no_import_cycles():
    graph = {name: {t for t, _ in imports if t != name} for name, imports in import_graph().items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def walk(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt] if nxt in path else [node, nxt]
            if nxt not in state:
                cycle = walk(nxt, [*path, nxt])
                if cycle:
                    return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = walk(start, [start])
            assert cycle is None, " -> ".join(cycle)


def test_package_imports_inside_functions_only_in_commands():
    lazy = [
        f"{name} imports {target} inside a function"
        for name, imports in import_graph().items()
        for target, in_function in imports
        if in_function and name not in LAZY_IMPORTS_ALLOWED
    ]
    assert not lazy, lazy


def test_the_check_can_fail():
    """A module of the data layer that imported a stage would be reported; a module outside
    every listed package has no layer."""
    assert layer_of("stages.pairs") > layer_of("data.prompts")
    assert layer_of("data.tasks.extract") == layer_of("data") == 1
    assert layer_of("embedded.build") > layer_of("embedded") == 0
    with pytest.raises(KeyError):
        layer_of("no_such_module")


def test_every_package_folder_is_listed():
    """A new folder of modules must be given a layer, not left to a top-level default."""
    folders = {p.parent.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("__init__.py")}
    tops = {f.split("/")[0] for f in folders if f != "."}
    listed = {m for _, members in LAYERS for m in members}
    assert tops <= listed, sorted(tops - listed)


def test_readme_lists_the_same_layers():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("<!-- layers -->", 2)[1]
    listed = re.findall(r"^\d+\. \*\*(\w+)\*\*: (.+)$", block, flags=re.MULTILINE)
    assert [(layer, [m.strip(" `") for m in members.split(",")]) for layer, members in listed] == [
        (layer, members) for layer, members in LAYERS
    ]


def test_package_docstring_lists_the_same_layers():
    import mipo_mlx

    rows: list[list[str]] = []
    for line in mipo_mlx.__doc__.split("layer above):", 1)[1].splitlines():
        if line.startswith(" ") and rows:  # goes on with the layer above
            rows[-1] += line.split()
        elif line.strip():
            rows.append(line.split())
    assert [(row[0], row[1:]) for row in rows] == [(layer, members) for layer, members in LAYERS]


@pytest.mark.parametrize("command", sorted(LAZY_IMPORTS_ALLOWED))
def test_command_help_imports_no_mlx(command):
    """Why the commands may import lazily: their --help needs no mlx backend."""
    import subprocess
    import sys

    code = (
        "import runpy, sys\n"
        f"sys.argv = ['{command}', '--help']\n"
        "try:\n"
        f"    runpy.run_module('mipo_mlx.{command}', run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(sorted(m for m in sys.modules if m == 'mlx' or m.startswith(('mlx.', 'mlx_lm'))))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
