"""The built wheel: what it holds, and a new user's first steps with only the wheel installed.

The install tests build the wheel, install it (and ipykernel) from PyPI into a fresh
virtual environment outside the checkout, and run everything from a home directory of
their own, with no file of this repository on the path: ``cldpd init`` of the offline
pod, a scripted model server started from the installed package, ``cldpd start``; then
in a real kernel of that environment ``%load_ext cldpd_magic``, ``%cldpd_new`` and
``%cldpd_start``. Each run must end with exit code 0.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakes import ISSUE_URL as URL

import cldpd_magic
from cldpd_magic.pods.scaffold import TEMPLATES_DIR

REPO = Path(__file__).resolve().parent.parent
#: The template a new user tries first: the real CLI against the scripted model.
OFFLINE = "claude-offline"
#: What the scripted model answers; the tests look for it in the output.
ANSWER = "Hello from the scripted model, through an installed wheel."
#: Files a wheel must never hold (tests, notebooks, the repository's own scaffolding).
FORBIDDEN = re.compile(
    r"(^|/)(tests?|notebooks|examples|scripts|bench|docs|\.ci)/|\.ipynb$|(^|/)conftest\.py$"
    r"|(^|/)test_[^/]*\.py$"
)


def run(cmd: list[str], timeout: float = 600, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing text output; fail the test with its output if it fails."""
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    if result.returncode != 0:
        pytest.fail(
            f"{' '.join(map(str, cmd))} exited with {result.returncode}\n"
            f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}"
        )
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel of this checkout, built as a release would be (pip, isolated build)."""
    out = tmp_path_factory.mktemp("wheel")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check",
         "-q", "-w", str(out), str(REPO)])  # fmt: skip
    (built,) = out.glob("cldpd_magic-*.whl")
    return built


def source_templates() -> dict[str, bytes]:
    """Every template file of the checkout, by its path in the wheel."""
    return {
        f"cldpd_magic/templates/{p.relative_to(TEMPLATES_DIR).as_posix()}": p.read_bytes()
        for p in TEMPLATES_DIR.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


@pytest.mark.wheel  # builds with pip in an isolated environment, which fetches from PyPI
def test_the_wheel_holds_every_template_file_and_no_test_or_notebook(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        packed = {n: archive.read(n) for n in names if n.startswith("cldpd_magic/templates/")}
        metadata = archive.read(
            f"cldpd_magic-{cldpd_magic.__version__}.dist-info/METADATA"
        ).decode()
        entry_points = archive.read(
            f"cldpd_magic-{cldpd_magic.__version__}.dist-info/entry_points.txt"
        ).decode()
    assert packed == source_templates()
    assert {"minimal", "claude-code"} <= {n.split("/")[2] for n in packed}
    assert [n for n in names if FORBIDDEN.search(n)] == []
    tops = {n.split("/")[0] for n in names}
    assert tops == {"cldpd_magic", f"cldpd_magic-{cldpd_magic.__version__}.dist-info"}
    assert f"\nVersion: {cldpd_magic.__version__}\n" in metadata
    assert "\nClassifier: Framework :: Jupyter\n" in metadata
    assert "\nKeywords: " in metadata
    assert "cldpd = cldpd_magic.cli:main" in entry_points


def test_the_offline_template_is_shipped():
    assert (TEMPLATES_DIR / OFFLINE / "Dockerfile").is_file(), (
        f"the {OFFLINE} template is missing from cldpd_magic/templates"
    )


# -- a new user, with only the wheel installed ------------------------------------------


@pytest.fixture(scope="module")
def fresh_venv(wheel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new virtual environment outside the checkout with the wheel and ipykernel."""
    venv = tmp_path_factory.mktemp("user") / "venv"
    run([sys.executable, "-m", "venv", str(venv)])
    run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
         "--disable-pip-version-check", str(wheel), "ipykernel"])  # fmt: skip
    return venv


@pytest.fixture
def user(fresh_venv, tmp_path) -> dict[str, str]:
    """The environment of a new user: a home of their own, the fresh venv first on PATH.

    Nothing of this checkout is on the path: no PYTHONPATH, no .venv, and commands run
    from the home directory.
    """
    home = tmp_path / "home"
    home.mkdir()
    drop = {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "IPYTHONDIR",
            "JUPYTER_PATH", "CLDPD_PODS_DIR", "CLDPD_SESSIONS_DIR"}  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in drop}
    path = [p for p in env.get("PATH", "").split(os.pathsep) if not p.startswith(str(REPO))]
    env.update(HOME=str(home), PATH=os.pathsep.join([str(fresh_venv / "bin"), *path]))
    env.update(PYTHONNOUSERSITE="1", ANTHROPIC_API_KEY="sk-ant-scripted")
    return env


def in_home(user: dict[str, str], *cmd: str, timeout: float = 600):
    return run(list(cmd), timeout=timeout, env=user, cwd=user["HOME"])


