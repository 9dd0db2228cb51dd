"""The package's layers import downwards only: no import cycle, nothing below the CLI imports it."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "brainenc"


def _modules() -> list[str]:
    names = []
    for p in sorted(PACKAGE.rglob("*.py")):
        parts = p.relative_to(PACKAGE.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def _import_froms(module: str):
    """Every ``from X import names`` in ``module`` (module level or inside functions), as
    (absolute X, node)."""
    path = PACKAGE.parent / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = PACKAGE.parent / module.replace(".", "/") / "__init__.py"
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            yield ".".join(base + ([node.module] if node.module else [])), node
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, None


def _imports(module: str) -> set[str]:
    """brainenc modules ``module`` imports anywhere."""
    found = set()
    for target, node in _import_froms(module):
        found |= {target} | ({f"{target}.{a.name}" for a in node.names} if node else set())
    return {n for n in found if n in set(_modules())}


# what each layer must not import (lower layers never reach up)
FORBIDDEN = {
    "brainenc.ioutil": ("brainenc.",),
    "brainenc.data": ("brainenc.models", "brainenc.features", "brainenc.lit", "brainenc.cli", "brainenc.recipes"),
    "brainenc.models": ("brainenc.features", "brainenc.lit", "brainenc.cli", "brainenc.recipes", "brainenc.sweep"),
    "brainenc.features": ("brainenc.lit", "brainenc.cli", "brainenc.recipes", "brainenc.sweep"),
    "brainenc.metrics": ("brainenc.lit", "brainenc.cli", "brainenc.recipes", "brainenc.reports"),
    "brainenc.lit": ("brainenc.cli", "brainenc.recipes", "brainenc.sweep", "brainenc.reports"),
    "brainenc.results": ("brainenc.reports", "brainenc.cli", "brainenc.recipes", "brainenc.sweep"),
    "brainenc.rundir": ("brainenc.cli", "brainenc.recipes", "brainenc.sweep"),
}


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_no_upward_import(layer):
    bad = sorted((m, dep) for m in _modules() if m == layer or m.startswith(layer + ".")
                 for dep in _imports(m) if any(dep.startswith(f) for f in FORBIDDEN[layer]))
    assert bad == []


def test_no_import_cycle():
    graph = {m: _imports(m) - {m} for m in _modules()}
    # a package importing its own submodules is not a cycle of concepts
    graph = {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in graph.items()}
    cycles, state = [], {}

    def visit(m, stack):
        state[m] = "open"
        for d in sorted(graph.get(m, ())):
            if state.get(d) == "open":
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m, [m])
    assert cycles == []


FIRST = ["brainenc.features.cache", "brainenc.models.experts", "brainenc.lit.encoder_module",
         "brainenc.cli", "brainenc.results", "brainenc.rundir"]
#: One interpreter imports each module as the first of brainenc: before each, every brainenc
#: module is dropped from sys.modules (third-party ones stay, so torch and Lightning are imported
#: once, not six times); a cycle among brainenc's modules depends only on which is imported first
_IMPORT_FIRST = """
import importlib, json, sys, traceback
out = {}
for module in sys.argv[1:]:
    for name in [n for n in sys.modules if n == "brainenc" or n.startswith("brainenc.")]:
        del sys.modules[name]
    try:
        importlib.import_module(module)
        out[module] = ""
    except Exception:
        out[module] = traceback.format_exc()
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def imported_first() -> dict[str, str]:
    """{module: "" or the traceback of importing it first}."""
    import json

    proc = subprocess.run([sys.executable, "-c", _IMPORT_FIRST, *FIRST], capture_output=True, text=True,
                          cwd=PACKAGE.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", FIRST)
def test_module_imports_first_in_a_fresh_interpreter(module, imported_first):
    """Imported first, before anything else of brainenc (a module-level cycle through it would
    fail here); the modules that once closed a cycle, and the two run-directory owners."""
    assert imported_first[module] == "", imported_first[module]


def test_every_import_of_a_brainenc_name_resolves():
    """Imports inside functions run only when the function does: check each named import here, so a
    name moved to another module cannot leave a lazy import behind that fails later."""
    import importlib

    missing = []
    for m in _modules():
        for target, node in _import_froms(m):
            if node is None or not target.startswith("brainenc"):
                continue
            module = importlib.import_module(target)
            missing += [f"{m}: {target}.{a.name}" for a in node.names
                        if not hasattr(module, a.name) and f"{target}.{a.name}" not in _modules()]
    assert missing == []
