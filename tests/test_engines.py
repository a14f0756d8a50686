"""Several engines: the setting, probing with timeouts, routing, one inventory (no Docker)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import socket
import subprocess
import threading
import types

import pytest
from fakes import FakeRunner, cat_agent, lines_agent

from cldpd_magic.engines.multi import UNREACHABLE, MultiEngineRunner
from cldpd_magic.engines.protocol import Runner, RunOptions, StdinPipe
from cldpd_magic.engines.setting import Engine, parse_engine, parse_engines
from cldpd_magic.errors import (
    DockerUnavailableError,
    InvalidRequestError,
    PodConfigError,
    SessionNotFoundError,
    StdinClosedError,
)
from cldpd_magic.pods import Mount, parse_pod_config

LOCAL = Engine("local", "unix:///var/run/docker.sock")
REMOTE = Engine("far", "tcp://10.1.2.3:2376")


def tls_dir(tmp_path):
    for name in ("ca.pem", "cert.pem", "key.pem"):
        (tmp_path / name).write_text("x")
    return tmp_path


# -- the setting ------------------------------------------------------------------


def test_endpoints_parse_with_names_and_tls(tmp_path):
    certs = tls_dir(tmp_path)
    engines = parse_engines(
        f"unix:///var/run/docker.sock, tcp://10.0.0.5:2376?tls={certs}&name=gpu,ssh://me@box"
    )
    assert [e.name for e in engines] == ["unix:///var/run/docker.sock", "gpu", "ssh://me@box"]
    assert engines[1].url == "tcp://10.0.0.5:2376"
    assert engines[1].tls == tuple(str(certs / f) for f in ("ca.pem", "cert.pem", "key.pem"))
    assert [e.remote for e in engines] == [False, True, True]
    assert not parse_engine("tcp://127.0.0.1:2376").remote


def test_the_environment_variable_is_the_fallback(monkeypatch):
    monkeypatch.setenv("CLDPD_ENGINES", "unix:///a.sock,unix:///b.sock")
    assert [e.url for e in parse_engines(None)] == ["unix:///a.sock", "unix:///b.sock"]
    assert [e.url for e in parse_engines(["unix:///c.sock"])] == ["unix:///c.sock"]
    monkeypatch.delenv("CLDPD_ENGINES")
    assert parse_engines(None) == []


def test_a_dict_entry_names_tls_files(tmp_path):
    engine = parse_engine(
        {"url": "tcp://h:1", "name": "h", "tls": {"ca": "/c", "cert": "/d", "key": "/k"}}
    )
    assert (engine.name, engine.tls) == ("h", ("/c", "/d", "/k"))


def test_a_docker_context_is_read_with_its_tls_files(tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    digest = hashlib.sha256(b"build-box").hexdigest()
    meta = tmp_path / "contexts" / "meta" / digest
    meta.mkdir(parents=True)
    meta.joinpath("meta.json").write_text(
        json.dumps({"Name": "build-box", "Endpoints": {"docker": {"Host": "tcp://b:2376"}}})
    )
    assert parse_engine("build-box").tls is None
    certs = tmp_path / "contexts" / "tls" / digest / "docker"
    certs.mkdir(parents=True)
    tls_dir(certs)
    engine = parse_engine("build-box")
    assert engine.name == "build-box" and engine.url == "tcp://b:2376"
    assert engine.tls == tuple(str(certs / f) for f in ("ca.pem", "cert.pem", "key.pem"))


@pytest.mark.parametrize(
    ("entry", "says"),
    [
        ("nosuchcontext", "neither an endpoint"),
        ("http://x", "unknown scheme"),
        ("tcp://h:1?tls=/nonexistent", "lacks ca.pem"),
        ("tcp://h:1?verify=0", "unknown option"),
        ("unix:///s?tls=/x", "tcp:// endpoints only"),
        ("swarm://", "names its manager"),
    ],
)
def test_bad_entries_are_one_sentence(entry, says, tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    with pytest.raises(PodConfigError, match=says) as info:
        parse_engine(entry)
    assert "\n" not in str(info.value)


def test_a_swarm_entry_may_name_a_registry(tmp_path):
    engine = parse_engine("swarm://unix:///var/run/docker.sock?registry=127.0.0.1:5000&name=s")
    assert (engine.name, engine.url, engine.swarm, engine.registry) == (
        "s", "unix:///var/run/docker.sock", True, "127.0.0.1:5000"
    )  # fmt: skip
    assert parse_engine("swarm://unix:///var/run/docker.sock").registry == ""
    with pytest.raises(PodConfigError, match="registry= names a registry as HOST or HOST:PORT"):
        parse_engine("swarm://unix:///var/run/docker.sock?registry=http://x/y")
    with pytest.raises(PodConfigError, match="unknown option 'registry'"):
        parse_engine("unix:///var/run/docker.sock?registry=127.0.0.1:5000")


def test_two_engines_may_not_share_a_name():
    with pytest.raises(PodConfigError, match="Two engines are named"):
        parse_engines(["unix:///a?name=x", "unix:///b?name=x"])


# -- routing ----------------------------------------------------------------------


@pytest.fixture
def two():
    near, far = FakeRunner(lines_agent("hi")), FakeRunner(lines_agent("far away"))
    multi = MultiEngineRunner([(LOCAL, near), (REMOTE, far)], probe_timeout=0.5, list_timeout=1)
    yield multi, near, far
    near.release()
    far.release()


def test_the_multi_engine_runner_is_a_runner(two):
    assert isinstance(two[0], Runner)


def test_runs_go_to_the_pinned_engine_and_carry_its_name(two):
    multi, near, far = two
    out, started = io.StringIO(), []
    assert multi.run(RunOptions("img", "c1", [], engine="far"), out, on_start=started.append) == 0
    assert out.getvalue() == "far away\n"
    assert [r.name for r in far.runs] == ["c1"] and near.runs == []
    assert started[0].engine == "far"
    multi.run(RunOptions("img", "c2", []), io.StringIO())
    assert [r.name for r in near.runs] == ["c2"]


def test_an_unknown_pin_is_one_sentence(two):
    with pytest.raises(PodConfigError, match="Engine 'nope' is not configured"):
        two[0].run(RunOptions("img", "c", [], engine="nope"), io.StringIO())


def test_builds_go_to_the_named_engine(two, tmp_path):
    multi, near, far = two
    multi.build("t:1", str(tmp_path), engine="tcp://10.1.2.3:2376")
    assert far.built == ["t:1"] and near.built == []


def test_local_mounts_are_refused_on_a_remote_engine(two):
    multi, _, far = two
    mount = Mount("/home/me/src", "/src")
    with pytest.raises(PodConfigError, match='add "remote": true') as info:
        multi.start(RunOptions("img", "c", [], mounts=[mount], engine="far"))
    assert "far" in str(info.value) and far.runs == []
    there = Mount("/srv/src", "/src", remote=True)
    assert multi.start(RunOptions("img", "c", [], mounts=[there], engine="far")).engine == "far"
    multi.start(RunOptions("img", "d", [], mounts=[mount]))  # the local engine takes it


def test_inventory_spans_engines_and_calls_follow_the_container(two):
    multi, near, far = two
    near.add_container("cldpd-a", {"cldpd.pod": "a"})
    far.add_container("cldpd-b", {"cldpd.pod": "b"})
    far.add_container("other", {"x": "1"})
    listed = multi.list("cldpd.pod")
    assert [(i.name, i.engine) for i in listed] == [("cldpd-a", "local"), ("cldpd-b", "far")]
    assert multi.inspect("cldpd-b").engine == "far"
    assert multi.inspect("missing") is None
    multi.stop("cldpd-b")
    assert far.stops == ["cldpd-b"] and near.stops == []
    multi.stop("missing")  # fine, as on one engine
    far._set_status("cldpd-b", "running")
    multi.exec("cldpd-b", ["ls"], io.StringIO())
    assert far.execs == [("cldpd-b", ["ls"])]
    multi.remove("cldpd-b")
    assert far.removed == ["cldpd-b"]
    with pytest.raises(SessionNotFoundError):
        multi.exec("cldpd-b", ["ls"], io.StringIO())


class HangingRunner(FakeRunner):
    """An engine that stopped answering: every call blocks until released."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.hang = False

    def preflight(self) -> None:
        if self.hang:
            self.gate.wait(30)
        super().preflight()

    def list(self, label):
        if self.hang:
            self.gate.wait(30)
        return super().list(label)

    def inspect(self, container):
        if self.hang:
            self.gate.wait(30)
        return super().inspect(container)