@pytest.fixture
def scripted_model(fresh_venv, user, tmp_path) -> Iterator[str]:
    """The scripted model server of the installed package, on 127.0.0.1; yields its URL."""
    scenario = tmp_path / "scenario.json"
    scenario.write_text(json.dumps({"turns": [{"text": ANSWER}]}))
    server = subprocess.Popen(
        [str(fresh_venv / "bin" / "python"), "-m", "cldpd_magic.model_server", "serve",
         "--host", "127.0.0.1", "--port", "0", "--scenario", str(scenario)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=user, cwd=user["HOME"],
    )  # fmt: skip
    try:
        line = server.stdout.readline()
        found = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
        if found is None:
            server.kill()
            pytest.fail(f"the scripted model did not start: {line}{server.stderr.read()}")
        yield found.group(1)
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(15)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        server.stdout.close()
        server.stderr.close()


def offline_base_image() -> str:
    """The image scripts/setup makes offline with the CLI version the template pins."""
    dockerfile = (TEMPLATES_DIR / OFFLINE / "Dockerfile").read_text()
    found = re.search(r"^ARG CLAUDE_CODE_VERSION=(\S+)", dockerfile, re.MULTILINE)
    assert found, f"the {OFFLINE} Dockerfile no longer pins CLAUDE_CODE_VERSION"
    return f"cldpd-claude-code:{found.group(1)}"


@pytest.fixture
def base_image(docker_client) -> str:
    """The offline base image for the offline pod (made by scripts/setup)."""
    import docker.errors

    image = offline_base_image()
    try:
        docker_client.images.get(image)
    except docker.errors.ImageNotFound:
        pytest.fail(f"no image {image}: run scripts/setup, which makes it offline")
    return image


def point_at(pod_dir: Path, url: str, base_image: str) -> None:
    """Edit a pod made from the offline template as its README says: the scripted
    model's address, and the offline base image (nothing is downloaded)."""
    config_path = pod_dir / "pod.json"
    config = json.loads(config_path.read_text())
    config.setdefault("env", {})["ANTHROPIC_BASE_URL"] = url
    config.setdefault("buildArgs", {})["BASE_IMAGE"] = base_image
    config_path.write_text(json.dumps(config, indent=2))


@pytest.fixture
def cleanup(docker_client) -> Iterator[list[str]]:
    """Pod names whose containers and images go after the test (a leftover container fails)."""
    import docker.errors

    names: list[str] = []
    yield names
    leaked = []
    for name in names:
        with contextlib.suppress(docker.errors.NotFound):
            container = docker_client.containers.get(f"cldpd-{name}")
            leaked.append(container.name)
            container.remove(force=True)
        with contextlib.suppress(docker.errors.APIError):
            docker_client.images.remove(f"cldpd-{name}", noprune=True)
    if leaked:
        pytest.fail(f"left containers behind: {', '.join(leaked)}")


@pytest.mark.docker
@pytest.mark.wheel
def test_a_new_user_starts_the_offline_pod_with_cldpd(
    user, fresh_venv, scripted_model, base_image, cleanup
):
    where = in_home(user, "python", "-c", "import cldpd_magic, sys; "
                    "print(cldpd_magic.__file__); print(*sys.path, sep='\\n')")  # fmt: skip
    assert where.stdout.startswith(str(fresh_venv))
    assert str(REPO) not in where.stdout
    version = in_home(user, "cldpd", "--version")
    assert version.stdout == f"cldpd {cldpd_magic.__version__}\n"
    pods = Path(user["HOME"]) / ".cldpd" / "pods"
    empty = in_home(user, "cldpd", "list")
    assert "make one with `cldpd init NAME`" in empty.stdout
    name = f"wheel-{uuid.uuid4().hex[:8]}"
    cleanup.append(name)
    made = in_home(user, "cldpd", "init", name, "--template", OFFLINE)
    assert made.stdout.startswith(f"Created pod '{name}' from template '{OFFLINE}' in {pods}")
    point_at(pods / name, scripted_model, base_image)
    started = in_home(user, "cldpd", "start", name, "--issue", URL)
    assert ANSWER in started.stdout


@pytest.mark.docker
@pytest.mark.kernel
@pytest.mark.wheel
def test_a_new_user_starts_a_pod_from_a_kernel(
    user, fresh_venv, scripted_model, base_image, cleanup
):
    from jupyter_client.kernelspec import KernelSpec
    from jupyter_client.manager import KernelManager

    spec = KernelSpec(
        argv=[str(fresh_venv / "bin" / "python"), "-m", "ipykernel_launcher",
              "-f", "{connection_file}"],
        display_name="fresh venv", language="python", resource_dir="",
    )  # fmt: skip

    class FreshVenvKernel(KernelManager):
        @property
        def kernel_spec(self) -> KernelSpec:
            return spec

    home = Path(user["HOME"])
    manager = FreshVenvKernel(connection_file=str(home / "kernel.json"))
    manager.start_kernel(env={**user, "IPYTHONDIR": str(home / ".ipython")}, cwd=str(home))
    client = manager.client()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=120)

        def cell(code: str, timeout: float = 600) -> str:
            texts: list[str] = []

            def keep(msg: dict) -> None:
                content = msg["content"]
                texts.append(content.get("text", ""))
                texts.append(str(content.get("data", {}).get("text/plain", "")))
                if msg["msg_type"] == "error":
                    texts.append(f"{content['ename']}: {content['evalue']}")

            reply = client.execute_interactive(code, timeout=timeout, output_hook=keep)
            shown = "".join(texts)
            assert reply["content"]["status"] == "ok", f"{code!r} failed:\n{shown[-4000:]}"
            assert "UsageError" not in shown, shown[-4000:]
            return shown

        cell("%load_ext cldpd_magic")
        assert "make one with %cldpd_new NAME" in cell("%cldpd_pods")
        name = f"wheel-{uuid.uuid4().hex[:8]}"
        cleanup.append(name)
        pods = home / ".cldpd" / "pods"
        made = cell(f"%cldpd_new {name} --template {OFFLINE}")
        assert made.startswith(f"Created pod '{name}' from template '{OFFLINE}' in {pods}")
        point_at(pods / name, scripted_model, base_image)
        shown = cell(f"s = %cldpd_start {name} {URL}\nassert s.exit_code == 0, s.exit_code\ns")
        assert ANSWER in shown
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
