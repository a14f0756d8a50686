"""Egress allowlists and brokered credentials, enforced outside the pod.

A pod whose pod.json says ``"network": {"allow": [...]}`` runs on an internal Docker
network of its own: no route out, no resolver out. Its only way out is its egress
container (Squid from Debian, built from the Dockerfile in ``data/egress``), which sits
on that network and on the engine's default bridge and lets CONNECT and plain HTTP
through only to the allowlist. Each refused attempt becomes an ``EGRESS_BLOCKED`` event.

A pod that names ``credentials`` (``{"anthropic": "ANTHROPIC_API_KEY"}``) gets a
random token of its run in place of the key, and a base URL pointing at the same egress
container, which forwards only requests that carry that token, only to the configured
API, with the real key in its place. The real key reaches that container on its stdin
after start: it is in no container's environment, file, label or ``docker inspect`` output.

Nothing else reaches the pod or its egress: the internal network's bridge has no
address on the engine's host (no way to the host's services), Squid and the broker
listen only on the pod's network, and the egress container has its own memory, process
and CPU limits, no capability, and a read-only root.

One egress container and network per run, not per policy: a blocked attempt belongs to
exactly one run, two agents never share a network (one could not reach the other), and
the run's end removes both without counting users across kernels.

The policy itself (the pod.json forms) is parsed in pods/policy.py; this module enforces
it and reaches the engine through the runner protocol, :class:`EgressRunner` (a Runner
with images, networks and a service container).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import threading
import urllib.parse
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from ..engines import LABEL_CLIENT, EgressRunner, Runner, RunOptions, client_gone, this_client
from ..errors import CldpdError, ContainerFailedError
from ..logs import log_swallowed
from ..pods import CREDENTIAL_KINDS, EgressPolicy, Resources
from ..secrets import Masker

logger = logging.getLogger(__package__)

#: Where the egress image's Dockerfile and entrypoint are, inside the package.
DATA_DIR = Path(__file__).resolve().parents[1] / "data" / "egress"
#: The egress image's repository; its tag is a digest of DATA_DIR and the base image.
IMAGE_REPOSITORY = "cldpd-egress"
#: The egress image's base where the engine has no LOCAL_BASE; ``$CLDPD_EGRESS_BASE`` overrides.
DEFAULT_BASE = "debian:bookworm-slim"
#: The Debian base scripts/setup makes offline; preferred when the engine has it.
LOCAL_BASE = "cldpd-debian:bookworm"
#: Label on an egress network and container: the digest of the run's policy.
LABEL_EGRESS = "cldpd.egress"
#: Label on an egress network and container: the container of the run it serves.
LABEL_EGRESS_OF = "cldpd.egress-of"
PROXY_PORT = 3128
BROKER_PORT = 8080
#: How a pod's stand-in for a brokered key begins; a random token of the run follows.
PLACEHOLDER = "cldpd-brokered-"
#: The egress container's own limits: a pod cannot make it grow without bound.
EGRESS_RESOURCES = Resources(cpus=1.0, memory=256 * 1024 * 1024, pids=128)
#: The line the egress container prints once Squid listens.
READY_LINE = "cldpd-egress ready"
#: Seconds to wait for that line.
READY_TIMEOUT = 60.0
#: Seconds an egress container may exist without its run's container before a sweep
#: removes it: a start (in any process) sets up the egress before the run's container.
ORPHAN_GRACE = 600.0


@dataclass(frozen=True)
class EgressAttempt:
    """One connection the egress proxy saw.

    Attributes:
        time: When (UTC).
        host: The host asked for.
        port: The port asked for.
        method: CONNECT for HTTPS, else the HTTP method.
        allowed: Whether the proxy let it through.
    """

    time: datetime
    host: str
    port: int
    method: str
    allowed: bool

    @property
    def target(self) -> str:
        """``host:port``, the data of an EGRESS_BLOCKED event."""
        return f"{self.host}:{self.port}"


_ACCESS_RE = re.compile(
    r"CLDPD-ACCESS (?P<ts>\d+(?:\.\d+)?) \S+ (?P<code>[A-Z_]+) (?P<status>\d+) "
    r"(?P<method>[A-Z]+) (?P<host>[A-Za-z0-9.:\[\]%_-]+) (?P<port>\d+)$"
)


def parse_access_line(line: str) -> EgressAttempt | None:
    """An attempt from one access-log line of the egress container; None for anything else."""
    match = _ACCESS_RE.fullmatch(line.strip())
    if match is None:
        return None
    denied = "DENIED" in match["code"] or match["status"] == "403"
    return EgressAttempt(
        datetime.fromtimestamp(float(match["ts"]), UTC),
        urllib.parse.unquote(match["host"])[:253],  # Squid writes [::1] as %5B::1%5D
        int(match["port"]),
        match["method"],
        not denied,
    )


def egress_image_tag(base: str) -> str:
    """The egress image's tag: a digest of the shipped Dockerfile, entrypoint and base."""
    digest = hashlib.sha256(base.encode())
    for path in sorted(
        p for p in DATA_DIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts
    ):
        digest.update(path.relative_to(DATA_DIR).as_posix().encode() + b"\0" + path.read_bytes())
    return f"{IMAGE_REPOSITORY}:{digest.hexdigest()[:12]}"


