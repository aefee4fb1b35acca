"""The package's structure: imports run one way, the training path never imports the tools.

The import graph is read from the source with `ast` (imports inside functions included, since a
back-edge hidden in a function is still a cycle), so a cycle fails here even where Python's lazy
imports would let it run.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "accel_tp"

# Top to bottom: a module may import only modules of a lower layer (or of its own layer's
# leaves below it in this table). Entry points -> launch -> trainer -> components -> config.
LAYERS: list[set[str]] = [
    {"tools.bench", "tools.commbench", "tools.profile", "tools.block_mask"},
    {"tools.shared_gpu"},
    {"tools.common"},
    {"cli"},
    {"launch"},
    {"trainer"},
    {"modes"},
    {"export", "reporting"},
    {
        "data.cache",
        "data.loader",
        "parallelize",
        "checkpoint.local",
        "checkpoint.ray",
        "compile_cache",
        "metrics",
        "placement",
        "evaluation",
        "lora",
    },
    {"checkpoint.universal", "checkpoint.base"},
    {"checkpoint.rules"},
    {"checkpoint.format"},
    {"data.tokenize"},
    {"data.sources", "data.packing"},
    {"model"},
    {"parallel"},
    {"families"},
    {"run_folder"},
    {"corpus", "storage", "chat"},
    {"config", "env"},
    {
        "compat.accelerate",
        "compat.deepspeed",
        "compat.liger",
        "compat.ray",
        "compat.torch",
        "compat.transformers",
        "checkpoint.safe_load",
        "vocab_parallel",
        "sequence_parallel",
        "experts",
        "stopping",
        "staged_gloo",
    },
    {"errors"},
]


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG).with_suffix("")
        if rel.name == "__init__":
            continue
        mods[".".join(rel.parts)] = path
    return mods


def _imports(name: str, path: Path) -> set[str]:
    """accel_tp modules that `name` imports anywhere in its source."""
    pkg_parts = name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg_parts[: len(pkg_parts) - node.level + 1]
                target = [*base, *(node.module.split(".") if node.module else [])]
            elif node.module and node.module.split(".")[0] == "accel_tp":
                target = node.module.split(".")[1:]
            else:
                continue
            prefix = ".".join(target)
            for alias in node.names:  # `from . import x` / `from .tools import bench`
                found.add(f"{prefix}.{alias.name}" if prefix else alias.name)
            found.add(prefix)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "accel_tp":
                    found.add(".".join(alias.name.split(".")[1:]))
    mods = _modules()
    return {m for m in found if m in mods and m != name}


def graph() -> dict[str, set[str]]:
    return {name: _imports(name, path) for name, path in _modules().items()}


def test_every_module_has_a_layer():
    layered = set().union(*LAYERS)
    assert set(_modules()) == layered, "add new modules to LAYERS"


def test_no_import_cycle():
    g = graph()
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(g[node]):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep) :] + [dep] if dep in stack else [node, dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, [*stack, dep])
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node, [node])


def test_imports_run_down_the_layers():
    layer = {m: i for i, group in enumerate(LAYERS) for m in group}
    upward = [
        f"{mod} imports {dep}" for mod, deps in graph().items() for dep in deps if layer[dep] <= layer[mod]
    ]
    assert not upward, "imports must run one way (entry points -> launch -> trainer -> ...):\n" + "\n".join(
        upward
    )


def test_training_path_never_imports_the_tools():
    bad = [
        f"{mod} imports {dep}"
        for mod, deps in graph().items()
        if not mod.startswith("tools.")
        for dep in deps
        if dep.startswith("tools")
    ]
    assert not bad, bad


def test_cycle_detector_sees_a_function_level_back_edge(tmp_path, monkeypatch):
    """The check must catch the knot this layout replaced: a back-edge hidden inside a function."""
    pkg = tmp_path / "accel_tp"
    pkg.mkdir()
    (pkg / "a.py").write_text("from .b import x\n")
    (pkg / "b.py").write_text("def x():\n    from .a import y\n")
    monkeypatch.setattr(sys.modules[__name__], "PKG", pkg)
    assert graph() == {"a": {"b"}, "b": {"a"}}
    with pytest.raises(pytest.fail.Exception, match="import cycle"):
        test_no_import_cycle()


def test_each_module_imports_on_its_own():
    """Every module imports with no accel_tp module loaded before it (nothing relies on import order)."""
    code = (
        "import importlib, sys\n"
        "for name in sys.argv[1:]:\n"
        "    for m in [m for m in sys.modules if m.startswith('accel_tp')]:\n"
        "        del sys.modules[m]\n"
        "    importlib.import_module('accel_tp.' + name)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, *sorted(_modules())],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