def test_an_engine_that_hangs_is_one_sentence_and_its_runs_show_unreachable():
    near, far = FakeRunner(), HangingRunner()
    multi = MultiEngineRunner(
        [(LOCAL, near), (REMOTE, far)], probe_timeout=0.2, list_timeout=0.3, retry_after=60
    )
    try:
        near.add_container("cldpd-a", {"cldpd.pod": "a"})
        far.add_container("cldpd-b", {"cldpd.pod": "b"})
        assert [i.status for i in multi.list("cldpd.pod")] == ["running", "running"]
        far.hang = True
        listed = multi.list("cldpd.pod")
        assert [(i.name, i.status) for i in listed] == [
            ("cldpd-a", "running"),
            ("cldpd-b", UNREACHABLE),
        ]
        with pytest.raises(DockerUnavailableError, match="ran on engine far, which does not"):
            multi.inspect("cldpd-b")
        with pytest.raises(DockerUnavailableError, match=r"^Engine far did not answer within"):
            multi.run(RunOptions("img", "c", [], engine="far"), io.StringIO())
        assert multi.inspect("cldpd-a").engine == "local"  # the other engine goes on
        assert multi.unreachable() == ["far"]
    finally:
        far.gate.set()
        far.release()


def test_an_engine_that_refuses_is_named():
    near = FakeRunner()
    near.unavailable = DockerUnavailableError("Docker is not reachable at unix:///x (no socket).")
    multi = MultiEngineRunner([(LOCAL, near)], probe_timeout=1)
    with pytest.raises(DockerUnavailableError, match=r"^Engine local does not answer: Docker is"):
        multi.preflight()
    assert multi.list("cldpd.pod") == []
    with pytest.raises(DockerUnavailableError, match=r"^Engine local"):
        multi.inspect("x")


