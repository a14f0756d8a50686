"""The package's layering: folders that say what lives where, imports that flow down.

docs/architecture.md draws the same picture; its "Layers" says what each unit holds.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "cldpd_magic"

#: The package's units from the top down: a folder (magics/, runs/, ...) or a module at
#: the top of the package (cli.py, errors.py, ...). A module may import, at load time or
#: lazily in a function, modules of its own unit and of units below it. Imports under
#: ``if TYPE_CHECKING:`` (for annotations only) are not counted.
UNITS = [
    "sdk",  # the Claude Agent SDK's transport into a pod (an optional extra)
    "magics",  # the IPython front end, one module per topic
    "picker",  # the ipywidgets front end
    "cli",  # the cldpd command
    "arguments",  # argument types both front ends read
    "runs",  # one run, whatever the engine: session, batch, dispatcher, egress
    "render",  # typed events -> text and HTML
    "engines",  # the Runner protocol, the engines setting; docker/, swarm/
    "pods",  # what a pod is: model, pod.json, discovery, templates
    "stream_json",  # Claude Code's stream-json as typed events: read by runs and render
    "events",  # what a run reports (events, states, usage): read by runs and render
    "secrets",
    "logs",
    "errors",
]
#: Inside engines/, the same rule one level down.
ENGINE_PARTS = ["multi", "setting", "swarm", "docker", "protocol"]
#: The scripted model server stands apart: it imports nothing of the package.
STANDALONE = {"model_server"}
#: Only these folders import docker-py.
DOCKER_FOLDERS = {("engines", "docker"), ("engines", "swarm")}

Parts = tuple[str, ...]


def _modules() -> dict[Parts, Path]:
    """Every module of the package by its dotted parts: ``("runs", "session")``.

    Python files in folders without ``__init__.py`` (``data/``: what runs in a container)
    are data, not modules.
    """
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        folders = [PACKAGE.joinpath(*parts[:i]) for i in range(1, len(parts))]
        if all((folder / "__init__.py").exists() for folder in folders):
            found[parts] = path
    return found


MODULES = _modules()


def _is_package(parts: Parts, modules: dict[Parts, Path]) -> bool:
    return parts == () or (*parts, "__init__") in modules


def _imports(parts: Parts, modules: dict[Parts, Path] = MODULES) -> list[tuple[Parts, str, int]]:
    """(imported module or package, "load" or "lazy", line) for each package import.

    ``from .x import name`` imports module (or package) ``x``; ``from . import x`` imports
    ``x`` if it is a module or package, else the package itself. Imports under
    ``if TYPE_CHECKING:`` are left out.
    """
    package = parts[:-1]
    found: list[tuple[Parts, str, int]] = []

    def resolve(node: ast.ImportFrom) -> list[Parts]:
        base = package[: len(package) - node.level + 1]
        if node.module:
            return [(*base, *node.module.split("."))]
        subs = [(*base, alias.name) for alias in node.names]
        return [sub if sub in modules or _is_package(sub, modules) else base for sub in subs]

    def visit(nodes: list[ast.stmt], lazy: bool) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse, lazy)
                continue
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                for target in resolve(node):
                    found.append((target, "lazy" if lazy else "load", node.lineno))
            inner = lazy or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            for field in ("body", "orelse", "finalbody", "handlers"):
                children = getattr(node, field, None)
                if isinstance(children, list):
                    visit([c for c in children if isinstance(c, ast.AST)], inner)

    visit(ast.parse(modules[parts].read_text(encoding="utf-8")).body, False)
    return found


def _unit(parts: Parts) -> str:
    return parts[0] if parts else ""


def _where(parts: Parts) -> str:
    return "/".join(parts) + ".py"


def test_plain_import_loads_neither_docker_nor_widgets():
    code = (
        "import sys, cldpd_magic, cldpd_magic.runs, cldpd_magic.engines, cldpd_magic.render\n"
        "print(sorted(m for m in ('docker', 'requests', 'ipywidgets', 'IPython')"
        " if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_only_engines_docker_and_swarm_import_docker():
    importers = set()
    for parts, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            if any(n == "docker" or n.startswith("docker.") for n in names):
                importers.add(parts)
    assert sorted(_where(p) for p in importers if p[:2] not in DOCKER_FOLDERS) == []
    assert {p[:2] for p in importers} == DOCKER_FOLDERS


def upward_imports(modules: dict[Parts, Path]) -> list[str]:
    """Imports of a unit above (or beside) the importer's own."""
    upward = []
    for parts in modules:
        own = _unit(parts)
        if parts == ("__init__",) or own in STANDALONE:
            continue
        for target, how, line in _imports(parts, modules):
            other = _unit(target)
            if other == own or (target == () and own == "cli"):  # cli: __version__
                continue
            if other not in UNITS or UNITS.index(other) <= UNITS.index(own):
                upward.append(f"{_where(parts)}:{line} imports {'.'.join(target)} ({how})")
    return upward