def rules_image_tag(egress_tag: str) -> str:
    """The tag of the firewall check's image: the egress image, run as root."""
    return f"{egress_tag}-rules"


def egress_base(runner: EgressRunner) -> str:
    """The egress image's base on a runner's engine.

    ``$CLDPD_EGRESS_BASE`` when set; else the Debian image scripts/setup made offline,
    when the engine has it; else Debian bookworm slim, which the engine pulls.
    """
    chosen = os.environ.get("CLDPD_EGRESS_BASE")
    if chosen:
        return chosen
    return LOCAL_BASE if runner.image_exists(LOCAL_BASE) else DEFAULT_BASE


class _Lines:
    """A writer that hands complete lines to a callback."""

    def __init__(self, on_line: Callable[[str], None]) -> None:
        self.on_line = on_line
        self._pending = ""

    def write(self, text: str) -> None:
        *lines, self._pending = (self._pending + text).split("\n")
        for line in lines:
            self.on_line(line)


#: Runners whose engine was seen to isolate internal networks (weakly held: a new runner
#: never inherits the verdict of a freed one through a reused ``id()``).
_ISOLATING_ENGINES: weakref.WeakSet[EgressRunner] = weakref.WeakSet()


@dataclass
class EgressGuard:
    """The egress network and container of one run.

    Args:
        runner: The runner of the run's engine; an :class:`EgressRunner` (a DockerRunner)
            for the egress to be set up, any Runner to follow what exists.
        container: The run's container name; the egress names derive from it.
        policy: Its allowlist.
        credentials: ``(kind, real value, upstream)`` triples to broker.
        on_attempt: Called, from a worker thread, with each attempt the proxy logs.
        on_build_output: Called with each line of the egress image's build log.
        resources: The egress container's limits (pod.json ``egressResources``); a limit
            left unset there is :data:`EGRESS_RESOURCES`'.
    """

    runner: Runner
    container: str
    policy: EgressPolicy
    credentials: list[tuple[str, str, str]] = field(default_factory=list)
    on_attempt: Callable[[EgressAttempt], None] | None = None
    on_build_output: Callable[[str], None] | None = None
    resources: Resources | None = None
    attempts: list[EgressAttempt] = field(default_factory=list)

    def __post_init__(self) -> None:
        # "cldpd_": no pod's container (always "cldpd-<pod>") can take these names.
        self.network = self.proxy = egress_name(self.container)
        #: What the pod gets in place of each brokered key; the broker requires it.
        self.token = PLACEHOLDER + secrets.token_hex(24)
        self._ready = threading.Event()
        self._came_up = False
        self._follower: threading.Thread | None = None
        self._lock = threading.Lock()
        self._since: datetime | None = None  # attempts before it are another process's
        #: Masks the brokered keys and the token in what this logs.
        self._mask = Masker([value for _kind, value, _upstream in self.credentials] + [self.token])

    @property
    def labels(self) -> dict[str, str]:
        """Labels of the network and the egress container."""
        return {
            LABEL_EGRESS: self.policy.digest,
            LABEL_EGRESS_OF: self.container,
            LABEL_CLIENT: this_client(),
        }

    @property
    def engine(self) -> EgressRunner:
        """The runner, as one that can set up egress.

        Raises:
            ContainerFailedError: It cannot (several engines, a swarm).
        """
        if not isinstance(self.runner, EgressRunner):
            raise ContainerFailedError(
                f"{self.container} asks for a network allowlist, which cldpd enforces on a "
                "single Docker engine only for now; drop the engines setting or 'network.allow'."
            )
        return self.runner

    def ensure_image(self) -> str:
        """Build the egress image unless the engine has it; return its tag.

        Raises:
            ContainerFailedError: The runner cannot make networks (several engines).
            BuildFailedError: The egress image did not build.
        """
        engine = self.engine
        base = egress_base(engine)
        tag = egress_image_tag(base)
        if not engine.image_exists(tag):
            engine.build(tag, str(DATA_DIR), {"BASE": base}, on_output=self.on_build_output)
        rules_tag = rules_image_tag(tag)
        if not engine.image_exists(rules_tag):
            engine.build(
                rules_tag, str(DATA_DIR / "rules"), {"EGRESS": tag}, on_output=self.on_build_output
            )
        return tag

    def setup(self, opts: RunOptions) -> RunOptions:
        """Create the network and the egress container; return ``opts`` moved behind them.

        Raises:
            ContainerFailedError: The engine cannot isolate an internal network, or the
                egress container did not come up.
            BuildFailedError: The egress image did not build.
        """
        image = self.ensure_image()
        engine = self.engine
        sweep_orphans(engine)
        self.remove()  # what a killed kernel may have left of an earlier run of this name
        subnet = engine.create_network(self.network, self.labels, internal=True)
        try:
            config = {
                "subnet": subnet,
                "proxy_port": PROXY_PORT,
                "broker_port": BROKER_PORT,
                "allow": [rule.squid() for rule in self.policy.allow],
                "credentials": {
                    kind: {
                        "upstream": upstream,
                        "header": CREDENTIAL_KINDS[kind].header,
                        "value": value,
                        "token": self.token,
                        "methods": list(CREDENTIAL_KINDS[kind].methods),
                        "paths": list(CREDENTIAL_KINDS[kind].paths),
                    }
                    for kind, value, upstream in self.credentials
                },
            }
            service = self.service_options(image)
            engine.start_service(service, ["bridge"], (json.dumps(config) + "\n").encode())
            self._start_following()
            if not (self._ready.wait(READY_TIMEOUT) and self._came_up):
                raise ContainerFailedError(
                    f"The egress proxy of {self.container} did not start within "
                    f"{READY_TIMEOUT:g} s; see docker logs {self.proxy}."
                )
            address = engine.address(self.proxy, self.network)
            self._check_isolation(engine, image, subnet, engine.gateway(self.network))
        except BaseException:
            self.remove()
            raise
        proxy_url = f"http://{address}:{PROXY_PORT}"
        env = dict(opts.env)
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
            env[name] = proxy_url
        env["NO_PROXY"] = env["no_proxy"] = f"localhost,127.0.0.1,{address}"
        for kind, _value, _upstream in self.credentials:
            credential = CREDENTIAL_KINDS[kind]
            env[credential.key_env] = self.token
            env[credential.url_env] = f"http://{address}:{BROKER_PORT}"
        # Docker's embedded resolver forwards what it cannot answer to the container's
        # DNS servers, even from an internal network, and the host's addresses are
        # reachable from there: point it at the egress container, which serves no DNS.
        return replace(opts, env=env, network=self.network, dns=[address])

    def service_options(self, image: str) -> RunOptions:
        """The egress container: confined like a pod, with limits of its own.

        It runs as Squid's unprivileged user with no capability, a read-only root (its
        configuration is written to /tmp), and its own limits (:func:`egress_resources`).
        """
        return RunOptions(
            image=image,
            name=self.proxy,
            cmd=[],
            env={"HOME": "/tmp"},
            workdir="/tmp",
            network=self.network,
            labels=self.labels,
            remove=False,
            resources=egress_resources(self.resources),
            read_only_root=True,
        )

    def _check_isolation(self, engine: EgressRunner, image: str, subnet: str, gateway: str) -> None:
        """Refuse to go on unless the engine isolates the internal network, host included.

        Three checks, all needed: the host's iptables rules must hold Docker's DROP rule
        for the network (an engine with --iptables=false makes none, and its networks are
        then isolated only while some other party's policy happens to drop the traffic);
        the host must hold no address on the network (an engine that ignores the option
        asking for none would let the pod reach every host service through INPUT); and a
        container on the network must not reach the egress container's bridge side.
        """
        if engine in _ISOLATING_ENGINES:
            return
        not_enforced = ContainerFailedError(
            "This Docker engine does not isolate internal networks (it runs with "
            "--iptables=false, or gives the host an address on them), so a network "
            "allowlist cannot be enforced; restart dockerd with iptables on, or drop "
            "'network.allow' from pod.json."
        )
        firewall = RunOptions(
            image=rules_image_tag(image),
            name=f"{self.proxy}-rules",
            cmd=["rules", subnet, gateway],
            network="host",
            cap_add=["NET_ADMIN", "NET_RAW"],
            labels=self.labels,
        )
        if engine.run(firewall, _Lines(lambda _line: None)) == 1:
            raise not_enforced
        outside = engine.address(self.proxy, "bridge")
        probe = RunOptions(
            image=image,
            name=f"{self.proxy}-probe",
            cmd=["probe", outside, str(PROXY_PORT)],
            network=self.network,
            labels=self.labels,
        )
        if outside and engine.run(probe, _Lines(lambda _line: None)) == 0:
            raise not_enforced
        _ISOLATING_ENGINES.add(engine)

    def _start_following(self) -> None:
        self._follower = threading.Thread(
            target=self._follow, name=f"cldpd-egress-{self.container}", daemon=True
        )
        self._follower.start()

    @property
    def following(self) -> bool:
        """Whether the proxy's log is being followed (it ends when the proxy does)."""
        return self._follower is not None and self._follower.is_alive()

    def follow_existing(self) -> None:
        """Follow a proxy another process set up; its attempts before now are not ours."""
        self._since = datetime.now(UTC)
        self._start_following()

    @contextlib.contextmanager
    def reporting_to(self, on_attempt: Callable[[EgressAttempt], None]) -> Iterator[None]:
        """Send the attempts to ``on_attempt`` while the block runs (a resume's session)."""
        with self._lock:
            previous, self.on_attempt = self.on_attempt, on_attempt
        try:
            yield
        finally:
            with self._lock:
                if self.on_attempt is on_attempt:
                    self.on_attempt = previous

    def _follow(self) -> None:
        def on_line(line: str) -> None:
            if line.strip() == READY_LINE:
                self._came_up = True
                self._ready.set()
                return
            attempt = parse_access_line(line)
            if attempt is None:
                return
            if self._since is not None and attempt.time < self._since:
                return
            with self._lock:
                self.attempts.append(attempt)
                on_attempt = self.on_attempt
            if on_attempt is not None:
                try:
                    on_attempt(attempt)
                except Exception:
                    log_swallowed(logger, "egress attempt callback failed", self._mask)

        try:
            self.runner.logs(self.proxy, _Lines(on_line), None)
        except Exception:
            log_swallowed(
                logger, f"following the egress log of {self.container} failed", self._mask
            )
        finally:
            self._ready.set()  # a proxy that died is no longer awaited

    def remove(self) -> None:
        """Remove the egress container and network; what is missing is fine."""
        self.runner.remove(self.proxy)
        if isinstance(self.runner, EgressRunner):
            self.runner.remove_network(self.network)
        if self._follower is not None:
            self._follower.join(timeout=10)

    def blocked(self) -> list[EgressAttempt]:
        """The attempts refused so far."""
        with self._lock:
            return [a for a in self.attempts if not a.allowed]