# -- pod.json ---------------------------------------------------------------------


def test_pod_json_pins_an_engine_and_marks_remote_mounts(tmp_path):
    text = json.dumps(
        {
            "engine": "far",
            "mounts": [{"source": "/srv/src", "target": "/src", "remote": True}],
        }
    )
    config = parse_pod_config(tmp_path / "pod.json", text)
    assert config.engine == "far"
    assert config.mounts == (Mount("/srv/src", "/src", remote=True),)


@pytest.mark.parametrize(
    ("data", "says"),
    [
        ({"engine": 3}, "'engine' must be a string"),
        ({"engine": " "}, "'engine' must name a configured engine"),
        (
            {"mounts": [{"source": "/a", "target": "/b", "remote": "yes"}]},
            r"'mounts\[0\]\.remote' must be a boolean",
        ),
    ],
)
def test_bad_engine_keys_are_one_sentence(tmp_path, data, says):
    with pytest.raises(PodConfigError, match=says):
        parse_pod_config(tmp_path / "pod.json", json.dumps(data))


# -- wired in: Dispatcher, cldpd --engine, %config CldpdMagics.engines ------------------


def test_the_dispatcher_builds_its_runner_from_the_setting(pods_dir, monkeypatch):
    from cldpd_magic.engines.docker.runner import DockerRunner
    from cldpd_magic.runs.dispatcher import Dispatcher

    monkeypatch.delenv("CLDPD_ENGINES", raising=False)
    assert isinstance(Dispatcher(pods_dir).runner, DockerRunner)
    runner = Dispatcher(pods_dir, engines=["unix:///a.sock?name=a", "unix:///b.sock"]).runner
    assert isinstance(runner, MultiEngineRunner)
    assert [e.name for e in runner.engines] == ["a", "unix:///b.sock"]
    monkeypatch.setenv("CLDPD_ENGINES", "unix:///c.sock")
    assert [e.url for e in Dispatcher(pods_dir).runner.engines] == ["unix:///c.sock"]
    with pytest.raises(PodConfigError, match="unknown scheme"):
        Dispatcher(pods_dir, engines="http://x")


