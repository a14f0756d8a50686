"""Dangerous pod.json made explicit: refused in one sentence unless ``"unsafe"`` waives it.

First pod.json alone (no Docker): every rule refused without its waiver and accepted with
it, stale and malformed waivers refused, mount sources resolved through links and ``..``
(remote ones only normalized), SYS_ADMIN never with a read-only mount. Then the real
engine: SYS_ADMIN does remount a read-only bind mount writable (the control, in a
container made by hand), so that pod.json is refused before any container exists; a
waived SYS_ADMIN pod runs; a linked source reaches the container as its target; a pod
mounting the Docker socket is refused, and with the waiver runs and is marked.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fakes import ISSUE_URL as URL
from fakes import write_pod
from IPython.utils.capture import capture_output

from cldpd_magic import (
    Dispatcher,
    DockerRunner,
    EventType,
    PodConfig,
    PodConfigError,
    discover_pod,
)
from cldpd_magic.engines.docker.containers import SECURITY_OPT
from cldpd_magic.pods import Mount, check_unsafe, mount_danger, parse_pod_config
from cldpd_magic.pods.unsafe import ESCAPE_CAPABILITIES, SYSTEM_DIRS

BASE_IMAGE = "busybox:latest"
SOCKET = os.path.realpath("/var/run/docker.sock")


def put(pods_dir: Path, pod_json: dict) -> None:
    """Write pod ``p`` with this pod.json (over the last one)."""
    if not (pods_dir / "p").is_dir():
        write_pod(pods_dir, "p")
    (pods_dir / "p" / "pod.json").write_text(json.dumps(pod_json))


def refusal(pods_dir: Path, pod_json: dict) -> str:
    """The one sentence that refuses ``pod_json``; it names the file."""
    put(pods_dir, pod_json)
    with pytest.raises(PodConfigError) as info:
        discover_pod(pods_dir, "p")
    message = str(info.value)
    assert message.startswith(f"{pods_dir / 'p' / 'pod.json'}: ")
    assert "\n" not in message and message.endswith(".")
    return message


def accepted(pods_dir: Path, pod_json: dict):
    put(pods_dir, pod_json)
    return discover_pod(pods_dir, "p")


def mounting(source: str, **more) -> dict:
    return {"mounts": [{"source": source, "target": "/m", **more}]}


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A home directory of the test's own (so the real one is never judged)."""
    path = tmp_path / "home"
    (path / "project").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(path))
    return path


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: a unix socket's path has at most 107 bytes."""
    with tempfile.TemporaryDirectory(prefix="cldpd-") as path:
        yield Path(path)


# -- capabilities and the host's network -----------------------------------------------


@pytest.mark.parametrize("cap", sorted(ESCAPE_CAPABILITIES))
def test_an_escape_capability_is_refused_unless_waived(pods_dir, cap):
    message = refusal(pods_dir, {"capAdd": ["CHOWN", cap.lower()]})
    assert f"capAdd[1] adds {cap}, which allows " in message
    assert f'add "cap:{cap}" to "unsafe" if the pod must have it.' in message
    pod = accepted(pods_dir, {"capAdd": ["CHOWN", cap], "unsafe": [f"cap:CAP_{cap}".lower()]})
    assert pod.config.cap_add == ("CHOWN", cap)
    assert pod.unsafe == (f"cap:{cap}",)
    assert [w.split(" (")[0] for w in pod.unsafe_warnings] == [f"unsafe: adds {cap}"]


def test_the_escape_capabilities_are_the_issues_and_rawio_and_boot():
    named = {"SYS_ADMIN", "SYS_PTRACE", "SYS_MODULE", "DAC_READ_SEARCH", "BPF", "NET_ADMIN"}
    assert set(ESCAPE_CAPABILITIES) == named | {"SYS_RAWIO", "SYS_BOOT"}


def test_other_capabilities_need_no_waiver(pods_dir):
    pod = accepted(pods_dir, {"capAdd": ["CHOWN", "NET_BIND_SERVICE", "SETUID", "KILL"]})
    assert pod.unsafe == () and pod.unsafe_warnings == ()


