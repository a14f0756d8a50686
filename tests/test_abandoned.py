"""A run whose client was killed (``kill -9`` of ``cldpd``, a crashed kernel) still ends on
time, and the next cldpd process removes what it left: the ended container and its egress.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cldpd_magic import Dispatcher
from cldpd_magic.engines.protocol import LABEL_CLIENT, client_gone, this_client
from cldpd_magic.runs.egress import LABEL_EGRESS_OF

pytestmark = [pytest.mark.docker, pytest.mark.timeout(300)]

URL = "https://github.com/o/r/issues/1"
EGRESS_BASE = "cldpd-debian:bookworm"


def test_this_process_is_alive_and_a_finished_one_is_gone():
    assert not client_gone(this_client())
    code = "from cldpd_magic.engines import this_client; print(this_client())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip()  # fmt: skip
    assert done.split("/")[1] != str(os.getpid())
    assert client_gone(done)
    assert not client_gone("another-host/1/1")  # nothing can be told of it here
    assert not client_gone("")


def wait_for(what, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if what():
            return True
        time.sleep(0.5)
    return False


def test_a_run_whose_client_was_killed_ends_on_time_and_is_swept(
    docker_client, make_pod, pods_dir: Path, transcript_dir: Path, monkeypatch
):
    monkeypatch.setenv("CLDPD_EGRESS_BASE", EGRESS_BASE)
    name = make_pod(
        "trap 'echo interrupted; exit 130' INT\necho agent-up\nwhile :; do sleep 1; done",
        pod_json={"network": {"allow": []}, "timeoutSeconds": 20},
    )
    container = f"cldpd-{name}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cldpd_magic.cli", "--pods-dir", str(pods_dir),
         "start", name, "--issue", URL],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1",
             "CLDPD_SESSIONS_DIR": str(transcript_dir)},
    )  # fmt: skip
    try:
        assert wait_for(lambda: "agent-up" in docker_logs(docker_client, container), 240)
        started = time.monotonic()
        proc.send_signal(signal.SIGKILL)  # no handler runs: nobody stops the run now
        proc.wait(timeout=30)
        info = docker_client.containers.get(container)
        assert client_gone(info.labels[LABEL_CLIENT])
        # The container's own deadline (20 s and a grace) ends the agent with SIGINT.
        assert wait_for(lambda: status(docker_client, container) == "exited", 120)
        ended_after = time.monotonic() - started
        assert "interrupted" in docker_logs(docker_client, container)
        egress = f"{LABEL_EGRESS_OF}={container}"
        assert docker_client.containers.list(all=True, filters={"label": egress})  # left behind
        # Any later cldpd process finds and removes it all.
        listed = Dispatcher(pods_dir, transcript_dir=transcript_dir).running()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert ended_after < 60, ended_after  # without the deadline it would run on for good
    assert container not in [r.container for r in listed]
    assert status(docker_client, container) == ""
    assert docker_client.containers.list(all=True, filters={"label": egress}) == []
    assert docker_client.networks.list(filters={"label": egress}) == []


def docker_logs(docker_client, container: str) -> str:
    import docker.errors

    try:
        return docker_client.containers.get(container).logs().decode(errors="replace")
    except docker.errors.NotFound:
        return ""


def status(docker_client, container: str) -> str:
    import docker.errors

    try:
        return docker_client.containers.get(container).status
    except docker.errors.NotFound:
        return ""


def test_a_live_clients_ended_run_is_not_swept(docker_client, make_pod, pods_dir, transcript_dir):
    """The control: an ended run of a live process is that process's to remove."""
    from cldpd_magic.engines.docker.runner import DockerRunner
    from cldpd_magic.runs.registry import LABEL_KEEP_ALIVE, LABEL_POD, sweep_abandoned

    name = make_pod("true")
    container = docker_client.containers.create(
        "busybox:latest", ["true"], name=f"cldpd-{name}",
        labels={LABEL_POD: name, LABEL_KEEP_ALIVE: "false", LABEL_CLIENT: this_client()},
    )  # fmt: skip
    try:
        container.start()
        container.wait(timeout=30)
        runner = DockerRunner()
        assert sweep_abandoned(runner, runner.list(f"{LABEL_POD}={name}")) == []
        assert status(docker_client, container.name) == "exited"
    finally:
        container.remove(force=True)