def test_a_pinned_pod_builds_and_runs_on_its_engine(pods_dir, transcript_dir, two):
    from fakes import ISSUE_URL, write_pod

    from cldpd_magic.runs.dispatcher import Dispatcher

    multi, near, far = two
    write_pod(pods_dir, "pinned", {"engine": "far"})
    write_pod(pods_dir, "plain")
    dispatcher = Dispatcher(pods_dir, multi, transcript_dir)
    assert dispatcher.start_session("pinned", ISSUE_URL).wait(30) == 0
    assert dispatcher.start_session("plain", ISSUE_URL).wait(30) == 0
    assert far.built == ["cldpd-pinned"] and [r.name for r in far.runs] == ["cldpd-pinned"]
    assert near.built == ["cldpd-plain"] and [r.name for r in near.runs] == ["cldpd-plain"]


def test_a_pod_with_local_mounts_on_a_remote_engine_fails_with_one_sentence(
    pods_dir, transcript_dir, two
):
    from fakes import ISSUE_URL, write_pod

    from cldpd_magic.runs.dispatcher import Dispatcher

    multi, _, far = two
    mounts = [{"source": str(pods_dir), "target": "/src"}]
    write_pod(pods_dir, "mounted", {"engine": "far", "mounts": mounts})
    session = Dispatcher(pods_dir, multi, transcript_dir).start_session("mounted", ISSUE_URL)
    with pytest.raises(PodConfigError, match='add "remote": true to that mount'):
        session.wait(30)
    assert far.runs == []


def test_the_inventory_finds_runs_on_every_engine(pods_dir, transcript_dir, two):
    from cldpd_magic.runs.dispatcher import Dispatcher

    multi, near, far = two
    near.add_container("cldpd-a", {"cldpd.pod": "a"})
    far.add_container("cldpd-b", {"cldpd.pod": "b"})
    running = Dispatcher(pods_dir, multi, transcript_dir).running()
    assert [(r.pod, r.container, r.engine) for r in running] == [
        ("a", "cldpd-a", LOCAL.name), ("b", "cldpd-b", REMOTE.name)
    ]  # fmt: skip


def test_the_sessions_table_has_an_engine_column_with_several_engines(two, pods_dir):
    from cldpd_magic.magics.inventory import InventoryMagics
    from cldpd_magic.magics.run import CldpdMagics

    multi, near, far = two
    near.add_container("cldpd-a", {"cldpd.pod": "a"})
    far.add_container("cldpd-b", {"cldpd.pod": "b"})
    core = CldpdMagics(shell=None)
    core.pods_dir = str(pods_dir)
    core.runner = multi
    table = InventoryMagics(None, core).cldpd_sessions("")["containers"]
    assert [(r["container"], r["engine"]) for r in table.records()] == [
        ("cldpd-a", LOCAL.name), ("cldpd-b", REMOTE.name)
    ]  # fmt: skip


