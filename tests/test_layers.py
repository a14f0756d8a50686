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