def test_every_module_has_a_unit_and_imports_only_below_it():
    units = {_unit(p) for p in MODULES if p != ("__init__",)}
    assert units - STANDALONE <= set(UNITS), "give each new folder or module its place in UNITS"
    assert upward_imports(MODULES) == []


def test_inside_engines_imports_flow_down():
    upward = []
    for parts in MODULES:
        if _unit(parts) != "engines" or parts[1] == "__init__":
            continue
        own = parts[1]
        for target, how, line in _imports(parts):
            if _unit(target) != "engines" or len(target) < 2 or target[1] == own:
                continue
            if ENGINE_PARTS.index(target[1]) <= ENGINE_PARTS.index(own):
                upward.append(f"{_where(parts)}:{line} imports {'.'.join(target)} ({how})")
    assert upward == []


def files_reached_into(modules: dict[Parts, Path]) -> list[str]:
    """Imports of a folder's file from outside that folder."""
    reaching_in = []
    for parts in modules:
        for target, _how, line in _imports(parts, modules):
            folder = target[:-1]
            if target in modules and folder and parts[: len(folder)] != folder:
                reaching_in.append(f"{_where(parts)}:{line} imports {'.'.join(target)}")
    return reaching_in


def test_modules_outside_a_folder_import_the_folder_not_its_files():
    assert files_reached_into(MODULES) == []


def test_no_import_cycle_at_load_time():
    graph = {
        parts: {t if t in MODULES else (*t, "__init__") for t, how, _ in _imports(parts)
                if how == "load"}
        for parts in MODULES
    }  # fmt: skip
    done: set[Parts] = set()
    cycles = []

    def visit(node: Parts, stack: list[Parts]) -> None:
        for dep in sorted(graph.get(node, ())):
            if dep in stack or dep == node:
                cycles.append(" -> ".join(".".join(p) for p in [*stack, node, dep]))
            elif dep not in done:
                visit(dep, [*stack, node])
        done.add(node)

    for node in sorted(graph):
        if node not in done:
            visit(node, [])
    assert cycles == []


def test_the_model_server_stands_alone():
    for parts in MODULES:
        if _unit(parts) in STANDALONE:
            assert [t for t, _h, _l in _imports(parts) if _unit(t) not in STANDALONE] == []


def test_the_rules_see_an_upward_import_and_a_file_reached_into(tmp_path):
    files = {
        "__init__.py": "",
        "runs/__init__.py": "from .session import Session\n",
        "runs/session.py": "def f():\n    from ..magics.run import CldpdMagics\n",
        "magics/__init__.py": "",
        "magics/run.py": "from ..runs.session import Session\n",
        "render/views.py": "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from ..runs import Session\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    modules = {p.relative_to(tmp_path).with_suffix("").parts: p for p in tmp_path.rglob("*.py")}
    assert upward_imports(modules) == ["runs/session.py:2 imports magics.run (lazy)"]
    assert files_reached_into(modules) == [
        "magics/run.py:1 imports runs.session",
        "runs/session.py:2 imports magics.run",
    ]