def test_cldpd_takes_engines():
    from cldpd_magic.cli import build_parser

    args = build_parser().parse_args(["--engine", "unix:///a", "--engine", "ctx", "list"])
    assert args.engine == ["unix:///a", "ctx"]
    assert build_parser().parse_args(["list"]).engine is None


def test_the_magics_take_engines_from_config(monkeypatch):
    from cldpd_magic.magics.run import CldpdMagics

    monkeypatch.delenv("CLDPD_ENGINES", raising=False)
    magics = CldpdMagics(shell=None)
    magics.engines = ["unix:///a.sock?name=a"]
    assert [e.name for e in magics.runner.engines] == ["a"]
    magics.engines = ["unix:///b.sock?name=b"]
    assert [e.name for e in magics.runner.engines] == ["b"]


def test_one_engine_alone_refuses_a_pinned_pod_without_touching_docker(tmp_path):
    from cldpd_magic.engines.docker.runner import DockerRunner

    runner = DockerRunner(base_url="unix:///nonexistent.sock")
    with pytest.raises(PodConfigError, match="pinned to engine 'far', but no engines are"):
        runner.build("t", str(tmp_path), engine="far")


@pytest.mark.docker
def test_a_pinned_pod_on_one_engine_fails_its_start_with_one_sentence(
    docker_client, pods_dir, transcript_dir
):
    from fakes import ISSUE_URL, write_pod

    from cldpd_magic.engines.docker.runner import DockerRunner
    from cldpd_magic.runs.dispatcher import Dispatcher

    write_pod(pods_dir, "pinned", {"engine": "far"})
    session = Dispatcher(pods_dir, DockerRunner(), transcript_dir).start_session(
        "pinned", ISSUE_URL
    )
    with pytest.raises(PodConfigError, match="no engines are configured") as info:
        session.wait(60)
    assert "\n" not in str(info.value)


# -- confinement: one reading of RunOptions for every engine ------------------------


def _settings(image=None, exec_tmpfs=True, **kwargs):
    from cldpd_magic.engines.docker import container_settings

    return container_settings(
        RunOptions("img", "cldpd-p", [], **kwargs), image, exec_tmpfs=exec_tmpfs
    )


def test_a_container_drops_every_capability_but_those_named_and_gets_no_swap():
    from cldpd_magic.pods import Resources

    s = _settings(
        cap_add=["CHOWN"], resources=Resources(cpus=0.5, memory=64 << 20, pids=100),
        mounts=[Mount("/srv/src", "/src", read_only=True)], network="n", dns=["10.0.0.2"],
    )  # fmt: skip
    assert (s.cap_drop, s.cap_add, s.no_new_privileges, s.init) == (
        ("ALL",),
        ("CHOWN",),
        True,
        True,
    )
    assert (s.nano_cpus, s.memory, s.memory_swap, s.pids) == (500_000_000, 64 << 20, 64 << 20, 100)
    assert [(m.kind, m.source, m.target, m.read_only) for m in s.mounts] == [
        ("bind", "/srv/src", "/src", True)
    ]
    assert (s.read_only_root, s.network, s.dns) == (False, "n", ("10.0.0.2",))
    assert _settings().memory_swap is None


def test_a_read_only_root_keeps_workdir_home_and_tmp_writable():
    from cldpd_magic.engines.docker import LABEL_VOLUME_OF, TMP_TMPFS_OPTIONS, ImageFacts

    agent = ImageFacts.from_config({"WorkingDir": "/home/agent/work", "User": "agent", "Env": []})
    s = _settings(agent, read_only_root=True)
    assert s.read_only_root
    # The home holds the workdir: one volume keeps both writable.
    assert [(m.kind, m.target, m.labels, m.options) for m in s.mounts] == [
        ("volume", "/home/agent", {LABEL_VOLUME_OF: "cldpd-p"}, ""),
        ("tmpfs", "/tmp", {}, TMP_TMPFS_OPTIONS),
    ]
    root = ImageFacts.from_config({"WorkingDir": "", "User": "", "Env": ["HOME=/root"]})
    s = _settings(root, read_only_root=True, workdir="/srv")
    assert [m.target for m in s.mounts] == ["/root", "/srv", "/tmp"]
    # A swarm's service tmpfs cannot allow exec: /tmp is a volume there.
    s = _settings(root, exec_tmpfs=False, read_only_root=True, workdir="/srv")
    assert [(m.kind, m.target) for m in s.mounts] == [
        ("volume", "/root"), ("volume", "/srv"), ("volume", "/tmp")
    ]  # fmt: skip