def test_the_hosts_network_is_refused_unless_waived(pods_dir):
    message = refusal(pods_dir, {"network": "host"})
    assert "'network' is \"host\", the host's own network (every service of the host" in message
    assert 'use "bridge" or an allowlist, or add "network:host" to "unsafe"' in message
    pod = accepted(pods_dir, {"network": "host", "unsafe": ["network:host"]})
    assert pod.config.network == "host" and pod.unsafe == ("network:host",)
    assert pod.unsafe_warnings == (
        "unsafe: shares the host's network (the host's own network: every service of the "
        "host and its loopback)",
    )
    for network in ("bridge", "none", "team-net"):
        assert accepted(pods_dir, {"network": network}).unsafe == ()


# -- mounts -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "resolved", "says"),
    [
        ("/", "/", "the host's whole filesystem (every file, /etc/shadow too)"),
        ("/var/run/docker.sock", SOCKET, "the Docker API (root on the host)"),
        ("/var", "/var", "a directory holding the Docker socket (root on the host)"),
        ("/var/lib", "/var/lib", "a directory holding /var/lib/docker"),
        ("/home", "/home", "every user's home directory (their keys and ~/.ssh)"),
        ("/etc/../etc/ssl", "/etc/ssl", "a path in the system directory /etc"),
        ("/var/lib/docker/volumes", "/var/lib/docker/volumes", "system directory /var/lib/docker"),
        ("/proc/1", "/proc/1", "a path in the system directory /proc"),
    ],
)
def test_dangerous_mounts_are_refused_unless_waived(pods_dir, home, source, resolved, says):
    message = refusal(pods_dir, mounting(source))
    assert f"mounts[0] mounts {resolved}" in message and says in message
    assert f'add "mount:{resolved}" to "unsafe" if the pod must have it.' in message
    pod = accepted(pods_dir, {**mounting(source), "unsafe": [f"mount:{resolved}"]})
    assert pod.config.mounts[0].source == resolved
    assert pod.unsafe == (f"mount:{resolved}",)
    assert pod.unsafe_warnings[0].startswith(f"unsafe: mounts {resolved} (")


@pytest.mark.parametrize("directory", SYSTEM_DIRS)
def test_every_system_directory_is_refused(pods_dir, home, directory):
    resolved = os.path.realpath(directory)
    message = refusal(pods_dir, mounting(directory))
    assert f'"mount:{resolved}"' in message
    assert mount_danger(resolved) is not None and mount_danger(directory, remote=True)


def test_the_home_directory_itself_is_refused_but_the_users_files_are_theirs(pods_dir, home):
    message = refusal(pods_dir, mounting("~"))
    assert f"mounts[0] mounts {home} (written ~), your home directory" in message
    assert accepted(pods_dir, {**mounting("~"), "unsafe": ["mount:~"]}).unsafe == (f"mount:{home}",)
    pod = accepted(pods_dir, mounting("~/project"))
    assert pod.config.mounts[0].source == str(home / "project") and pod.unsafe == ()


def test_files_below_a_home_of_root_are_the_users_own(pods_dir, monkeypatch):
    monkeypatch.setenv("HOME", "/root")
    assert accepted(pods_dir, mounting("~/.ssh", readOnly=True)).unsafe == ()
    assert "your home directory" in refusal(pods_dir, mounting("/root"))
    monkeypatch.setenv("HOME", "/home/someone")  # the control: then /root is the system's
    assert "system directory /root" in refusal(pods_dir, mounting("/root/.ssh"))


