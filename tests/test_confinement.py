"""Pods confined by Docker on the real engine: capabilities, no-new-privileges, read-only
root, and resource limits (CPU, memory with the out-of-memory line, processes)."""

from __future__ import annotations

import docker.errors
import pytest
from test_docker_dispatcher import IDLE, URL, container, output, until
from test_docker_runner import Text, opts, run

from cldpd_magic import Dispatcher, DockerRunner, Mount
from cldpd_magic.engines.docker.containers import LABEL_VOLUME_OF, out_of_memory_line
from cldpd_magic.pods import Resources
from cldpd_magic.runs.jobs import IDLE_COMMAND

pytestmark = [pytest.mark.docker, pytest.mark.timeout(180)]

STATUS = ["sh", "-c", "grep -E '^(CapEff|CapBnd|NoNewPrivs):' /proc/self/status"]
#: Bit 0 of a capability set is CAP_CHOWN.
ONLY_CHOWN = "0000000000000001"
NO_CAPS = "0000000000000000"
#: An agent that takes 200 MiB of memory (tail keeps its whole input line).
MEMORY_HOG = "head -c 200m /dev/zero | tail"
#: The hog volunteers to be the OOM killer's first choice (raising one's own score needs no
#: privilege): under load a second victim may be needed, and it must not be the agent.
FIRST_TO_GO = "echo 1000 > /proc/self/oom_score_adj; "

#: A busybox image whose agent is the non-root user ``agent`` with a home and a workdir,
#: holding files the image put there, as the Claude Code templates do (busybox's
#: /etc/passwd has the user ``agent``).
AGENT_USER_DOCKERFILE = """\
FROM busybox:latest
COPY claude /usr/local/bin/claude
RUN chmod +x /usr/local/bin/claude \\
    && mkdir -p /home/agent/.claude /home/agent/work \\
    && echo settings >/home/agent/.claude/settings.json && echo seed >/home/agent/work/seed \\
    && chown -R agent:agent /home/agent
USER agent
WORKDIR /home/agent/work
"""


@pytest.fixture
def runner(docker_client) -> DockerRunner:
    return DockerRunner()


@pytest.fixture
def image(runner, make_pod, pods_dir):
    """``image(script="...", **make_pod_kwargs) -> name``: a built pod image ``cldpd-<name>``."""

    def build(script: str = "echo hello", **kwargs) -> str:
        name = make_pod(script, **kwargs)
        runner.build(f"cldpd-{name}", str(pods_dir / name))
        return name

    return build


@pytest.fixture
def dispatcher(docker_client, pods_dir, transcript_dir) -> Dispatcher:
    return Dispatcher(pods_dir, DockerRunner(), transcript_dir)


def status(out: str) -> dict[str, str]:
    return dict(line.split(":\t") for line in out.splitlines())


class Inspected:
    """An ``on_start`` callback that keeps the container's inspect data while it runs."""

    def __init__(self, docker_client) -> None:
        self.client = docker_client
        self.attrs: dict = {}
        self.volume_labels: list[dict] = []

    def __call__(self, info) -> None:
        self.attrs = self.client.api.inspect_container(info.id)
        self.volume_labels = [
            self.client.api.inspect_volume(name)["Labels"] for name in self.volumes
        ]

    @property
    def volumes(self) -> list[str]:
        return [m["Name"] for m in self.attrs["Mounts"] if m["Type"] == "volume"]

    def mount_of(self, path: str) -> dict:
        (mount,) = [m for m in self.attrs["Mounts"] if m["Destination"] == path]
        return mount


def run_inspected(runner, docker_client, name: str, cmd: list[str], **kwargs):
    """Run like ``run`` and also return the container's inspect data from while it ran."""
    out, err, seen = Text(), Text(), Inspected(docker_client)
    code = runner.run(opts(name, cmd, **kwargs), out, err, on_start=seen)
    return code, out.value, err.value, seen


def assert_volumes_gone(docker_client, names: list[str]) -> None:
    for volume in names:
        with pytest.raises(docker.errors.NotFound):
            docker_client.volumes.get(volume)


def test_every_capability_is_dropped_and_privileges_cannot_be_gained(runner, image):
    name = image()
    code, out, _ = run(runner, name, STATUS)
    assert code == 0
    assert status(out) == {"CapEff": NO_CAPS, "CapBnd": NO_CAPS, "NoNewPrivs": "1"}