def test_a_read_only_root_uses_the_mounts_that_cover_its_directories():
    from cldpd_magic.engines.docker import ImageFacts

    image = ImageFacts(workdir="/work", user="1000")
    mounts = [Mount("/h/work", "/work"), Mount("/h/tmp", "/tmp")]
    s = _settings(image, read_only_root=True, mounts=mounts, env={"HOME": "/work"})
    assert [m.kind for m in s.mounts] == ["bind", "bind"]
    # A numeric user's home cannot be told without running the image.
    assert [m.target for m in _settings(image, read_only_root=True).mounts] == ["/work", "/tmp"]
    # Without the image, only what the options say is known.
    s = _settings(None, read_only_root=True, workdir="/w", env={"HOME": "/h"})
    assert [m.target for m in s.mounts] == ["/h", "/w", "/tmp"]
    assert _settings(image).mounts == ()  # the control: a writable root needs none


def test_a_swarm_task_is_confined_as_a_container_but_for_what_its_api_cannot_say():
    from cldpd_magic.engines.docker import ImageFacts
    from cldpd_magic.engines.swarm import UNSUPPORTED_ON_SWARM
    from cldpd_magic.engines.swarm.services import task_template
    from cldpd_magic.pods import Resources

    s = _settings(
        ImageFacts(workdir="/w"), exec_tmpfs=False, read_only_root=True, cap_add=["CHOWN"],
        resources=Resources(cpus=1.0, memory=64 << 20, pids=50), dns=["10.0.0.2"], network="n",
        mounts=[Mount("/srv/src", "/src", read_only=True)],
    )  # fmt: skip
    template = task_template(s, {"image": "img", "command": ["agent"]}, "1.41")
    spec = template["ContainerSpec"]
    assert (spec["CapabilityDrop"], spec["CapabilityAdd"]) == (["ALL"], ["CHOWN"])
    assert spec["ReadOnly"] and spec["Init"]
    assert spec["DNSConfig"]["Nameservers"] == ["10.0.0.2"]
    assert [(m["Type"], m["Target"], m["ReadOnly"]) for m in spec["Mounts"]] == [
        ("bind", "/src", True), ("volume", "/root", False), ("volume", "/w", False),
        ("volume", "/tmp", False),
    ]  # fmt: skip
    assert template["Resources"]["Limits"] == {"NanoCPUs": 10**9, "MemoryBytes": 64 << 20,
                                               "Pids": 50}  # fmt: skip
    assert [n["Target"] for n in template["Networks"]] == ["n"]
    # No-new-privileges, where the manager's API can say it.
    assert "Privileges" not in spec and "no_new_privileges" in UNSUPPORTED_ON_SWARM
    newer = task_template(s, {"image": "img"}, "1.46")["ContainerSpec"]
    assert newer["Privileges"] == {"NoNewPrivileges": True}


# -- stdin: the pipe an interactive run writes its agent's input to ------------------


class Recorder:
    """A pipe's connection: what was sent, the half-close, and a send that may block."""

    def __init__(self, fail: BaseException | None = None) -> None:
        self.sent = bytearray()
        self.half_closed = 0
        self.fail = fail
        self.hold = threading.Event()
        self.hold.set()
        self.in_send = threading.Event()
        self._cond = threading.Condition()

    def send(self, data: bytes) -> None:
        self.in_send.set()
        self.hold.wait(60)
        if self.fail is not None:
            raise self.fail
        with self._cond:
            self.sent += data
            self._cond.notify_all()

    def half_close(self) -> None:
        with self._cond:
            self.half_closed += 1
            self._cond.notify_all()

    def wait_for(self, check) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: check(self), 60), (bytes(self.sent[-200:]),)


