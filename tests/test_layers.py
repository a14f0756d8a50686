"""The package's layering: imports flow down, and only the Docker runner loads docker-py."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "cldpd_magic"


def test_plain_import_loads_neither_docker_nor_requests():
    code = (
        "import sys, cldpd_magic, cldpd_magic.dispatcher, cldpd_magic.protocol\n"
        "print(sorted(m for m in ('docker', 'requests', 'ipywidgets') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_only_the_docker_runner_imports_docker():
    importers = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            if any(n == "docker" or n.startswith("docker.") for n in names):
                importers.add(path.name)
    assert importers == {
        "runner.py",  # DockerRunner, composed of the pieces below
        "docker_engine.py",  # clients, the private-API adapter, docker-py errors as ours
        "docker_images.py",  # image builds
        "docker_containers.py",  # containers: create, run, inspect, logs
        "docker_exec.py",  # exec and the graceful stop
        "docker_networks.py",  # networks for egress
        "swarm.py",  # SwarmRunner: services, tasks and secrets through the manager's API
    }


#: The package's modules from the top layer down (docs/architecture.md draws them): a
#: module may import, at load time or lazily in a function, only modules below it.
#: ``testing`` (the scripted model server) stands alone and imports none of them.
LAYERS = [
    "magics", "magics_batch", "magics_inventory", "magic_support",
    "widgets",
    "cli",
    "dispatcher", "blocking", "jobs", "run_registry", "agent", "batch",
    "engines", "swarm",
    "runner", "docker_exec", "docker_images", "docker_networks", "docker_containers",
    "docker_engine",
    "render",
    "session", "usage",
    "egress",
    "protocol",
    "scaffold",
    "pods", "egress_policy",
    "secrets", "logs", "errors",
]  # fmt: skip


def _package_imports(path: Path) -> set[str]:
    """The package modules a file imports, at load time or in a function (not for typing)."""
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                found.update([node.module.split(".")[0]] if node.module else
                             [alias.name for alias in node.names])  # fmt: skip
            for field in ("body", "orelse", "finalbody", "handlers"):
                children = getattr(node, field, None)
                if isinstance(children, list):
                    visit([c for c in children if isinstance(c, ast.AST)])

    visit(ast.parse(path.read_text(encoding="utf-8")).body)
    return found - {"__version__"}


def test_every_module_has_a_layer_and_imports_only_below_it():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "testing"}
    assert modules == set(LAYERS), "give each new module its place in LAYERS"
    upward = []
    for name in LAYERS:
        for imported in sorted(_package_imports(PACKAGE / f"{name}.py")):
            if LAYERS.index(imported) <= LAYERS.index(name):
                upward.append(f"{name} imports {imported}")
    assert upward == []
    assert _package_imports(PACKAGE / "testing.py") == set()