def test_any_unix_socket_and_any_device_are_refused(pods_dir, short_dir):
    path = short_dir / "api.sock"
    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind(str(path))
        message = refusal(pods_dir, mounting(str(path)))
        assert "a unix socket (the API of a service of the host)" in message
        assert accepted(pods_dir, {**mounting(str(path)), "unsafe": [f"mount:{path}"]}).unsafe
    finally:
        server.close()
    device = short_dir / "null"
    try:
        os.mknod(device, stat.S_IFCHR | 0o600, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("making a device node needs root")
    assert "a device of the host" in refusal(pods_dir, mounting(str(device)))
    device.unlink()
    device.mkdir()  # the control: a directory of that name is harmless
    assert accepted(pods_dir, mounting(str(device))).unsafe == ()


def test_a_directory_holding_the_engines_socket_is_refused(pods_dir, short_dir, monkeypatch):
    (short_dir / "engine").mkdir()
    assert accepted(pods_dir, mounting(str(short_dir))).unsafe == ()  # the control
    monkeypatch.setenv("DOCKER_HOST", f"unix://{short_dir}/engine/docker.sock")
    message = refusal(pods_dir, mounting(str(short_dir)))
    assert "a directory holding the Docker socket (root on the host)" in message


def test_a_source_through_a_link_or_dotdot_is_resolved_and_judged_there(pods_dir, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    (tmp_path / "etc").symlink_to("/etc")
    pod = accepted(
        pods_dir,
        {"mounts": [
            {"source": str(tmp_path / "link"), "target": "/a"},
            {"source": f"{tmp_path}/link/../real/./", "target": "/b", "readOnly": True},
            {"source": str(tmp_path / "absent" / ".." / "missing"), "target": "/c"},
        ]},
    )  # fmt: skip
    assert pod.config.mounts == (
        Mount(str(real), "/a"),
        Mount(str(real), "/b", read_only=True),
        Mount(str(tmp_path / "missing"), "/c"),  # missing: Docker says so at start
    )
    message = refusal(pods_dir, mounting(str(tmp_path / "etc" / "ssl")))
    assert f"mounts[0] mounts /etc/ssl (written {tmp_path}/etc/ssl), a path in the" in message
    escape = f"{tmp_path}/" + "../" * len(tmp_path.parts) + "etc"
    assert "mounts /etc (written " in refusal(pods_dir, mounting(escape))


def test_a_waiver_may_name_the_path_as_written_or_resolved(pods_dir, tmp_path):
    (tmp_path / "sock").symlink_to("/var/run/docker.sock")
    for waiver in ("/var/run/docker.sock", SOCKET, str(tmp_path / "sock")):
        pod = accepted(
            pods_dir, {**mounting(str(tmp_path / "sock")), "unsafe": [f"mount:{waiver}"]}
        )
        assert pod.unsafe == (f"mount:{SOCKET}",)
        assert pod.config.mounts[0].source == SOCKET


def test_a_remote_mount_is_judged_on_its_normalized_path_alone(pods_dir, tmp_path):
    (tmp_path / "etc").symlink_to("/etc")
    linked = str(tmp_path / "etc")  # a link here says nothing of the engine's host
    pod = accepted(pods_dir, mounting(linked, remote=True))
    assert pod.config.mounts[0] == Mount(linked, "/m", remote=True) and pod.unsafe == ()
    message = refusal(pods_dir, mounting("//srv/data/../../etc/", remote=True))
    assert "mounts[0] mounts /etc (written //srv/data/../../etc/)" in message
    assert '"mount:/etc"' in message
    assert "the Docker API" in refusal(pods_dir, mounting("/var/run/docker.sock", remote=True))
    pod = accepted(pods_dir, {**mounting("/srv/../etc", remote=True), "unsafe": ["mount:/etc"]})
    assert pod.config.mounts[0].source == "/etc" and pod.unsafe == ("mount:/etc",)


def test_a_source_with_a_nul_is_refused(pods_dir):
    assert "mounts[0].source must be an absolute path" in refusal(pods_dir, mounting("/a\0b"))


# -- SYS_ADMIN keeps read-only mounts read-only ----------------------------------------------


def test_sys_admin_with_a_read_only_mount_is_refused_even_when_waived(pods_dir, tmp_path):
    config = {
        "capAdd": ["SYS_ADMIN"],
        "mounts": [
            {"source": str(tmp_path), "target": "/w"},
            {"source": str(tmp_path), "target": "/r", "readOnly": True},
        ],
    }
    for unsafe in ([], ["cap:SYS_ADMIN"]):
        message = refusal(pods_dir, {**config, "unsafe": unsafe})
        assert (
            f"capAdd[0] SYS_ADMIN would let the pod remount mounts[1] ({tmp_path}, read-only) "
            'writable; remove SYS_ADMIN or make that mount writable, as "unsafe" cannot waive'
        ) in message
    config["mounts"][1]["readOnly"] = False  # the control: writable mounts go with it
    assert accepted(pods_dir, {**config, "unsafe": ["cap:SYS_ADMIN"]}).unsafe == ("cap:SYS_ADMIN",)
    del config["capAdd"]  # and read-only mounts without it
    config["mounts"][1]["readOnly"] = True
    assert accepted(pods_dir, config).config.mounts[1].read_only


def test_sys_admin_with_a_read_only_root_is_refused_even_when_waived(pods_dir):
    config = {"capAdd": ["SYS_ADMIN"], "readOnlyRoot": True, "unsafe": ["cap:SYS_ADMIN"]}
    assert "remount its read-only root filesystem writable" in refusal(pods_dir, config)
    assert accepted(pods_dir, {"capAdd": ["NET_BIND_SERVICE"], "readOnlyRoot": True})


# -- the waivers themselves -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("unsafe", "says"),
    [
        (["network:host"], "unsafe[0] 'network:host' matches nothing this pod.json does"),
        (["cap:SYS_PTRACE"], "unsafe[0] 'cap:SYS_PTRACE' matches nothing"),
        (["mount:/etc"], "unsafe[0] 'mount:/etc' matches nothing"),
        (["cap:CHOWN"], "unsafe[0] 'cap:CHOWN' waives nothing, as CHOWN needs no waiver"),
        (["cap:FLY"], "unsafe[0] 'cap:FLY' is no waiver; write \"cap:NAME\""),
        ([""], "unsafe[0] '' is no waiver"),
        (["network:bridge"], "unsafe[0] 'network:bridge' is no waiver"),
        (["mount:relative/x"], "unsafe[0] 'mount:relative/x' is no waiver"),
        (["docker.sock"], "unsafe[0] 'docker.sock' is no waiver"),
        ([3], "unsafe[0] must be a string, got a number"),
        ("network:host", "'unsafe' must be a list of strings, got a string"),
    ],
)
def test_stale_and_malformed_waivers_are_refused(pods_dir, tmp_path, unsafe, says):
    # The pod mounts a harmless directory, so "mount:" of it would be stale too.
    message = refusal(pods_dir, {**mounting(str(tmp_path)), "unsafe": unsafe})
    assert says in message


def test_a_waiver_of_a_harmless_mount_is_stale(pods_dir, tmp_path):
    message = refusal(pods_dir, {**mounting(str(tmp_path)), "unsafe": [f"mount:{tmp_path}"]})
    assert "matches nothing this pod.json does; remove it" in message


def test_a_waiver_given_twice_is_refused(pods_dir):
    config = {"network": "host", "unsafe": ["network:host", "Network:Host"]}
    assert "unsafe[1] 'Network:Host' repeats unsafe[0]; keep one." in refusal(pods_dir, config)


def test_each_danger_needs_its_own_waiver_and_all_are_warned_of(pods_dir, home):
    config = {
        "network": "host",
        "capAdd": ["BPF", "SYS_MODULE"],
        "mounts": [{"source": "/etc", "target": "/e"}, {"source": "~/project", "target": "/p"}],
    }
    unsafe = ["mount:/etc", "cap:SYS_MODULE", "network:host", "cap:BPF"]
    for missing in unsafe:
        message = refusal(pods_dir, {**config, "unsafe": [u for u in unsafe if u != missing]})
        assert f'add "{missing}" to "unsafe"' in message
    pod = accepted(pods_dir, {**config, "unsafe": unsafe})
    assert pod.unsafe == tuple(unsafe)
    assert [w.split(" (")[0] for w in pod.unsafe_warnings] == [
        "unsafe: shares the host's network",
        "unsafe: adds BPF",
        "unsafe: adds SYS_MODULE",
        "unsafe: mounts /etc",
    ]


def test_check_unsafe_refuses_what_it_is_given(tmp_path):
    config = parse_pod_config(tmp_path / "pod.json", json.dumps(mounting(str(tmp_path))))
    assert check_unsafe(tmp_path / "pod.json", config, []) == ((), ())
    with pytest.raises(PodConfigError, match="capAdd\\[0\\] adds BPF"):
        check_unsafe(tmp_path / "pod.json", PodConfig(cap_add=("BPF",)), [])


# -- the real engine ------------------------------------------------------------------------


@pytest.fixture
def dispatcher(docker_client, pods_dir: Path, transcript_dir: Path) -> Dispatcher:
    return Dispatcher(pods_dir, DockerRunner(), transcript_dir)


def containers_of(docker_client, name: str) -> list:
    return docker_client.containers.list(all=True, filters={"name": f"^cldpd-{name}$"})


def outputs(session) -> list[str]:
    return [e.data for e in session.events() if e.type is EventType.OUTPUT]


@pytest.mark.docker
@pytest.mark.timeout(180)
def test_sys_admin_remounts_a_read_only_mount_so_that_pod_json_is_refused(
    docker_client, dispatcher, make_pod, tmp_path
):
    import docker.types

    data = tmp_path / "data"
    data.mkdir()
    script = (
        "touch /data/before 2>/dev/null && echo wrote || echo read-only\n"
        "mount -o remount,rw,bind /data && echo escaped > /data/escaped\n"
        "ls /data\n"
    )
    # The control, made by hand as cldpd would make it: the danger is real.
    container = docker_client.containers.create(
        BASE_IMAGE, ["sh", "-c", script], labels={"cldpd.test": "1"}, init=True,
        cap_drop=["ALL"], cap_add=["SYS_ADMIN"], security_opt=SECURITY_OPT,
        mounts=[docker.types.Mount("/data", str(data), type="bind", read_only=True)],
    )  # fmt: skip
    try:
        container.start()
        assert container.wait(timeout=120)["StatusCode"] == 0
        said = container.logs().decode().split()
    finally:
        container.remove(force=True)
    assert said == ["read-only", "escaped"]
    assert (data / "escaped").read_text() == "escaped\n"  # written into the host directory
    (data / "escaped").unlink()

    name = make_pod(
        script,
        pod_json={
            "capAdd": ["SYS_ADMIN"],
            "mounts": [{"source": str(data), "target": "/data", "readOnly": True}],
            "unsafe": ["cap:SYS_ADMIN"],
        },
    )
    with pytest.raises(PodConfigError) as info:
        dispatcher.start_session(name, URL)
    message = str(info.value)
    assert "\n" not in message and "SYS_ADMIN would let the pod remount mounts[0]" in message
    assert containers_of(docker_client, name) == []
    assert docker_client.images.list(name=f"cldpd-{name}") == []  # not even built
    assert list(data.iterdir()) == []


@pytest.mark.docker
@pytest.mark.timeout(180)
def test_a_waived_sys_admin_pod_without_read_only_mounts_runs(
    docker_client, dispatcher, make_pod, tmp_path
):
    data = tmp_path / "data"
    data.mkdir()
    name = make_pod(
        """
        grep CapEff /proc/self/status
        echo from-the-pod > /data/note
        """,
        pod_json={
            "capAdd": ["SYS_ADMIN"],
            "mounts": [{"source": str(data), "target": "/data"}],
            "unsafe": ["cap:SYS_ADMIN"],
        },
    )
    session = dispatcher.start_session(name, URL)
    assert session.wait(120) == 0
    effective = int(outputs(session)[0].split()[1], 16)
    assert effective == 1 << 21  # CAP_SYS_ADMIN, and nothing else
    assert (data / "note").read_text() == "from-the-pod\n"
    assert containers_of(docker_client, name) == []


@pytest.mark.docker
@pytest.mark.timeout(180)
def test_a_linked_source_reaches_the_container_as_its_target(
    docker_client, dispatcher, make_pod, tmp_path
):
    real = tmp_path / "real"
    real.mkdir()
    (real / "file.txt").write_text("the target's file\n")
    (tmp_path / "link").symlink_to(real)
    (tmp_path / "other").mkdir()
    name = make_pod(
        "cat /via-link/file.txt /via-dots/file.txt",
        pod_json={
            "mounts": [
                {"source": str(tmp_path / "link"), "target": "/via-link", "readOnly": True},
                {"source": f"{tmp_path}/other/../link/", "target": "/via-dots", "readOnly": True},
            ]
        },
    )
    pod = dispatcher.pod(name)
    assert [m.source for m in pod.config.mounts] == [str(real), str(real)]
    session = dispatcher.start_session(name, URL)
    # The link moves once the pod is read: the resolved path went to Docker.
    (tmp_path / "link").unlink()
    (tmp_path / "link").symlink_to(tmp_path / "other")
    assert session.wait(120) == 0
    assert outputs(session) == ["the target's file", "the target's file"]


SOCKET_POD = """
test -S /docker.sock && echo the-socket-is-there
"""


@pytest.mark.docker
@pytest.mark.timeout(180)
def test_the_docker_socket_is_refused_and_with_the_waiver_runs_marked(
    docker_client, dispatcher, make_pod, ip
):
    mount = {"source": "/var/run/docker.sock", "target": "/docker.sock"}
    name = make_pod(SOCKET_POD, pod_json={"mounts": [mount]})
    with pytest.raises(PodConfigError, match="the Docker API \\(root on the host\\)"):
        dispatcher.start_session(name, URL)
    assert containers_of(docker_client, name) == []
    row = next(r for r in ip.run_line_magic("cldpd_pods", "").records() if r["pod"] == name)
    assert f'add "mount:{SOCKET}" to "unsafe"' in row["problem"]

    pod_json = {"mounts": [mount], "unsafe": [f"mount:{SOCKET}"]}
    (dispatcher.pods_dir / name / "pod.json").write_text(json.dumps(pod_json))
    session = dispatcher.start_session(name, URL)
    assert session.wait(120) == 0
    assert outputs(session) == ["the-socket-is-there"]
    warning = f"unsafe: mounts {SOCKET} (the Docker API: root on the host)"
    table = ip.run_line_magic("cldpd_pods", "")
    row = next(r for r in table.records() if r["pod"] == name)
    assert row["unsafe"] == f"\u26a0 mount:{SOCKET}" and row["mounts"] == f"{SOCKET}:/docker.sock"
    assert f"\u26a0 {name}: {warning}" in table.notes
    assert containers_of(docker_client, name) == []


@pytest.mark.docker
@pytest.mark.timeout(180)
def test_a_run_of_a_waived_pod_says_each_warning_in_its_cell(docker_client, make_pod, ip):
    mount = {"source": "/var/run/docker.sock", "target": "/docker.sock"}
    name = make_pod(SOCKET_POD, pod_json={"mounts": [mount], "unsafe": [f"mount:{SOCKET}"]})
    warning = f"cldpd: unsafe: mounts {SOCKET} (the Docker API: root on the host)"
    with capture_output() as captured:
        session = ip.run_line_magic("cldpd_start", f"{name} {URL}")
    deadline = time.monotonic() + 30
    while not session.done and time.monotonic() < deadline:
        time.sleep(0.1)
    build = [e.data for e in session.events() if e.type is EventType.BUILD_OUTPUT]
    assert build.count(warning) == 1
    cell = [o.data.get("text/plain", "") for o in captured.outputs]
    assert any(warning in text for text in cell)
    assert containers_of(docker_client, name) == []