def _one_sentence(exc: BaseException) -> str:
    said = str(exc)
    assert "\n" not in said and said.endswith(".") and ". " not in said
    return said


def test_a_pipe_queues_until_connected_then_sends_in_order():
    pipe, wire = StdinPipe(), Recorder()
    pipe.write_line("one")
    pipe.write_line('{"type": "user", "text": "é"}')
    assert not pipe.connected.is_set() and not pipe.closed
    pipe.connect(wire.send, wire.half_close)
    assert pipe.connected.is_set()
    pipe.write_line("three")
    wire.wait_for(lambda w: w.sent.endswith(b"three\n"))
    assert bytes(wire.sent) == 'one\n{"type": "user", "text": "é"}\nthree\n'.encode()
    assert wire.half_closed == 0  # the control: only a close half-closes
    pipe.close()
    pipe.close()
    wire.wait_for(lambda w: w.half_closed)
    assert pipe.closed and not pipe.ended and wire.half_closed == 1
    with pytest.raises(StdinClosedError) as info:
        pipe.write_line("four")
    assert _one_sentence(info.value) == (
        "The run's agent input was closed; resume the run to send it more."
    )
    pipe.end()
    with pytest.raises(StdinClosedError, match="has ended"):
        pipe.write_line("five")
    assert bytes(wire.sent).endswith(b"three\n") and wire.half_closed == 1


def test_a_pipe_closed_before_it_is_connected_sends_its_lines_then_closes():
    pipe, wire = StdinPipe(), Recorder()
    pipe.write_line("first")
    pipe.close()
    assert pipe.closed
    pipe.connect(wire.send, wire.half_close)
    wire.wait_for(lambda w: w.half_closed)
    assert bytes(wire.sent) == b"first\n" and wire.half_closed == 1


def test_a_line_with_a_newline_is_refused():
    pipe = StdinPipe()
    with pytest.raises(InvalidRequestError) as info:
        pipe.write_line("two\nlines")
    _one_sentence(info.value)
    assert not pipe.closed


def test_writes_never_wait_for_a_process_that_does_not_read():
    pipe, wire = StdinPipe(), Recorder()
    wire.hold.clear()  # the process reads nothing: its stdin takes no bytes
    pipe.connect(wire.send, wire.half_close)
    pipe.write_line("taken by the pipe's thread")
    assert wire.in_send.wait(60)
    for i in range(1000):
        pipe.write_line(f"waits {i}")
    pipe.close()  # returns at once too
    assert wire.sent == b"" and wire.half_closed == 0
    wire.hold.set()
    wire.wait_for(lambda w: w.half_closed)
    assert wire.sent.decode().splitlines() == [
        "taken by the pipe's thread",
        *(f"waits {i}" for i in range(1000)),
    ]


def test_a_stdin_that_is_gone_ends_the_pipe():
    pipe, wire = StdinPipe(), Recorder(fail=BrokenPipeError(32, "Broken pipe"))
    pipe.connect(wire.send, wire.half_close)
    pipe.write_line("lost")
    while not pipe.ended:
        threading.Event().wait(0.01)
    with pytest.raises(StdinClosedError) as info:
        pipe.write_line("refused")
    assert _one_sentence(info.value) == "The run's agent has ended and reads no more input."
    pipe.close()  # nothing to do: no half-close of what is gone
    assert wire.half_closed == 0