def egress_resources(given: Resources | None) -> Resources:
    """An egress container's limits: those given, and :data:`EGRESS_RESOURCES` for the rest."""
    given = given or Resources()
    default = EGRESS_RESOURCES
    return Resources(
        default.cpus if given.cpus is None else given.cpus,
        default.memory if given.memory is None else given.memory,
        default.pids if given.pids is None else given.pids,
    )


def egress_name(container: str) -> str:
    """The name of a run's egress network and container."""
    return "cldpd_egress-" + container.removeprefix("cldpd-")


def remove_egress_of(runner: Runner, container: str) -> None:
    """Remove what egress a run's container had (after a stop, or a crash); none is fine."""
    if not isinstance(runner, EgressRunner):
        return  # a runner without networks never made any egress
    with contextlib.suppress(CldpdError):
        runner.remove(egress_name(container))
        runner.remove_network(egress_name(container))


def seconds_since(engine_time: str, now: datetime) -> float:
    """Seconds since an engine timestamp (nanoseconds and all); unreadable ones are old."""
    match = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d{1,6})?", engine_time)
    if match is None:
        return float("inf")
    started = datetime.fromisoformat(match[1] + (match[2] or "")).replace(tzinfo=UTC)
    return (now - started).total_seconds()


def sweep_orphans(runner: Runner, grace: float | None = None) -> list[str]:
    """Remove the egress containers and networks whose run's container is gone.

    A killed kernel leaves them behind; this finds them from any process by their
    labels. An egress container younger than ``grace`` is kept while the process that
    made it lives (its run may be starting); a network goes with its container, or alone
    when it has none.

    Args:
        runner: The runner of one engine; a runner without networks has no egress.
        grace: Seconds; None is :data:`ORPHAN_GRACE`.

    Returns:
        The names removed, containers and networks.
    """
    if not isinstance(runner, EgressRunner):
        return []
    grace = ORPHAN_GRACE if grace is None else grace
    now = datetime.now(UTC)
    removed: list[str] = []
    try:
        proxies = runner.list(LABEL_EGRESS_OF)
        networks = runner.list_networks(LABEL_EGRESS_OF)
        alive: dict[str, bool] = {}

        def run_exists(container: str) -> bool:
            if container not in alive:
                alive[container] = runner.inspect(container) is not None
            return alive[container]

        kept = set()
        for info in proxies:
            run = info.labels.get(LABEL_EGRESS_OF, "")
            young = seconds_since(info.started_at, now) < grace
            if run_exists(run) or (young and not client_gone(info.labels.get(LABEL_CLIENT, ""))):
                kept.add(egress_name(run))
                continue
            runner.remove(info.name)
            removed.append(info.name)
        for network in networks:
            run = "cldpd-" + network.removeprefix("cldpd_egress-")
            if network not in kept and not run_exists(run):
                runner.remove_network(network)
                removed.append(network)
    except CldpdError:
        log_swallowed(logger, "sweeping orphaned egress failed")
    return removed


@contextlib.contextmanager
def egress_reports(
    guards: dict[str, EgressGuard],
    runner: Runner,
    container: str,
    on_attempt: Callable[[EgressAttempt], None],
) -> Iterator[None]:
    """Report a run's egress attempts to ``on_attempt`` while the block runs.

    For a resume of a kept-alive pod: its proxy was set up by the start, whose session
    has ended. When this process has no guard following that proxy (the pod was started
    by another kernel), one is made and kept in ``guards``, reporting attempts from now on.
    A run without a proxy reports nothing.

    Args:
        guards: This process's guards by run container; updated.
        runner: The run's runner.
        container: The run's container.
        on_attempt: Called, from a worker thread, with each attempt.
    """
    guard = guards.get(container)
    if guard is None or not guard.following:
        proxy = egress_name(container)
        try:
            exists = isinstance(runner, EgressRunner) and runner.inspect(proxy) is not None
        except CldpdError:
            exists = False
        if not exists:
            yield
            return
        guard = EgressGuard(runner, container, EgressPolicy())
        guard.follow_existing()
        guards[container] = guard
    with guard.reporting_to(on_attempt):
        yield
