"""The layers of the project, and that no import runs back up them.

    contract  <-  client  <-  frontend (the service), musetalk_pipecat (Pipecat's avatar service)
    contract  <-  export
    contract, client  <-  triton_local (the local server)
    everything  <-  stack (the launchers), benchmarks, tests
"""
from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from support import ROOT

PACKAGES = ("contract", "client", "export", "triton_local", "frontend", "stack", "benchmarks", "musetalk_pipecat")
ALLOWED = {
    "contract": set(),
    "client": {"contract"},
    "export": {"contract"},
    "triton_local": {"contract", "client"},
    "frontend": {"contract", "client"},
    "musetalk_pipecat": {"contract", "client"},
    "stack": {"contract", "client", "export", "triton_local"},
    "benchmarks": {"contract", "client", "export", "triton_local", "frontend", "stack", "musetalk_pipecat"},
}
HEAVY = ("torch", "onnx", "onnxruntime", "openvino", "transformers", "diffusers", "export", "triton_local")


def project_imports(package: str) -> dict[str, set[str]]:
    """Every project package each module of `package` imports (at any depth in the file)."""
    found = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = (names & set(PACKAGES)) - {package}
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_runs_back_up_the_layers(package):
    wrong = {module: names - ALLOWED[package] for module, names in project_imports(package).items()
             if names - ALLOWED[package]}
    assert not wrong, f"{package} may import only {sorted(ALLOWED[package])}: {wrong}"


@pytest.mark.parametrize("module", ["frontend.app", "client", "client.sessions", "contract.specs",
                                    "contract.layout", "contract.runners"])
def test_the_service_and_the_sdk_load_nothing_heavy(module):
    """Importing the service (or the SDK) in a fresh interpreter loads no deep-learning
    framework, no exporter and no local server."""
    probe = (f"import sys, {module}; "
             f"print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"importing {module} loads {out.stdout.strip()}"


def module_graph() -> dict[str, set[str]]:
    """Which project modules each project module imports, at any depth in the file (an import
    inside a function to dodge a cycle is still the cycle)."""
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
               for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            imported |= {t for t in targets if t in modules}
        graph[name] = imported - {name}
    return graph


def test_no_module_imports_itself_round_a_circle():
    """Modules import each other in one direction only: a circle means neither can be read,
    tested or loaded without the other (and an import hidden in a function to dodge one)."""
    graph = module_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    circles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                circles.append(" -> ".join(path[path.index(target):] + [module, target]) if target in path
                               else f"{module} -> {target}")
            elif target not in state:
                visit(target, path + [module])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert not circles, "import circles:\n" + "\n".join(circles)