def test_an_ended_pipe_drops_what_waits_and_serves_no_other_process():
    pipe, wire = StdinPipe(), Recorder()
    pipe.write_line("never sent")
    pipe.end()
    assert pipe.closed and pipe.ended
    with pytest.raises(InvalidRequestError) as info:
        pipe.connect(wire.send, wire.half_close)
    _one_sentence(info.value)
    used = StdinPipe()
    used.connect(wire.send, wire.half_close)
    with pytest.raises(InvalidRequestError, match="new StdinPipe"):
        used.connect(wire.send, wire.half_close)
    assert wire.sent == b""


def test_lines_of_many_writers_arrive_whole_and_each_writers_in_order():
    pipe, wire = StdinPipe(), Recorder()
    writers = 8

    def write(k: int) -> None:
        for i in range(500):
            pipe.write_line(f"{k}:{i}:" + "x" * (i % 50))
            if k == 0 and i == 100:
                pipe.connect(wire.send, wire.half_close)

    threads = [threading.Thread(target=write, args=(k,)) for k in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    pipe.close()
    wire.wait_for(lambda w: w.half_closed)
    seen: dict[int, list[int]] = {k: [] for k in range(writers)}
    for line in wire.sent.decode().splitlines():
        k, i, tail = line.split(":")
        assert tail == "x" * (int(i) % 50)
        seen[int(k)].append(int(i))
    assert seen == {k: list(range(500)) for k in range(writers)}


def test_runoptions_carry_the_pipe_through_replace():
    pipe = StdinPipe()
    opts = RunOptions("img", "c", [], stdin=pipe)
    assert dataclasses.replace(opts, engine="").stdin is pipe
    assert RunOptions("img", "c", []).stdin is None
    assert "stdin" not in repr(opts) and opts == RunOptions("img", "c", [])


def test_stdin_goes_to_the_engine_of_the_run_or_exec(two):
    multi, near, far = two
    near.agent = far.agent = cat_agent
    pipe = StdinPipe()
    pipe.write_line("to the far engine")
    pipe.close()
    out = io.StringIO()
    assert multi.run(RunOptions("img", "c1", [], engine="far", stdin=pipe), out) == 0
    assert out.getvalue() == "to the far engine\nstdin closed\n"
    assert [s.lines for s in far.stdins] == [["to the far engine"]] and near.stdins == []
    multi.start(RunOptions("img", "kept", [], engine="far"))
    pipe = StdinPipe()
    pipe.write_line("exec")
    pipe.close()
    out = io.StringIO()
    assert multi.exec("kept", ["agent"], out, stdin=pipe) == 0
    assert out.getvalue() == "exec\nstdin closed\n" and pipe.ended
    # A run that no engine takes ends its pipe: writes are refused, never queued forever.
    for call in (
        lambda p: multi.run(RunOptions("img", "c3", [], engine="nowhere", stdin=p), out),
        lambda p: multi.exec("missing", ["agent"], out, stdin=p),
    ):
        pipe = StdinPipe()
        with pytest.raises((PodConfigError, SessionNotFoundError)):
            call(pipe)
        with pytest.raises(StdinClosedError):
            pipe.write_line("lost")


def test_half_close_ends_the_input_and_leaves_the_output(tmp_path):
    from cldpd_magic.engines.docker.engine import half_close
    from cldpd_magic.engines.docker.streams import _reader

    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.sendall(b"line\n")
        half_close(ours)
        assert theirs.recv(100) == b"line\n" and theirs.recv(100) == b""  # end of file
        theirs.sendall(b"still read")
        assert _reader(ours)(100) == b"still read"
    # docker-py's socket over the ssh command: its stdin closed is the end of the input,
    # and a read takes what has come (cat echoes one line, long before 64 KiB).
    proc = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    command_socket = types.SimpleNamespace(proc=proc, recv=proc.stdout.read)
    proc.stdin.write(b"one line\n")
    proc.stdin.flush()
    assert _reader(command_socket)(1 << 16) == b"one line\n"
    half_close(command_socket)
    assert proc.wait(60) == 0 and proc.stdout.read() == b""
    proc.stdout.close()
