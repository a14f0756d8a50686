"""Second Docker engines for tests: a dockerd on a loopback TCP port with TLS, and a
dockerd with iptables on in a network namespace of its own.

The TLS engine keeps apart from the one other tests use: its own data root, exec root and
pid file, no iptables rules, and a bridge of its own (``--bridge=none`` is no way to
keep apart: a dockerd started so deletes the host's ``docker0``, the main engine's).
Its certificates (a CA, a server certificate for 127.0.0.1 and a client certificate)
are made here with openssl. The base image comes from the main engine
(``docker save | load``), since nothing can be pulled.

The isolated engine has iptables on, which two engines in one network namespace could
not share (each would rewrite the other's chains on the host): it runs in a namespace
made for it, with its own ``docker0`` there and a veth pair to the host on a private
/30, its only way anywhere. The namespace has no default route, and the host forwards
nothing that comes from it: its containers reach the host's end of the pair (where the
test process serves them) and nothing further.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Label on what the tests put on an extra engine, to find leftovers.
TEST_LABEL = "cldpd.test"
#: The bridge a swarm member's engine makes on the host (left when the engine stops).
GWBRIDGE = Path("/sys/class/net/docker_gwbridge")


@dataclass
class ExtraEngine:
    """A running extra dockerd.

    Attributes:
        url: Its endpoint, ``tcp://127.0.0.1:PORT``.
        certs: Directory with the client's ca.pem, cert.pem and key.pem.
        root: Directory holding its data root, exec root, pid file and log.
        process: The dockerd process.
        bridge: Its bridge interface, made for it and removed with it.
        gwbridge_before: Whether the host had Swarm's ``docker_gwbridge`` before it
            started (a swarm member makes one, which outlives it).
    """

    url: str
    certs: Path
    root: Path
    process: subprocess.Popen[bytes]
    bridge: str
    gwbridge_before: bool = True

    @property
    def entry(self) -> str:
        """Its entry for the engines setting."""
        return f"{self.url}?tls={self.certs}&name=tls"

    def docker(self, *args: str, **kwargs) -> subprocess.CompletedProcess[bytes]:
        """Run the docker CLI against this engine."""
        return subprocess.run(
            ["docker", *self.cli_args(), *args], check=True, capture_output=True, **kwargs
        )

    def tls_files(self) -> tuple[str, str, str]:
        """The client's CA, certificate and key files."""
        ca, cert, key = (str(self.certs / f) for f in ("ca.pem", "cert.pem", "key.pem"))
        return ca, cert, key

    def cli_args(self) -> list[str]:
        """The docker CLI options that reach this engine."""
        return [
            "-H",
            self.url,
            "--tlsverify",
            f"--tlscacert={self.certs / 'ca.pem'}",
            f"--tlscert={self.certs / 'cert.pem'}",
            f"--tlskey={self.certs / 'key.pem'}",
        ]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certificates(where: Path) -> tuple[Path, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate.

    Returns:
        The server's directory and the client's (each with ca.pem, cert.pem, key.pem).
    """
    server, client = where / "server", where / "client"
    server.mkdir()
    client.mkdir()
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
             "/CN=cldpd test CA", "-keyout", "ca-key.pem", "-out", "ca.pem", cwd=where)  # fmt: skip
    for directory, cn, ext in (
        (server, "127.0.0.1", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"),
        (client, "client", "extendedKeyUsage=clientAuth\n"),
    ):
        (directory / "ext.cnf").write_text(ext)
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}",
                 "-keyout", "key.pem", "-out", "req.csr", cwd=directory)  # fmt: skip
        _openssl("x509", "-req", "-in", "req.csr", "-CA", "../ca.pem", "-CAkey",
                 "../ca-key.pem", "-CAcreateserial", "-days", "2", "-extfile", "ext.cnf",
                 "-out", "cert.pem", cwd=directory)  # fmt: skip
        shutil.copy(where / "ca.pem", directory / "ca.pem")
    return server, client


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_extra_engine(image: str = "busybox:latest", timeout: float = 60) -> ExtraEngine:
    """Start a second dockerd with TLS on a loopback port and give it ``image``.

    Raises:
        RuntimeError: It did not come up in time; the message holds its log's tail.
    """
    root = Path(tempfile.mkdtemp(prefix="cldpd-engine-"))
    server, client = make_certificates(root)
    port = free_port()
    bridge = f"cldpdbr{port}"
    _ip("link", "add", bridge, "type", "bridge")
    _ip("addr", "add", f"10.213.{port % 250}.1/24", "dev", bridge)
    _ip("link", "set", bridge, "up")
    log = open(root / "dockerd.log", "wb")  # noqa: SIM115 - lives as long as the engine
    process = subprocess.Popen(
        [
            "dockerd",
            f"--data-root={root / 'data'}",
            f"--exec-root={root / 'exec'}",
            f"--pidfile={root / 'dockerd.pid'}",
            "--host",
            f"tcp://127.0.0.1:{port}",
            "--tlsverify",
            f"--tlscacert={server / 'ca.pem'}",
            f"--tlscert={server / 'cert.pem'}",
            f"--tlskey={server / 'key.pem'}",
            f"--bridge={bridge}",
            "--iptables=false",
            "--ip6tables=false",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    engine = ExtraEngine(
        f"tcp://127.0.0.1:{port}", client, root, process, bridge, GWBRIDGE.exists()
    )
    deadline = time.monotonic() + timeout
    while True:
        probe = subprocess.run(
            ["docker", *engine.cli_args(), "version"], capture_output=True, timeout=30
        )
        if probe.returncode == 0:
            break
        if process.poll() is not None or time.monotonic() > deadline:
            stop_extra_engine(engine)
            tail = (root / "dockerd.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the extra dockerd did not start: {tail}")
        time.sleep(0.3)
    saved = subprocess.run(["docker", "save", image], check=True, capture_output=True).stdout
    engine.docker("load", input=saved)
    return engine


def _kill_orphans(root: Path) -> None:
    """Kill the container shims of a killed engine and every process under them.

    A dockerd killed outright (a test of an engine going away does so) leaves its
    containers running under their shims, which name the engine's directory.
    """
    parents: dict[int, int] = {}
    shims = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            parents[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if str(root) in (proc / "cmdline").read_bytes().decode(errors="replace"):
                shims.append(int(proc.name))
    doomed, frontier = set(shims), list(shims)
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent]
        doomed.update(children)
        frontier.extend(children)
    for pid in doomed:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def stop_extra_engine(engine: ExtraEngine) -> None:
    """Remove the engine's containers, stop it, and remove its directories."""
    with contextlib.suppress(subprocess.SubprocessError, OSError):
        ids = engine.docker("ps", "-aq", timeout=30).stdout.split()
        if ids:
            engine.docker("rm", "-f", *[i.decode() for i in ids], timeout=60)
    if engine.process.poll() is None:
        engine.process.send_signal(signal.SIGTERM)
        try:
            engine.process.wait(30)
        except subprocess.TimeoutExpired:
            engine.process.kill()
            engine.process.wait(10)
    _kill_orphans(engine.root)
    # dockerd's own containerd leaves mounts under the exec and data roots when killed.
    for sub in ("exec", "data"):
        path = engine.root / sub
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            mounts = Path("/proc/mounts").read_text().split("\n")
            for line in reversed(mounts):
                parts = line.split()
                if len(parts) > 1 and parts[1].startswith(str(path)):
                    subprocess.run(["umount", "-l", parts[1]], capture_output=True)
    with contextlib.suppress(subprocess.CalledProcessError):
        _ip("link", "delete", engine.bridge)
    if not engine.gwbridge_before and GWBRIDGE.exists():
        with contextlib.suppress(subprocess.CalledProcessError):
            _ip("link", "delete", GWBRIDGE.name)
    shutil.rmtree(engine.root, ignore_errors=True)
    if os.path.exists(engine.root):
        raise RuntimeError(f"could not remove {engine.root}")


#: Where ``ip netns`` keeps its namespaces (a mount it makes on first use).
NETNS_DIR = Path("/run/netns")
#: The private range whose /30s link isolated engines to the host.
ISOLATED_RANGE = ipaddress.ip_network("10.254.0.0/16")


@dataclass
class IsolatedEngine:
    """A running dockerd with iptables on, in a network namespace of its own.

    Attributes:
        url: Its endpoint, ``unix://ROOT/docker.sock``.
        namespace: Its network namespace (``ip netns`` name).
        host_link: The host's end of the veth pair.
        link: The namespace's end of it.
        host_address: The host's address on the pair: servers of the test process bind
            there, and the engine's containers reach it (masqueraded by the engine).
        address: The namespace's address on the pair.
        root: Directory holding its data root, exec root, pid file, socket and log.
        process: The dockerd process, or None before it started.
        netns_dir_before: Whether :data:`NETNS_DIR` existed before it (the first
            ``ip netns add`` makes it, and a mount on it, which go with the engine).
    """

    url: str
    namespace: str
    host_link: str
    link: str
    host_address: str
    address: str
    root: Path
    process: subprocess.Popen[bytes] | None = None
    netns_dir_before: bool = True

    def cli_args(self) -> list[str]:
        """The docker CLI options that reach this engine."""
        return ["-H", self.url]

    def docker(self, *args: str, **kwargs) -> subprocess.CompletedProcess[bytes]:
        """Run the docker CLI against this engine."""
        return subprocess.run(
            ["docker", *self.cli_args(), *args], check=True, capture_output=True, **kwargs
        )

    def in_namespace(self) -> list[str]:
        """The start of a command that runs the rest in the engine's network namespace."""
        return ["ip", "netns", "exec", self.namespace]

    def ip(self, *args: str) -> str:
        """``ip`` in the engine's network namespace; its output."""
        return subprocess.run(
            ["ip", "-n", self.namespace, *args], check=True, capture_output=True, text=True
        ).stdout


def _free_slash30() -> ipaddress.IPv4Network:
    """A /30 of :data:`ISOLATED_RANGE` that no address or route of the host overlaps."""

    def listing(*what: str) -> list[dict]:
        out = subprocess.run(["ip", "-j", "-4", *what], check=True, capture_output=True).stdout
        return json.loads(out or b"[]")

    taken = [
        ipaddress.ip_network(f"{a['local']}/{a['prefixlen']}", strict=False)
        for link in listing("addr")
        for a in link.get("addr_info", [])
    ]
    taken += [ipaddress.ip_network(r["dst"]) for r in listing("route") if r["dst"] != "default"]
    count = ISOLATED_RANGE.num_addresses // 4
    for _ in range(100):
        start = ISOLATED_RANGE.network_address + 4 * secrets.randbelow(count)
        candidate = ipaddress.ip_network((start, 30))
        if not any(candidate.overlaps(net) for net in taken):
            return candidate
    raise RuntimeError(f"no free /30 in {ISOLATED_RANGE} for an isolated engine")


def _write_sysctl(path: str, value: str) -> None:
    Path("/proc/sys", path).write_text(value)


def start_isolated_engine(
    images: tuple[str, ...] | list[str] = ("busybox:latest",), timeout: float = 60
) -> IsolatedEngine:
    """Start a dockerd with iptables on in a new network namespace, and give it ``images``.

    The namespace gets its loopback, a veth pair to the host on a free /30 of
    :data:`ISOLATED_RANGE` and no default route; the engine makes its ``docker0`` there,
    with the rules that masquerade its containers' traffic to the host's end. The host's
    end forwards nothing (per-interface ``forwarding`` off): a packet from the namespace
    reaches this host and goes no further. The images come from the main engine.

    Raises:
        RuntimeError: It did not come up in time (the message holds its log's tail), or
            the images did not load.
    """
    tag = secrets.token_hex(4)
    root = Path(tempfile.mkdtemp(prefix="cldpd-isolated-"))
    pair = _free_slash30()
    host_address, address = (str(a) for a in pair.hosts())
    engine = IsolatedEngine(
        url=f"unix://{root / 'docker.sock'}",
        namespace=f"cldpd-iso-{tag}",
        host_link=f"cldpdh{tag}",
        link=f"cldpdn{tag}",
        host_address=host_address,
        address=address,
        root=root,
        netns_dir_before=NETNS_DIR.exists(),
    )
    try:
        _ip("netns", "add", engine.namespace)
        _ip("-n", engine.namespace, "link", "set", "lo", "up")
        _ip("link", "add", engine.host_link, "type", "veth",
            "peer", "name", engine.link, "netns", engine.namespace)  # fmt: skip
        _write_sysctl(f"net/ipv4/conf/{engine.host_link}/forwarding", "0")
        _ip("addr", "add", f"{host_address}/30", "dev", engine.host_link)
        _ip("link", "set", engine.host_link, "up")
        _ip("-n", engine.namespace, "addr", "add", f"{address}/30", "dev", engine.link)
        _ip("-n", engine.namespace, "link", "set", engine.link, "up")
        if engine.ip("route", "show", "default").strip():
            raise RuntimeError(f"the namespace {engine.namespace} has a default route")
        (root / "daemon.json").write_text("{}\n")  # the host's daemon.json is the main engine's
        log = open(root / "dockerd.log", "wb")  # noqa: SIM115 - lives as long as the engine
        engine.process = subprocess.Popen(
            [
                "nsenter",
                f"--net={NETNS_DIR / engine.namespace}",
                "dockerd",
                f"--config-file={root / 'daemon.json'}",
                f"--data-root={root / 'data'}",
                f"--exec-root={root / 'exec'}",
                f"--pidfile={root / 'dockerd.pid'}",
                f"--host={engine.url}",
                "--iptables=true",
                "--ip6tables=false",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while subprocess.run(["docker", *engine.cli_args(), "version"],
                             capture_output=True, timeout=30).returncode:  # fmt: skip
            if engine.process.poll() is not None or time.monotonic() > deadline:
                tail = (root / "dockerd.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the isolated dockerd did not start: {tail}")
            time.sleep(0.3)
        _copy_images(list(images), engine)
    except BaseException:
        stop_isolated_engine(engine)
        raise
    return engine


def _copy_images(images: list[str], engine: IsolatedEngine) -> None:
    """``docker save`` from the main engine into ``docker load`` of ``engine``, streamed."""
    save = subprocess.Popen(
        ["docker", "save", *images], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert save.stdout is not None
    try:
        load = subprocess.run(
            ["docker", *engine.cli_args(), "load", "-q"], stdin=save.stdout, capture_output=True
        )
    finally:
        save.stdout.close()
        saved_err = save.stderr.read() if save.stderr else b""
        save.wait()
    if save.returncode or load.returncode:
        raise RuntimeError(
            f"could not copy {', '.join(images)} to the isolated engine: "
            + (saved_err + load.stderr).decode(errors="replace").strip()
        )


def stop_isolated_engine(engine: IsolatedEngine) -> None:
    """Remove its containers, stop it and everything in its namespace, and remove the
    namespace, the veth pair and its directories (as much as exists of them).

    Raises:
        RuntimeError: Something of it is still on the host afterwards.
    """
    process = engine.process
    if process is not None and process.poll() is None:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            ids = engine.docker("ps", "-aq", timeout=30).stdout.split()
            if ids:
                engine.docker("rm", "-f", *[i.decode() for i in ids], timeout=60)
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
    _kill_orphans(engine.root)
    namespace = NETNS_DIR / engine.namespace
    if namespace.exists():
        # Whatever still runs in it (a container on the engine's host network, a shim).
        pids = subprocess.run(["ip", "netns", "pids", engine.namespace],
                              capture_output=True, text=True).stdout.split()  # fmt: skip
        for pid in pids:
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
    with contextlib.suppress(OSError):
        for line in reversed(Path("/proc/mounts").read_text().split("\n")):
            parts = line.split()
            if len(parts) > 1 and parts[1].startswith(str(engine.root)):
                subprocess.run(["umount", "-l", parts[1]], capture_output=True)
    with contextlib.suppress(subprocess.CalledProcessError):
        _ip("link", "delete", engine.host_link)  # its peer goes with it
    if namespace.exists():
        with contextlib.suppress(subprocess.CalledProcessError):
            _ip("netns", "delete", engine.namespace)
    if not engine.netns_dir_before and NETNS_DIR.exists():
        with contextlib.suppress(OSError):
            if not any(NETNS_DIR.iterdir()):  # no other namespace was made meanwhile
                subprocess.run(["umount", str(NETNS_DIR)], capture_output=True)
                NETNS_DIR.rmdir()
    shutil.rmtree(engine.root, ignore_errors=True)
    left = [
        what
        for what, there in (
            (str(engine.root), engine.root.exists()),
            (f"namespace {engine.namespace}", namespace.exists()),
            (f"link {engine.host_link}", Path("/sys/class/net", engine.host_link).exists()),
        )
        if there
    ]
    if left:
        raise RuntimeError(f"the isolated engine left {', '.join(left)} on the host")


def write_echo_pod(pods_dir: Path, name: str, pod_json: dict) -> Path:
    """A busybox pod whose agent prints how it was called: ``agent ran with $1 $5``."""
    from fakes import write_pod

    pod = write_pod(pods_dir, name, pod_json)
    (pod / "Dockerfile").write_text(
        "FROM busybox:latest\nCOPY claude /usr/local/bin/claude\n"
        "RUN chmod +x /usr/local/bin/claude\n"
    )
    (pod / "claude").write_text('#!/bin/sh\necho "agent ran with $1 $5"\n')
    return pod


def found_again_by_a_new_dispatcher(
    pods_dir: Path,
    pod: str,
    new_runner: Callable[[], Any],
    while_kept: Callable[[], None] = lambda: None,
) -> None:
    """A keepAlive run of an echo pod, started by one dispatcher, found by a new one.

    The new dispatcher lists it running, resumes it, attaches to it and stops it; then
    it is gone. ``while_kept`` checks more while the run is kept alive.
    """
    from fakes import ISSUE_URL

    from cldpd_magic.events import EventType
    from cldpd_magic.runs.dispatcher import Dispatcher

    def new_dispatcher() -> Dispatcher:
        return Dispatcher(pods_dir, new_runner(), pods_dir.parent / "sessions")

    def output(session: Any) -> str:
        return "".join(e.data for e in session.events() if e.type == EventType.OUTPUT)

    first = new_dispatcher().start_session(pod, ISSUE_URL)
    assert first.wait(120) == 0
    assert "agent ran with -p --session-id" in output(first)
    later = new_dispatcher()

    def runs() -> list[tuple[str, str]]:  # other tests' pods may run on the same engine
        return [(r.container, r.status) for r in later.running() if r.pod == pod]

    assert runs() == [(f"cldpd-{pod}", "running")]
    while_kept()
    resumed = later.resume_session(pod, "go on")
    assert resumed.wait(60) == 0
    assert "agent ran with -p --resume" in output(resumed)
    attached = later.attach_session(pod)
    later.stop(pod, 10)
    attached.wait(60)
    assert runs() == []  # a stopped keepAlive run is removed


def init_swarm(engine: ExtraEngine) -> None:
    """Make the engine a one-node swarm's manager, advertising a loopback address."""
    from cldpd_magic.engines.docker.runner import DockerRunner

    api = DockerRunner(base_url=engine.url, tls=engine.tls_files()).connection.control()
    api.init_swarm(advertise_addr="127.0.0.1", listen_addr=f"127.0.0.1:{free_port()}")


def _await_port(
    port: int, process: subprocess.Popen[bytes], log: Path, what: str, timeout: float
) -> None:
    """Wait until something listens on 127.0.0.1:port; RuntimeError with the log's tail if not."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        if process.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{what} did not start: {tail}")
        time.sleep(0.1)


@dataclass
class Registry:
    """A Docker registry (Debian's docker-registry) on a loopback port, storing in ``root``."""

    address: str
    root: Path
    process: subprocess.Popen[bytes]

    def tags(self, repository: str) -> list[str]:
        """The tags the registry holds for a repository."""
        import json
        import urllib.request

        url = f"http://{self.address}/v2/{repository}/tags/list"
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.load(response).get("tags") or []


def start_registry(timeout: float = 30) -> Registry:
    """Start a registry on 127.0.0.1 (engines treat loopback registries as insecure ones).

    Raises:
        RuntimeError: It did not come up in time; the message holds its log's tail.
    """
    root = Path(tempfile.mkdtemp(prefix="cldpd-registry-"))
    port = free_port()
    (root / "config.yml").write_text(
        f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\nlog:\n  level: warn\n"
    )
    process = subprocess.Popen(
        ["/usr/bin/docker-registry", "serve", str(root / "config.yml")],
        stdout=open(root / "registry.log", "wb"),  # noqa: SIM115 - lives as long as it
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    registry = Registry(f"127.0.0.1:{port}", root, process)
    try:
        _await_port(port, process, root / "registry.log", "the registry", timeout)
    except RuntimeError:
        stop_registry(registry)
        raise
    return registry


def stop_registry(registry: Registry) -> None:
    """Stop the registry and remove what it stored."""
    if registry.process.poll() is None:
        registry.process.terminate()
        registry.process.wait(30)
    shutil.rmtree(registry.root, ignore_errors=True)


@dataclass
class SshEngine:
    """An sshd on a loopback port in front of the main engine, as a remote host would be.

    Attributes:
        url: Its endpoint, ``ssh://root@127.0.0.1:PORT``.
        home: A home directory whose ``.ssh`` holds the client key and the host's key:
            point ``HOME`` at it (paramiko reads ``~/.ssh`` through ``HOME``).
        root: Directory holding the server's keys, configuration and log.
        process: The sshd process.
    """

    url: str
    home: Path
    root: Path
    process: subprocess.Popen[bytes]


def _keygen(path: Path) -> str:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
        check=True,
        capture_output=True,
    )
    return path.with_suffix(".pub").read_text().strip()


def start_ssh_engine(timeout: float = 30) -> SshEngine:
    """Start sshd on 127.0.0.1 with keys made here; its shell reaches the main engine.

    Raises:
        RuntimeError: It did not come up in time; the message holds its log's tail.
    """
    root = Path(tempfile.mkdtemp(prefix="cldpd-sshd-"))
    home = root / "home"
    (home / ".ssh").mkdir(parents=True)
    host_key = _keygen(root / "host_key")
    client_key = _keygen(home / ".ssh" / "id_ed25519")
    (root / "authorized_keys").write_text(client_key + "\n")
    port = free_port()
    (home / ".ssh" / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_key}\n")
    (root / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {root / 'host_key'}\n"
        f"AuthorizedKeysFile {root / 'authorized_keys'}\nPidFile {root / 'sshd.pid'}\n"
        "StrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "UsePAM no\nPermitRootLogin prohibit-password\n"
    )
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
    process = subprocess.Popen(
        ["/usr/sbin/sshd", "-D", "-e", "-f", str(root / "sshd_config")],
        stdout=open(root / "sshd.log", "wb"),  # noqa: SIM115 - lives as long as sshd
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    engine = SshEngine(f"ssh://root@127.0.0.1:{port}", home, root, process)
    try:
        _await_port(port, process, root / "sshd.log", "sshd", timeout)
    except RuntimeError:
        stop_ssh_engine(engine)
        raise
    return engine


def stop_ssh_engine(engine: SshEngine) -> None:
    """Stop sshd and remove its directory."""
    if engine.process.poll() is None:
        engine.process.terminate()
        engine.process.wait(30)
    shutil.rmtree(engine.root, ignore_errors=True)
