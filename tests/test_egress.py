"""Egress allowlists and brokered credentials: pod.json parsing, and the real engine.

Every host these tests reach is a container they started (busybox httpd on the default
bridge) or a server on the gateway of a Docker network they created; everything they
make carries the label ``cldpd.test=egress`` and is removed. The egress image is built
once from ``$CLDPD_EGRESS_BASE`` (``cldpd-debian:bookworm``, made offline by
scripts/setup) and kept, as the product keeps it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from engines_util import ExtraEngine, start_extra_engine, stop_extra_engine

from cldpd_magic import Dispatcher
from cldpd_magic.engines.multi import docker_runner_for
from cldpd_magic.engines.protocol import RunOptions
from cldpd_magic.engines.setting import parse_engine
from cldpd_magic.errors import ContainerFailedError, InvalidRequestError, PodConfigError
from cldpd_magic.events import Event, EventType
from cldpd_magic.pods import parse_pod_config
from cldpd_magic.pods.policy import AllowRule, EgressPolicy, parse_network_allow
from cldpd_magic.render.views import RunLines
from cldpd_magic.runs import egress
from cldpd_magic.runs.egress import (
    LABEL_EGRESS,
    LABEL_EGRESS_OF,
    PLACEHOLDER,
    EgressGuard,
    parse_access_line,
    rules_image_tag,
)
from cldpd_magic.runs.session import read_transcript

TEST_LABEL = {"cldpd.test": "egress"}
EGRESS_BASE = "cldpd-debian:bookworm"
POD_JSON = Path("pods/p/pod.json")


def config_error(data: dict) -> str:
    with pytest.raises(PodConfigError) as info:
        parse_pod_config(POD_JSON, json.dumps(data))
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


# --- pod.json ---------------------------------------------------------------------------


def test_allow_form_parses_hosts_suffixes_and_ports():
    config = parse_pod_config(
        POD_JSON,
        json.dumps(
            {"network": {"allow": ["API.anthropic.com", "*.githubusercontent.com", "h.io:8443"]}}
        ),
    )
    assert config.network == ""
    assert config.egress == EgressPolicy(
        (
            AllowRule("api.anthropic.com"),
            AllowRule("*.githubusercontent.com"),
            AllowRule("h.io", 8443),
        )
    )
    assert [rule.squid() for rule in config.egress.allow] == [
        ["api.anthropic.com", None],
        [".githubusercontent.com", None],
        ["h.io", 8443],
    ]


def test_policy_digest_ignores_order_and_duplicates():
    one = parse_network_allow(POD_JSON, {"allow": ["a.io", "b.io:81", "a.io"]})
    two = parse_network_allow(POD_JSON, {"allow": ["b.io:81", "a.io"]})
    other = parse_network_allow(POD_JSON, {"allow": ["b.io:82", "a.io"]})
    assert one.digest == two.digest != other.digest
    assert len(one.allow) == 2


@pytest.mark.parametrize(
    ("network", "expected"),
    [
        ({"allow": "github.com"}, "must be a list"),
        ({"allow": ["github.com"], "deny": []}, "one key, 'allow'"),
        ({}, "one key, 'allow'"),
        ({"allow": [3]}, "network.allow[0] must be a host name"),
        ({"allow": ["ok.io", "bad host"]}, "network.allow[1]: 'bad host' is no host name"),
        ({"allow": ["http://github.com"]}, "is no host name"),
        ({"allow": ["github.com:0"]}, "no valid port"),
        ({"allow": ["github.com:http"]}, "no valid port"),
        ({"allow": ["*.com"]}, "whole top-level domain"),
        ({"allow": ["a.*.com"]}, "is no host name"),
    ],
)
def test_policy_errors_are_one_sentence(network, expected):
    assert expected in config_error({"network": network})


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"credentials": ["ANTHROPIC_API_KEY"]}, "must be an object"),
        ({"credentials": {"github": "GH_TOKEN"}}, "no kind cldpd can broker"),
        ({"credentials": {"anthropic": "NOT A NAME"}}, "must name a host environment variable"),
        ({"credentials": {"anthropic": "ANTHROPIC_API_KEY"}}, "needs 'network' as an allowlist"),
        (
            {
                "network": {"allow": []},
                "credentials": {"anthropic": "MY_KEY"},
                "inheritEnv": ["MY_KEY"],
            },
            "remove MY_KEY from inheritEnv",
        ),
        (
            {
                "network": {"allow": []},
                "credentials": {"anthropic": "MY_KEY"},
                "env": {"ANTHROPIC_API_KEY": "x"},
            },
            "must not enter the container",
        ),
    ],
)
def test_credential_errors_are_one_sentence(config, expected):
    assert expected in config_error(config)


# --- the proxy's log ----------------------------------------------------------------------


def test_access_lines_become_attempts():
    allowed = parse_access_line(
        "CLDPD-ACCESS 1796286244.027 172.30.0.3 TCP_TUNNEL 200 CONNECT a.io 443"
    )
    denied = parse_access_line(
        "CLDPD-ACCESS 1796286249.513 172.30.0.3 TCP_DENIED 403 GET b.io 80\n"
    )
    assert allowed is not None and allowed.allowed and allowed.target == "a.io:443"
    assert denied is not None and not denied.allowed and denied.target == "b.io:80"
    assert denied.method == "GET"
    assert denied.time == datetime.fromtimestamp(1796286249.513, UTC)


@pytest.mark.parametrize(
    "line",
    [
        "CLDPD-ACCESS 1796286244.027 127.0.0.1 NONE_NONE 0 - - -",  # the readiness probe
        "cldpd-egress ready",
        "2026/12/03 08:24:03| Starting Squid Cache version 5.7",
        "CLDPD-ACCESS 1 1.2.3.4 TCP_DENIED 403 GET evil\x1b[2J.io 80",
        "CLDPD-ACCESS 1 1.2.3.4 TCP_DENIED 403 GET a.io 80 extra",
        "",
    ],
)
def test_other_log_lines_are_no_attempts(line):
    assert parse_access_line(line) is None


def test_a_blocked_event_renders_as_one_line():
    lines = RunLines(lambda text: text).lines(Event(EventType.EGRESS_BLOCKED, "evil.io:443"))
    assert [(line.kind, line.text) for line in lines] == [
        ("stderr", "⛔ egress blocked: evil.io:443")
    ]


def test_a_brokered_key_missing_on_the_host_is_one_sentence(pods_dir, monkeypatch):
    monkeypatch.delenv("CLDPD_TEST_ABSENT_KEY", raising=False)
    pod = pods_dir / "p"
    pod.mkdir()
    (pod / "Dockerfile").write_text("FROM busybox\n")
    (pod / "pod.json").write_text(
        json.dumps(
            {"network": {"allow": []}, "credentials": {"anthropic": "CLDPD_TEST_ABSENT_KEY"}}
        )
    )
    with pytest.raises(InvalidRequestError, match="CLDPD_TEST_ABSENT_KEY is not set on this host"):
        Dispatcher(pods_dir, runner=object()).start_session(  # type: ignore[arg-type]
            "p", "https://github.com/o/r/issues/1"
        )


# --- the real engine ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def egress_base() -> Iterator[str]:
    """Builds the egress image from cldpd-debian:bookworm; fails in CI when that is missing."""
    import docker

    try:
        client = docker.from_env()
        client.images.get(EGRESS_BASE)
    except Exception as exc:
        message = f"no Docker engine with {EGRESS_BASE} ({type(exc).__name__}); run scripts/setup"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    old = os.environ.get("CLDPD_EGRESS_BASE")
    os.environ["CLDPD_EGRESS_BASE"] = EGRESS_BASE
    yield EGRESS_BASE
    if old is None:
        os.environ.pop("CLDPD_EGRESS_BASE", None)
    else:
        os.environ["CLDPD_EGRESS_BASE"] = old
    client.close()


@pytest.fixture
def made(docker_client) -> Iterator[list]:
    """Containers and networks a test made; removed after it."""
    things: list = []
    yield things
    for thing in reversed(things):
        with contextlib.suppress(Exception):
            thing.remove(force=True) if hasattr(thing, "kill") else thing.remove()


@pytest.fixture
def web_hosts(docker_client, made) -> list[str]:
    """Two busybox web servers on the default bridge; their addresses."""
    addresses = []
    for index in range(2):
        container = docker_client.containers.run(
            "busybox:latest",
            [
                "sh",
                "-c",
                f"mkdir /www && echo content-of-host-{index} > /www/index.html "
                "&& exec httpd -f -p 8080 -h /www",
            ],
            detach=True,
            labels=TEST_LABEL,
        )
        made.append(container)
        container.reload()
        addresses.append(container.attrs["NetworkSettings"]["IPAddress"])
    return addresses


def egress_leftovers(docker_client, container: str) -> list[str]:
    label = f"{LABEL_EGRESS_OF}={container}"
    found = [c.name for c in docker_client.containers.list(all=True, filters={"label": label})]
    found += [n.name for n in docker_client.networks.list(filters={"label": label})]
    return found


def run_session(dispatcher: Dispatcher, pod: str) -> tuple[int, list[Event]]:
    session = dispatcher.start_session(pod, "https://github.com/o/r/issues/1")
    code = session.wait(timeout=300)
    return code, list(session.events())


@pytest.mark.docker
def test_allowlist_lets_allowed_hosts_through_and_reports_the_rest(
    egress_base, web_hosts, make_pod, pods_dir, transcript_dir, docker_client
):
    allowed, denied = web_hosts
    pod = make_pod(
        f"""
        wget -q -O - http://{allowed}:8080/ && echo via-proxy-ok
        wget -q -O - http://{denied}:8080/ || echo denied-refused
        unset http_proxy HTTP_PROXY https_proxy HTTPS_PROXY
        printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {allowed} 8080 || echo direct-failed
        printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {denied} 8080 || echo direct-failed
        """,
        pod_json={"network": {"allow": [f"{allowed}:8080"]}},
    )
    dispatcher = Dispatcher(pods_dir, transcript_dir=transcript_dir)
    code, events = run_session(dispatcher, pod)
    out = "\n".join(e.data for e in events if e.type is EventType.OUTPUT)
    assert code == 0, out
    assert "content-of-host-0" in out and "via-proxy-ok" in out
    assert "content-of-host-1" not in out and "denied-refused" in out
    assert out.count("content-of-host-0") == 1  # the direct connection got nothing
    assert out.count("direct-failed") == 2
    blocked = [e.data for e in events if e.type is EventType.EGRESS_BLOCKED]
    assert blocked == [f"{denied}:8080"]
    session_events = read_transcript(next(transcript_dir.glob(f"{pod}-*.jsonl")))
    assert [e.data for e in session_events if e.type is EventType.EGRESS_BLOCKED] == blocked
    attempts = dispatcher.egress_attempts(pod)
    assert [(a.target, a.allowed) for a in attempts] == [
        (f"{allowed}:8080", True),
        (f"{denied}:8080", False),
    ]
    assert egress_leftovers(docker_client, f"cldpd-{pod}") == []


@pytest.mark.docker
def test_https_goes_through_connect_only_to_allowed_hosts(
    egress_base, web_hosts, make_pod, pods_dir, transcript_dir, docker_client
):
    allowed, _ = web_hosts
    # CONNECT is allowed to the allowlist's port only: 8080 here, 443 refused.
    pod = make_pod(
        f"""
        printf 'CONNECT {allowed}:8080 HTTP/1.1\\r\\nHost: {allowed}:8080\\r\\n\\r\\n'\\