def test_cap_add_gives_back_only_what_the_pod_names(runner, image):
    name = image()
    chown = ["sh", "-c", "touch /tmp/f && chown 1:1 /tmp/f && echo chowned"]
    code, out, err = run(runner, name, chown)
    assert (code, out) == (1, "") and "Operation not permitted" in err
    assert run(runner, name, chown, cap_add=["CHOWN"])[:2] == (0, "chowned\n")
    code, out, _ = run(runner, name, STATUS, cap_add=["CHOWN"])
    assert status(out) == {"CapEff": ONLY_CHOWN, "CapBnd": ONLY_CHOWN, "NoNewPrivs": "1"}


def test_engine_records_the_hardening(runner, image, docker_client):
    name = image()
    code, _, _, seen = run_inspected(runner, docker_client, name, ["true"], cap_add=["NET_ADMIN"])
    host = seen.attrs["HostConfig"]
    assert code == 0
    assert (host["CapDrop"], host["CapAdd"]) == (["ALL"], ["NET_ADMIN"])
    assert host["SecurityOpt"] == ["no-new-privileges"]
    assert host["ReadonlyRootfs"] is False and not host.get("Tmpfs")
    assert (host["NanoCpus"], host["Memory"], host["PidsLimit"]) in [(0, 0, None), (0, 0, 0)]


def test_read_only_root_keeps_tmp_workdir_and_home_writable(runner, image, docker_client):
    name = image(dockerfile=AGENT_USER_DOCKERFILE)
    script = (
        "touch /x 2>/dev/null && echo root-writable; "
        "echo tmp >/tmp/t && echo wrote-tmp; "
        "cat seed && echo work >new && echo wrote-workdir; "
        "cat ~/.claude/settings.json && echo home >~/.claude.json && echo wrote-home; "
        "id -u; pwd; echo $HOME"
    )
    code, out, _, seen = run_inspected(
        runner, docker_client, name, ["sh", "-c", script], read_only_root=True
    )
    assert (code, out.split("\n")) == (
        0,
        ["wrote-tmp", "seed", "wrote-workdir", "settings", "wrote-home", "1000",
         "/home/agent/work", "/home/agent", ""],
    )  # fmt: skip
    host = seen.attrs["HostConfig"]
    assert host["ReadonlyRootfs"] is True
    assert host.get("Tmpfs") == {"/tmp": "rw,exec,nosuid,nodev,mode=1777"}
    # The home holds the workdir, so one volume keeps both writable.
    assert seen.mount_of("/home/agent")["Type"] == "volume"
    assert seen.volume_labels == [{LABEL_VOLUME_OF: f"cldpd-{name}"}]
    assert runner.inspect(f"cldpd-{name}") is None
    assert_volumes_gone(docker_client, seen.volumes)


def test_read_only_root_of_a_root_agent_with_its_own_workdir(runner, image, docker_client):
    name = image()
    script = "touch /etc/x 2>/dev/null || echo etc-read-only; touch w ~/h && pwd && echo $HOME"
    code, out, _, seen = run_inspected(
        runner, docker_client, name, ["sh", "-c", script], read_only_root=True, workdir="/srv"
    )
    assert (code, out) == (0, "etc-read-only\n/srv\n/root\n")
    assert sorted(m["Destination"] for m in seen.attrs["Mounts"]) == ["/root", "/srv"]
    assert_volumes_gone(docker_client, seen.volumes)


def test_read_only_root_uses_a_mount_on_the_workdir_as_it_is(
    runner, image, docker_client, tmp_path
):
    name = image()
    work = tmp_path / "work"
    work.mkdir()
    cmd = ["sh", "-c", "echo made-in-pod >file; cat /tmp/.x 2>/dev/null; echo ok"]
    code, out, _, seen = run_inspected(
        runner,
        docker_client,
        name,
        cmd,
        read_only_root=True,
        workdir="/work",
        mounts=[Mount(str(work), "/work"), Mount(str(tmp_path), "/tmp")],
        env={"HOME": "/work"},
    )
    assert (code, out) == (0, "ok\n")
    assert (work / "file").read_text() == "made-in-pod\n"
    assert seen.volumes == [] and not seen.attrs["HostConfig"].get("Tmpfs")


