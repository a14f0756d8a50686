"""Shared fixtures: pods made on the fly, the real Docker engine, leak checks."""

from __future__ import annotations

import contextlib
import os
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

BASE_IMAGE = "busybox:latest"
REPO = Path(__file__).resolve().parent.parent
EXAMPLE_PODS = REPO / "examples" / "pods"


#: Fixtures that reach the real engine: a test using one, directly or through another
#: fixture, is marked ``docker`` (so ``scripts/test --fast`` never collects it).
ENGINE_FIXTURES = frozenset({"docker_client", "build_containers"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that uses an engine fixture as a docker test."""
    for item in items:
        if ENGINE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.docker)


def _docker_client():
    import docker

    try:
        client = docker.from_env()
        client.ping()
        client.images.get(BASE_IMAGE)
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"
    return client, ""


@pytest.fixture(scope="session")
def docker_client():
    """A docker-py client of the real engine; fails (not skips) in CI when there is none."""
    client, why = _docker_client()
    if client is None:
        message = f"no usable Docker engine with {BASE_IMAGE} ({why}); run scripts/setup"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    yield client
    client.close()


@pytest.fixture
def build_containers(docker_client) -> Callable[[str], list[str]]:
    """``build_containers(marker)``: ids of the containers whose command holds marker.

    A build runs each ``RUN`` step in a container; a step echoing a marker finds them.
    """

    def find(marker: str) -> list[str]:
        containers = docker_client.api.containers(all=True)
        return [c["Id"] for c in containers if marker in c.get("Command", "")]

    return find


@pytest.fixture
def pods_dir(tmp_path: Path) -> Path:
    """An empty pods directory."""
    path = tmp_path / "pods"
    path.mkdir()
    return path


@pytest.fixture
def transcript_dir(tmp_path: Path) -> Path:
    """A transcript directory (tests never write under the real home)."""
    path = tmp_path / "sessions"
    path.mkdir()
    return path


@pytest.fixture(autouse=True)
def _no_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLDPD_SESSIONS_DIR", str(tmp_path / "home-sessions"))
    monkeypatch.setenv("CLDPD_PODS_DIR", str(tmp_path / "home-pods"))


@pytest.fixture
def ip(pods_dir: Path, transcript_dir: Path):
    """The IPython shell singleton with the extension loaded, pointed at tmp paths."""
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    config = Config()
    config.HistoryAccessor.enabled = False
    shell = InteractiveShell.instance(config=config)
    shell.config.CldpdMagics.pods_dir = str(pods_dir)
    shell.config.CldpdMagics.transcript_dir = str(transcript_dir)
    shell.config.CldpdMagics.flush_interval = 0.05
    shell.extension_manager.load_extension("cldpd_magic")
    yield shell
    shell.extension_manager.unload_extension("cldpd_magic")
    del shell.config["CldpdMagics"]


MakePod = Callable[..., str]


@pytest.fixture
def make_pod(pods_dir: Path, request: pytest.FixtureRequest) -> Iterator[MakePod]:
    """Create pods whose agent is a shell script; names are unique per test.

    ``make_pod(script, pod_json=None, template=None, name=None, dockerfile=None)`` writes
    ``<pods_dir>/<name>/`` with a Dockerfile ``FROM busybox`` that installs ``script`` as
    ``/usr/local/bin/claude``, and returns the pod name. After the test, every container
    ``cldpd-<name>`` still present fails the test (and is removed), and the images go.
    """
    made: list[str] = []

    def make(
        script: str = "echo hello",
        pod_json: dict | str | None = None,
        template: str | None = None,
        name: str | None = None,
        dockerfile: str | None = None,
    ) -> str:
        import json

        name = name or f"t{uuid.uuid4().hex[:10]}"
        pod = pods_dir / name
        pod.mkdir()
        (pod / "Dockerfile").write_text(
            dockerfile
            or f"FROM {BASE_IMAGE}\nCOPY claude /usr/local/bin/claude\n"
            "RUN chmod +x /usr/local/bin/claude\n"
        )
        (pod / "claude").write_text("#!/bin/sh\n" + textwrap.dedent(script).strip() + "\n")
        if pod_json is not None:
            text = pod_json if isinstance(pod_json, str) else json.dumps(pod_json)
            (pod / "pod.json").write_text(text)
        if template is not None:
            (pod / "template.md").write_text(template)
        made.append(name)
        return name

    yield make

    if not made:
        return
    client, _ = _docker_client()
    if client is None:
        return
    import docker.errors

    leaked = []
    for name in made:
        try:
            container = client.containers.get(f"cldpd-{name}")
        except docker.errors.NotFound:
            pass
        else:
            leaked.append(f"cldpd-{name} ({container.status})")
            container.remove(force=True)
        with contextlib.suppress(docker.errors.APIError):
            client.images.remove(f"cldpd-{name}".lower(), noprune=True)
    client.close()
    if leaked:
        pytest.fail(f"test left containers behind: {', '.join(leaked)}")