'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 ${{HTTPS_PROXY#http://}} | grep -c content-of-host-0
        printf 'CONNECT {allowed}:443 HTTP/1.1\\r\\n\\r\\n' | nc -w 5 ${{HTTPS_PROXY#http://}} \\
            | head -1
        """.replace(":3128", " 3128"),
        pod_json={"network": {"allow": [f"{allowed}:8080"]}},
    )
    code, events = run_session(Dispatcher(pods_dir, transcript_dir=transcript_dir), pod)
    out = "\n".join(e.data for e in events if e.type is EventType.OUTPUT)
    assert code == 0, out
    assert [e.data for e in events if e.type is EventType.EGRESS_BLOCKED] == [f"{allowed}:443"]
    assert "403" in out


@pytest.mark.docker
def test_setup_failure_and_the_run_end_leave_no_egress_behind(
    egress_base, make_pod, pods_dir, transcript_dir, docker_client
):
    pod = make_pod("exit 3", pod_json={"network": {"allow": ["example.com"]}})
    code, _ = run_session(Dispatcher(pods_dir, transcript_dir=transcript_dir), pod)
    assert code == 3
    assert egress_leftovers(docker_client, f"cldpd-{pod}") == []


@pytest.mark.docker
def test_an_engine_that_does_not_isolate_is_refused_in_one_sentence(egress_base, docker_client):
    from cldpd_magic.engines.docker.runner import DockerRunner

    class LeakyEngine(DockerRunner):
        """The real engine, whose isolation probe is made to succeed (as on --iptables=false)."""

        def run(self, opts, stdout, stderr=None, on_start=None):
            return 0 if opts.cmd[:1] == ["probe"] else super().run(opts, stdout, stderr, on_start)

    container = f"cldpd-egress-test-{uuid.uuid4().hex[:8]}"
    guard = EgressGuard(LeakyEngine(), container, EgressPolicy())
    with pytest.raises(ContainerFailedError) as info:
        guard.setup(RunOptions(image="busybox:latest", name=container, cmd=["true"]))
    assert "does not isolate internal networks" in str(info.value)
    assert "\n" not in str(info.value)
    assert egress_leftovers(docker_client, container) == []


@pytest.fixture
def iptables_off_engine(egress_base) -> Iterator[ExtraEngine]:
    """A second dockerd started with --iptables=false, holding the egress images."""
    from cldpd_magic.engines.docker.runner import DockerRunner

    tag = EgressGuard(DockerRunner(), "cldpd-egress-image", EgressPolicy()).ensure_image()
    engine = start_extra_engine()
    try:
        saved = subprocess.run(
            ["docker", "save", tag, rules_image_tag(tag)], check=True, capture_output=True
        ).stdout
        engine.docker("load", input=saved)
        yield engine
    finally:
        stop_extra_engine(engine)


@pytest.mark.docker
def test_an_engine_with_iptables_off_refuses_an_allowlist_before_the_pod_runs(
    iptables_off_engine, make_pod, pods_dir, transcript_dir
):
    """On this host the main engine's FORWARD policy drops what that engine lets through:

    its internal networks are isolated by luck, not enforced, and the pod is refused."""
    pod = make_pod("echo the-agent-ran", pod_json={"network": {"allow": ["example.com"]}})
    runner = docker_runner_for(parse_engine(iptables_off_engine.entry))
    dispatcher = Dispatcher(pods_dir, runner, transcript_dir=transcript_dir)
    session = dispatcher.start_session(pod, "https://github.com/o/r/issues/1")
    with pytest.raises(ContainerFailedError) as info:
        session.wait(timeout=300)
    message = str(info.value)
    assert "does not isolate internal networks" in message and "--iptables=false" in message
    assert "\n" not in message
    events = list(session.events())
    assert EventType.CONTAINER_STARTED not in [e.type for e in events]
    assert not any("the-agent-ran" in e.data for e in events)
    left = iptables_off_engine.docker("ps", "-aq", "--filter", f"label={LABEL_EGRESS_OF}")
    networks = iptables_off_engine.docker(
        "network", "ls", "-q", "--filter", f"label={LABEL_EGRESS_OF}"
    )
    assert left.stdout.split() == networks.stdout.split() == []


class _DnsSink:
    """A UDP socket on a Docker network's gateway (the host) that records DNS queries."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((address, 53))
        self.sock.settimeout(0.2)

    def received(self, marker: str) -> bool:
        seen = False
        with contextlib.suppress(TimeoutError):
            while True:
                data, _ = self.sock.recvfrom(4096)
                seen = seen or marker.encode() in data
        return seen

    def close(self) -> None:
        self.sock.close()


@pytest.mark.docker
def test_dns_of_arbitrary_names_does_not_leave_the_internal_network(
    egress_base, docker_client, made
):
    """Docker's embedded resolver forwards an internal network's queries to the host.

    The control shows it: a container on a plain internal network whose DNS server is
    the host (that network's gateway) gets its query there. A pod behind the egress
    proxy has the egress container as its DNS server, which serves none, and no way to
    the host: the same query, and one sent to the host directly, reach nothing outside.
    """
    from cldpd_magic.engines.docker.runner import DockerRunner

    runner = DockerRunner()
    container = f"cldpd-egress-test-{uuid.uuid4().hex[:8]}"
    plain = docker_client.networks.create(
        f"cldpd-test-dns-{uuid.uuid4().hex[:8]}", internal=True, labels=TEST_LABEL
    )
    made.append(plain)
    guard = EgressGuard(runner, container, EgressPolicy())
    opts = guard.setup(RunOptions(image="busybox:latest", name=container, cmd=[]))
    try:
        # Docker gives the plain network's bridge its address when a container joins.
        runner.run(RunOptions(image="busybox:latest", name=f"{container}-up", cmd=["true"],
                              network=plain.name, labels=TEST_LABEL), io.StringIO())  # fmt: skip
        gateway = docker_client.api.inspect_network(plain.id)["IPAM"]["Config"][0]["Gateway"]
        sink = _DnsSink(gateway)
        try:
            results = {}
            cases = (
                ("control", plain.name, [gateway], ""),
                ("pod", opts.network, opts.dns, ""),
                ("pod-asks-the-host", opts.network, opts.dns, gateway),
            )
            for case, network, dns, server in cases:
                marker = f"leak{uuid.uuid4().hex[:10]}"
                run = RunOptions(
                    **{
                        **opts.__dict__,
                        "name": f"{container}-{case}",
                        "cmd": ["sh", "-c", f"nslookup {marker}.example.com {server}; true"],
                        "network": network,
                        "dns": dns,
                        "labels": TEST_LABEL,
                    }
                )
                runner.run(run, io.StringIO())
                results[case] = sink.received(marker)
        finally:
            sink.close()
    finally:
        guard.remove()
    assert results == {"control": True, "pod": False, "pod-asks-the-host": False}
    assert opts.dns and opts.dns[0] != gateway


@pytest.fixture
def upstream_network(docker_client, made) -> str:
    """A Docker network this test made; its gateway is a host address containers reach."""
    network = docker_client.networks.create(
        f"cldpd-test-up-{uuid.uuid4().hex[:8]}", labels=TEST_LABEL
    )
    made.append(network)
    return docker_client.api.inspect_network(network.id)["IPAM"]["Config"][0]["Gateway"]


@pytest.mark.docker
def test_the_brokered_key_reaches_upstream_and_no_container_holds_it(
    egress_base, upstream_network, make_pod, pods_dir, transcript_dir, docker_client, monkeypatch
):
    from cldpd_magic.model_server.server import ScriptedModelServer

    real_key = f"sk-ant-real-{uuid.uuid4().hex}"
    monkeypatch.setenv("CLDPD_TEST_BROKERED_KEY", real_key)
    with ScriptedModelServer(host=upstream_network, api_key=real_key) as model:
        pod = make_pod(
            """
            body='{"model":"m","max_tokens":9,"messages":[{"role":"user","content":"hi"}]}'
            wget -Y off -q -O - --header "x-api-key: $ANTHROPIC_API_KEY" \\
                --header 'anthropic-version: 2023-06-01' \\
                --header 'content-type: application/json' \\
                --post-data "$body" "$ANTHROPIC_BASE_URL/v1/messages" && echo
            echo "key=$ANTHROPIC_API_KEY"
            environ() { tr '\\0' '\\n' </proc/1/environ | grep -c "$1"; }
            echo "environ-holds-real=$(environ sk-ant-real)"
            echo "environ-holds-placeholder=$(environ cldpd-brokered-)"
            sleep 2
            """,
            pod_json={
                "network": {"allow": []},
                "credentials": {"anthropic": "CLDPD_TEST_BROKERED_KEY"},
                "env": {"ANTHROPIC_BASE_URL": model.url},
                "keepAlive": False,
            },
        )
        dispatcher = Dispatcher(pods_dir, transcript_dir=transcript_dir)
        session = dispatcher.start_session(pod, "https://github.com/o/r/issues/1")
        inspected = []
        for event in session.events():
            if event.type is EventType.CONTAINER_STARTED:
                label = f"{LABEL_EGRESS_OF}=cldpd-{pod}"
                egress = docker_client.containers.list(filters={"label": label})
                for container in [docker_client.containers.get(f"cldpd-{pod}"), *egress]:
                    inspected.append(json.dumps(docker_client.api.inspect_container(container.id)))
                for container in egress:
                    result = container.exec_run(
                        ["sh", "-c", "cat /proc/*/environ; grep -rl sk-ant-real /tmp /etc"]
                    )
                    inspected.append(result.output.decode(errors="replace"))
                break
        code = session.wait(timeout=300)
        out = "\n".join(e.data for e in session.events() if e.type is EventType.OUTPUT)
        err = "\n".join(e.data for e in session.events() if e.type is EventType.STDERR)
        requests = model.requests
    assert code == 0, out
    assert len(inspected) == 3  # the pod, its egress container, what that one holds
    assert all(real_key not in text for text in inspected)
    assert f"key={PLACEHOLDER}" in out
    assert "environ-holds-real=0" in out and "environ-holds-placeholder=1" in out
    assert '"type":"message"' in out.replace(" ", ""), err
    assert [r.headers.get("x-api-key") for r in requests] == [real_key]
    assert real_key not in out  # and a leak would be masked anyway
    assert egress_leftovers(docker_client, f"cldpd-{pod}") == []


# --- the notebook --------------------------------------------------------------------------


def test_egress_of_a_run_without_a_proxy_is_one_sentence(ip):
    from IPython.core.error import UsageError

    with pytest.raises(UsageError, match="No run 'ghost' with a network allowlist") as info:
        ip.run_line_magic("cldpd_egress", "ghost")
    assert "\n" not in str(info.value)


@pytest.mark.docker
def test_the_cell_shows_blocked_attempts_and_cldpd_egress_lists_them(
    egress_base, web_hosts, make_pod, ip, docker_client
):
    from IPython.utils.capture import capture_output

    allowed, denied = web_hosts
    pod = make_pod(
        f"wget -q -O - http://{allowed}:8080/\nwget -q -O - http://{denied}:8080/\ntrue",
        pod_json={"network": {"allow": [f"{allowed}:8080"]}},
    )
    with capture_output() as captured:
        ip.run_line_magic("cldpd_start", f"{pod} https://github.com/o/r/issues/1")
    shown = "\n".join(o.data.get("text/plain", "") for o in captured.outputs)
    assert f"⛔ egress blocked: {denied}:8080" in shown
    table = ip.run_line_magic("cldpd_egress", pod)
    assert [(r["host:port"], r["verdict"]) for r in table.records()] == [
        (f"{allowed}:8080", "allowed"),
        (f"{denied}:8080", "blocked"),
    ]
    assert "1 allowed, 1 blocked" in table.title
    assert egress_leftovers(docker_client, f"cldpd-{pod}") == []


# --- the real Claude Code CLI ------------------------------------------------------------


@pytest.mark.claude
@pytest.mark.docker
def test_the_real_cli_completes_a_turn_through_the_broker(
    egress_base, upstream_network, pods_dir, transcript_dir, docker_client, monkeypatch
):
    import re
    import shutil

    from cldpd_magic.model_server.server import ScriptedModelServer

    repo = Path(__file__).resolve().parent.parent
    setup = (repo / "scripts" / "setup").read_text(encoding="utf-8")
    version = re.search(r"^claude_code_version=(\S+)$", setup, re.MULTILINE)
    assert version, "no pinned Claude Code version in scripts/setup"
    image = f"cldpd-claude-code:{version.group(1)}"
    try:
        docker_client.images.get(image)
    except Exception:
        if os.environ.get("CI"):
            pytest.fail(f"no {image}; run scripts/setup")
        pytest.skip(f"no {image}; run scripts/setup")

    real_key = f"sk-ant-real-{uuid.uuid4().hex}"
    monkeypatch.setenv("CLDPD_TEST_BROKERED_KEY", real_key)
    name = f"claude{uuid.uuid4().hex[:8]}"
    pod = pods_dir / name
    shutil.copytree(repo / "cldpd_magic" / "templates" / "claude-offline", pod)
    config = json.loads((pod / "pod.json").read_text())
    config.pop("unsafe", None)  # the template's waiver of "network": "host", replaced below
    tag = f"cldpd-test-egress-claude-{uuid.uuid4().hex[:8]}"
    with ScriptedModelServer(host=upstream_network, api_key=real_key) as model:
        config.update(
            image=tag,
            buildArgs={"BASE_IMAGE": image},
            network={"allow": []},
            credentials={"anthropic": "CLDPD_TEST_BROKERED_KEY"},
            inheritEnv=[],
            args=["--max-turns", "2"],
        )
        config["env"].update({"ANTHROPIC_BASE_URL": model.url, "CLAUDE_CODE_MAX_RETRIES": "0"})
        (pod / "pod.json").write_text(json.dumps(config))
        try:
            dispatcher = Dispatcher(pods_dir, transcript_dir=transcript_dir)
            session = dispatcher.start_session(name, "https://github.com/o/r/issues/1")
            code = session.wait(timeout=300)
            events = list(session.events())
            requests = model.conversation_requests()
        finally:
            with contextlib.suppress(Exception):
                docker_client.containers.get(f"cldpd-{name}").remove(force=True)
            with contextlib.suppress(Exception):
                docker_client.images.remove(tag, noprune=True)
    lines = [e.data for e in events if e.type in (EventType.OUTPUT, EventType.STDERR)]
    stream = []
    for line in lines:
        with contextlib.suppress(ValueError):
            stream.append(json.loads(line))
    results = [e for e in stream if isinstance(e, dict) and e.get("type") == "result"]
    assert code == 0, "\n".join(lines[-20:])
    assert len(results) == 1 and not results[0].get("is_error"), "\n".join(lines[-20:])
    assert requests and all(r.headers.get("x-api-key") == real_key for r in requests)
    assert all(real_key not in line for line in lines)
    assert egress_leftovers(docker_client, f"cldpd-{name}") == []


@pytest.mark.docker
def test_a_kept_alive_pod_keeps_its_egress_until_it_is_stopped(
    egress_base, make_pod, pods_dir, transcript_dir, docker_client
):
    pod = make_pod("echo agent-done", pod_json={"network": {"allow": []}, "keepAlive": True})
    dispatcher = Dispatcher(pods_dir, transcript_dir=transcript_dir)
    code, _ = run_session(dispatcher, pod)
    assert code == 0
    container = f"cldpd-{pod}"
    try:
        assert docker_client.containers.get(container).status == "running"
        assert len(egress_leftovers(docker_client, container)) == 2  # container and network
    finally:
        dispatcher.stop(pod, timeout=5)
    assert egress_leftovers(docker_client, container) == []


@pytest.mark.docker
def test_a_resume_of_a_kept_alive_pod_reports_its_own_blocked_attempts(
    egress_base, make_pod, pods_dir, transcript_dir
):
    # The agent lives on after a refusal, as a real one does: its log line has time to come.
    pod = make_pod(
        """
        case "$*" in
          *--resume*) wget -q -O - http://on-resume.example/ || echo refused; sleep 3 ;;
          *) wget -q -O - http://on-start.example/ || echo refused; sleep 3 ;;
        esac
        """,
        pod_json={"network": {"allow": []}, "keepAlive": True},
    )
    dispatcher = Dispatcher(pods_dir, transcript_dir=transcript_dir)
    try:
        code, start_events = run_session(dispatcher, pod)
        assert code == 0
        resume = dispatcher.resume_session(pod, "go on")
        assert resume.wait(timeout=300) == 0
        resume_events = list(resume.events())
    finally:
        dispatcher.stop(pod, timeout=5)
    blocked = EventType.EGRESS_BLOCKED
    assert [e.data for e in start_events if e.type is blocked] == ["on-start.example:80"]
    assert [e.data for e in resume_events if e.type is blocked] == ["on-resume.example:80"]
    transcript = read_transcript(resume.transcript)
    assert [e.data for e in transcript if e.type is blocked] == ["on-resume.example:80"]


def test_several_engines_refuse_an_allowlist_in_one_sentence():
    guard = EgressGuard(object(), "cldpd-p", EgressPolicy())
    with pytest.raises(ContainerFailedError, match="single Docker engine") as info:
        guard.ensure_image()
    assert "\n" not in str(info.value)


def orphan(runner, made_guards: list) -> str:
    """Set up the egress of a run whose container is never made; its container name."""
    container = f"cldpd-egress-test-{uuid.uuid4().hex[:8]}"
    guard = EgressGuard(runner, container, EgressPolicy())
    made_guards.append(guard)
    guard.setup(RunOptions(image="busybox:latest", name=container, cmd=[]))
    return container


@pytest.fixture
def guards() -> Iterator[list]:
    """Egress guards a test set up; removed after it."""
    made: list[EgressGuard] = []
    yield made
    for guard in made:
        guard.remove()


@pytest.mark.docker
def test_a_sweep_removes_egress_whose_run_is_gone_and_keeps_the_rest(
    egress_base, docker_client, made, guards
):
    from cldpd_magic.engines.docker.runner import DockerRunner

    runner = DockerRunner()
    gone = orphan(runner, guards)
    alive = f"cldpd-egress-test-{uuid.uuid4().hex[:8]}"
    made.append(
        docker_client.containers.create("busybox:latest", ["true"], name=alive, labels=TEST_LABEL)
    )
    guard = EgressGuard(runner, alive, EgressPolicy())
    guards.append(guard)
    guard.setup(RunOptions(image="busybox:latest", name=alive, cmd=[]))
    time.sleep(3)  # older than the grace below: the sweep takes them for left behind
    young = orphan(runner, guards)
    removed = egress.sweep_orphans(runner, grace=2)
    assert egress_leftovers(docker_client, gone) == []
    ours = {egress.egress_name(n) for n in (gone, alive, young)}
    assert sorted(n for n in removed if n in ours) == [egress.egress_name(gone)] * 2
    assert len(egress_leftovers(docker_client, alive)) == 2  # its run's container is there
    assert len(egress_leftovers(docker_client, young)) == 2  # it may be starting


@pytest.mark.docker
def test_starting_an_allowlisted_run_sweeps_egress_a_killed_kernel_left(
    egress_base, make_pod, pods_dir, transcript_dir, docker_client, guards, monkeypatch
):
    from cldpd_magic.engines.docker.runner import DockerRunner

    left = orphan(DockerRunner(), guards)
    assert len(egress_leftovers(docker_client, left)) == 2
    monkeypatch.setattr(egress, "ORPHAN_GRACE", 2.0)
    time.sleep(3)
    pod = make_pod("exit 0", pod_json={"network": {"allow": []}})
    code, _ = run_session(Dispatcher(pods_dir, transcript_dir=transcript_dir), pod)
    assert code == 0
    assert egress_leftovers(docker_client, left) == []


@pytest.mark.docker
def test_listing_runs_sweeps_egress_a_killed_kernel_left(
    egress_base, pods_dir, transcript_dir, docker_client, guards, monkeypatch
):
    from cldpd_magic.engines.docker.runner import DockerRunner

    left = orphan(DockerRunner(), guards)
    monkeypatch.setattr(egress, "ORPHAN_GRACE", 2.0)
    time.sleep(3)
    Dispatcher(pods_dir, transcript_dir=transcript_dir).running()
    assert egress_leftovers(docker_client, left) == []


def wait_for(found: list, count: int) -> list:
    """``found`` once it holds ``count`` items (the proxy's log arrives a moment later)."""
    deadline = time.monotonic() + 60
    while len(found) < count and time.monotonic() < deadline:
        time.sleep(0.1)
    return found


@pytest.mark.docker
def test_attempts_go_to_the_session_that_is_running_also_from_a_new_process(egress_base, guards):
    """A kept-alive pod's start session has ended when it is resumed: its proxy's
    blocked attempts go to the resume, in the process that started it or another one."""
    from cldpd_magic.engines.docker.runner import DockerRunner

    runner = DockerRunner()
    container = f"cldpd-egress-test-{uuid.uuid4().hex[:8]}"
    started: list = []
    guard = EgressGuard(runner, container, EgressPolicy(), on_attempt=started.append)
    guards.append(guard)
    opts = guard.setup(RunOptions(image="busybox:latest", name=container, cmd=[]))

    def attempt(host: str) -> None:
        fetch = f"wget -q -O - http://{host}/ || true"
        runner.run(replace(opts, name=f"{container}-{host[:3]}", cmd=["sh", "-c", fetch],
                           labels=TEST_LABEL), io.StringIO())  # fmt: skip

    attempt("first.example")
    assert [a.target for a in wait_for(started, 1)] == ["first.example:80"]
    resumed: list = []
    with egress.egress_reports({container: guard}, runner, container, resumed.append):
        attempt("second.example")
        assert [a.target for a in wait_for(resumed, 1)] == ["second.example:80"]
    assert [a.target for a in started] == ["first.example:80"]
    other_process: dict[str, EgressGuard] = {}
    elsewhere: list = []
    with egress.egress_reports(other_process, runner, container, elsewhere.append):
        attempt("third.example")
        assert [a.target for a in wait_for(elsewhere, 1)] == ["third.example:80"]
    guards.append(other_process[container])
    assert [a.target for a in other_process[container].attempts] == ["third.example:80"]
    assert [a.target for a in resumed] == ["second.example:80"]
    with egress.egress_reports({}, runner, "cldpd-no-such-run", elsewhere.append):
        pass  # a run without a proxy reports nothing, and is no error


class _Images:
    """A runner stand-in that has some images."""

    def __init__(self, *tags: str) -> None:
        self.tags = set(tags)

    def image_exists(self, tag: str) -> bool:
        return tag in self.tags


@pytest.mark.parametrize(
    ("variable", "images", "expected"),
    [
        (None, ["cldpd-debian:bookworm"], "cldpd-debian:bookworm"),
        (None, [], "debian:bookworm-slim"),
        ("my-debian:12", ["cldpd-debian:bookworm"], "my-debian:12"),
        ("", ["cldpd-debian:bookworm"], "cldpd-debian:bookworm"),
    ],
)
def test_the_egress_base_is_the_offline_debian_when_the_engine_has_it(
    monkeypatch, variable, images, expected
):
    if variable is None:
        monkeypatch.delenv("CLDPD_EGRESS_BASE", raising=False)
    else:
        monkeypatch.setenv("CLDPD_EGRESS_BASE", variable)
    assert egress.egress_base(_Images(*images)) == expected


@pytest.mark.docker
def test_without_the_variable_the_real_engine_builds_from_its_offline_debian(
    egress_base, monkeypatch
):
    from cldpd_magic.engines.docker.runner import DockerRunner

    monkeypatch.delenv("CLDPD_EGRESS_BASE")
    runner = DockerRunner()
    assert egress.egress_base(runner) == EGRESS_BASE
    tag = EgressGuard(runner, "cldpd-egress-image", EgressPolicy()).ensure_image()
    assert tag == egress.egress_image_tag(EGRESS_BASE)
    assert runner.image_exists(tag)


def test_squid_allows_only_the_allowlist_and_only_from_the_pods_network():
    import importlib.util

    from cldpd_magic.runs.egress import DATA_DIR

    spec = importlib.util.spec_from_file_location("cldpd_egress", DATA_DIR / "cldpd_egress.py")
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    policy = parse_network_allow(POD_JSON, {"allow": ["a.io", "*.b.io:8443", "10.1.2.3"]})
    allow = [r.squid() for r in policy.allow]
    conf = entry.squid_conf(
        {"subnet": "172.30.0.0/16", "listen": "172.30.0.2", "proxy_port": 3128, "allow": allow}
    )
    access = [line for line in conf.splitlines() if line.startswith(("acl", "http_access"))]
    assert access == [
        "acl pods src 172.30.0.0/16",
        "acl default_ports port 80 443",
        f"acl ip_literal dstdom_regex -n {entry.IP_LITERAL_PATTERNS}",
        f"acl private_dst dst {entry.PRIVATE_RANGES}",
        "http_access deny !pods",
        "acl allow0 dstdomain -n a.io",
        "http_access allow allow0 default_ports !private_dst",
        "acl allow1 dstdomain -n .b.io",
        "acl port1 port 8443",
        "http_access allow allow1 port1 !private_dst",
        "acl allow2 dst 10.1.2.3",
        "http_access allow ip_literal allow2 default_ports",
        "http_access deny all",
    ]
    lines = conf.splitlines()
    assert "cache deny all" in lines and "httpd_suppress_version_string on" in lines
    assert "http_port 172.30.0.2:3128" in lines


def test_egress_resources_parse_and_fill_in_the_defaults():
    config = parse_pod_config(
        POD_JSON,
        json.dumps({"network": {"allow": []}, "egressResources": {"memory": "512m", "pids": 64}}),
    )
    limits = egress.egress_resources(config.egress_resources)
    assert (limits.cpus, limits.memory, limits.pids) == (
        egress.EGRESS_RESOURCES.cpus,
        512 << 20,
        64,
    )
    assert egress.egress_resources(None) == egress.EGRESS_RESOURCES
    message = config_error({"egressResources": {"memory": "512m"}})
    assert "'egressResources' sets the limits of the egress proxy" in message
    assert "egressResources.pids" in config_error(
        {"network": {"allow": []}, "egressResources": {"pids": 0}}
    )


@pytest.mark.docker
def test_the_egress_container_gets_the_pods_egress_resources(egress_base, docker_client, guards):
    from cldpd_magic.engines.docker.runner import DockerRunner
    from cldpd_magic.pods import Resources

    container = f"cldpd-egress-test-{uuid.uuid4().hex[:8]}"
    guard = EgressGuard(
        DockerRunner(), container, EgressPolicy(), resources=Resources(memory=96 << 20)
    )
    guards.append(guard)
    guard.setup(RunOptions(image="busybox:latest", name=container, cmd=[]))
    config = docker_client.api.inspect_container(guard.proxy)["HostConfig"]
    assert config["Memory"] == 96 << 20
    assert config["PidsLimit"] == egress.EGRESS_RESOURCES.pids
    assert config["ReadonlyRootfs"] is True


@pytest.mark.docker
def test_a_sweep_removes_young_egress_whose_process_is_gone(egress_base, docker_client, guards):
    """Egress made by a killed process goes at once, however young; a live one's stays."""
    from cldpd_magic.engines.docker.runner import DockerRunner
    from cldpd_magic.engines.protocol import LABEL_CLIENT

    runner = DockerRunner()
    young = orphan(runner, guards)
    ours = egress.egress_name(young)
    assert egress.egress_name(young) not in egress.sweep_orphans(runner)  # the control
    dead = subprocess.run(
        [sys.executable, "-c", "from cldpd_magic.engines import this_client as t; print(t())"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    killed = EgressGuard(runner, f"cldpd-egress-test-{uuid.uuid4().hex[:8]}", EgressPolicy())
    guards.append(killed)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(EgressGuard, "labels", property(lambda self: {
            LABEL_EGRESS: self.policy.digest, LABEL_EGRESS_OF: self.container,
            LABEL_CLIENT: dead}))  # fmt: skip
        killed.setup(RunOptions(image="busybox:latest", name=killed.container, cmd=[]))
    removed = egress.sweep_orphans(runner)
    assert sorted(n for n in removed if n == killed.proxy) == [killed.proxy] * 2
    assert ours not in removed and len(egress_leftovers(docker_client, young)) == 2


def test_a_freed_runner_leaves_no_verdict_for_a_new_one():
    import gc

    class Runner:
        pass

    checked = Runner()
    egress._ISOLATING_ENGINES.add(checked)
    del checked
    gc.collect()
    assert not any(isinstance(r, Runner) for r in egress._ISOLATING_ENGINES)
    assert Runner() not in egress._ISOLATING_ENGINES


def test_only_a_single_engines_runner_sets_up_egress():
    """EgressRunner, the runner protocol egress needs: a DockerRunner meets it; several
    engines, a swarm and the fake do not, and egress leaves them alone."""
    from fakes import FakeRunner

    from cldpd_magic.engines import EgressRunner, Engine, MultiEngineRunner
    from cldpd_magic.engines.docker import DockerRunner
    from cldpd_magic.engines.swarm import SwarmRunner

    nowhere = DockerRunner(base_url="unix:///nonexistent/docker.sock")
    assert isinstance(nowhere, EgressRunner)
    multi = MultiEngineRunner([(Engine("x", "unix:///nonexistent/docker.sock"), nowhere)])
    for runner in (multi, SwarmRunner(nowhere), FakeRunner()):
        assert not isinstance(runner, EgressRunner)
        assert egress.sweep_orphans(runner) == []
        egress.remove_egress_of(runner, "cldpd-p")  # no egress to remove, and no engine asked
        with pytest.raises(ContainerFailedError, match="single Docker engine"):
            EgressGuard(runner, "cldpd-p", EgressPolicy()).ensure_image()