def test_limits_reach_the_engine(runner, image, docker_client):
    name = image()
    limits = Resources(cpus=0.5, memory=64 << 20, pids=64)
    code, _, _, seen = run_inspected(runner, docker_client, name, ["true"], resources=limits)
    host = seen.attrs["HostConfig"]
    assert code == 0
    assert host["NanoCpus"] == 500_000_000
    assert host["Memory"] == host["MemorySwap"] == 64 << 20
    assert host["PidsLimit"] == 64


def test_an_agent_out_of_memory_is_told_so(runner, image):
    name = image(MEMORY_HOG)
    code, _, err = run(runner, name, resources=Resources(memory=16 << 20))
    assert code == 137
    assert err.endswith("cldpd: the agent ran out of memory (limit 16 MiB) and was killed.\n")
    assert runner.inspect(f"cldpd-{name}") is None


def test_an_agent_that_outlives_a_killed_process_is_told_which(runner, image):
    name = image(f"sh -c '{FIRST_TO_GO}{MEMORY_HOG}'; echo survived")
    code, out, err = run(runner, name, resources=Resources(memory=16 << 20))
    assert (code, out) == (0, "survived\n")
    assert err.endswith(
        "cldpd: a process of the agent ran out of memory (limit 16 MiB) and was killed.\n"
    )


@pytest.mark.parametrize(
    ("limit", "said"),
    [(64 << 20, "(limit 64 MiB)"), (3 << 29, "(limit 1.5 GiB)"), (2 << 30, "(limit 2 GiB)")],
)
def test_the_limit_is_said_as_people_write_it(limit, said):
    assert said in out_of_memory_line(limit, 137)
    assert "limit" not in out_of_memory_line(0, 137)


def test_an_agent_within_its_memory_is_not_told_anything(runner, image):
    name = image("head -c 1m /dev/zero | tail | wc -c; exit 137")
    assert run(runner, name, resources=Resources(memory=64 << 20)) == (137, "1048576\n", "")


def test_an_exec_out_of_memory_is_told_so_and_the_pod_lives_on(runner, image):
    name = image()
    pod = f"cldpd-{name}"
    runner.start(opts(name, IDLE_COMMAND, resources=Resources(memory=16 << 20)))
    try:
        out, err = Text(), Text()
        assert runner.exec(pod, ["sh", "-c", FIRST_TO_GO + MEMORY_HOG], out, err) == 137
        assert err.value.endswith(out_of_memory_line(16 << 20, 137))
        err = Text()
        assert runner.exec(pod, ["sh", "-c", "kill -9 $$"], Text(), err) == 137
        assert err.value == ""
        assert runner.inspect(pod).running
    finally:
        runner.stop(pod, 5)
        runner.remove(pod)


def test_a_pids_limit_stops_a_fork_bomb(runner, image):
    bomb = "i=0; while [ $i -lt 100 ]; do sleep 60 & i=$((i+1)); echo $i; done; echo all-started"
    name = image(bomb)
    code, out, err = run(runner, name, resources=Resources(pids=20))
    assert code != 0 and "can't fork" in err
    started = out.split()
    assert "all-started" not in started and len(started) < 20
    assert run(runner, name)[1].split()[-1] == "all-started"


def test_a_confined_kept_alive_pod_stops_and_its_resume_stops(dispatcher, make_pod, docker_client):
    pod_json = {
        "keepAlive": True,
        "readOnlyRoot": True,
        "resources": {"cpus": 1, "memory": "256m", "pids": 100},
    }
    name = make_pod(IDLE, pod_json=pod_json, dockerfile=AGENT_USER_DOCKERFILE)
    start = dispatcher.start_session(name, URL)
    until(start.events(), "ready")
    volumes = [
        m["Name"] for m in container(docker_client, name).attrs["Mounts"] if m["Type"] == "volume"
    ]
    resume = dispatcher.resume_session(name, "wait for it")
    until(resume.events(), "resume-ready")
    resume.stop(10)
    assert resume.wait(0) == 130
    assert output(resume) == ["resume-ready", "resume got INT"]
    assert container(docker_client, name).status == "running"
    dispatcher.stop(name, 10)
    assert start.wait(30) == 130
    assert output(start) == ["ready", "got INT"]
    assert container(docker_client, name) is None
    assert len(volumes) == 1
    assert_volumes_gone(docker_client, volumes)
