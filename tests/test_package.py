"""The package as a whole: what `import normx_callbacks` does (nothing to the user's plotting
backend, no Lightning for the reports), every module importable without the demo, no private
name crossing a module, no import cycle, and every public name resolving."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import normx_callbacks

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "normx_callbacks"
LIBRARY = sorted(p for p in PACKAGE.glob("*.py"))  # the library; demo/ is the example job


def test_import_keeps_the_backend_needs_no_lightning_and_no_module_imports_the_demo():
    code = """
import importlib, pkgutil, sys
import matplotlib
matplotlib.use("module://custom")
import normx_callbacks as p
import normx_callbacks.cli
light = sorted(m for m in sys.modules if m.split(".")[0] in ("lightning", "pytorch_lightning"))
names = [m.name for m in pkgutil.iter_modules(p.__path__, "normx_callbacks.")
         if m.name not in ("normx_callbacks.demo", "normx_callbacks.trainer_callback")]
for name in names:
    importlib.import_module(name)
demo = sorted(m for m in sys.modules if m.startswith("normx_callbacks.demo"))
print(matplotlib.get_backend(), len(light), len(names), demo)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    backend, lightning, count, demo = proc.stdout.split(maxsplit=3)
    assert backend == "module://custom"  # drawing selects no backend, importing neither
    assert lightning == "0"  # `normx` and the package import start without Lightning
    # The demo's model class is a default named by spec, imported when a checkpoint needs it.
    assert int(count) >= 30 and demo.strip() == "[]"


def _imports(path: Path):
    """(module, names, level, at top level?) of each relative import in ``path``."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            yield node.module, [a.name for a in node.names], id(node) in top


def test_no_private_name_crosses_a_module():
    crossing = [f"{path.name}: from .{module} import {name}"
                for path in LIBRARY for module, names, _ in _imports(path)
                for name in names if name.startswith("_")]
    assert crossing == []


def test_module_level_imports_have_no_cycle():
    graph = {path.stem: {dep for module, names, top in _imports(path) if top
                         for dep in ([module.split(".")[0]] if module else names)}
             for path in LIBRARY}
    graph = {name: {m for m in deps if m in graph} for name, deps in graph.items()}
    assert "engine" in graph and graph["engine"]  # the scan sees the package's imports
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> list[str] | None:
        state[name] = 1
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                return path + [name, dep]
            if dep not in state and (cycle := visit(dep, path + [name])):
                return cycle
        state[name] = 2
        return None

    cycles = [c for name in sorted(graph) if name not in state and (c := visit(name, []))]
    assert cycles == []


def test_every_public_name_resolves_and_unknown_names_say_so():
    for name in normx_callbacks.__all__:
        assert getattr(normx_callbacks, name) is not None, name
        assert name in dir(normx_callbacks)
    from normx_callbacks.callback import NormXLogitCallback

    assert normx_callbacks.NormXLogitCallback is NormXLogitCallback
    with pytest.raises(AttributeError, match="has no attribute 'NormXLogitCallbak'"):
        normx_callbacks.NormXLogitCallbak  # noqa: B018
