"""Several container engines behind one Runner: the engines setting, probing, one inventory.

An engine entry is a Docker endpoint (``unix://``, ``tcp://`` with TLS, ``ssh://``) or a
Docker context name. :class:`MultiEngineRunner` is itself a :class:`Runner`: it sends
build, run and start to the pod's engine (``RunOptions.engine``, "" for the first), finds
a container on whichever engine holds it, and lists the containers of every engine; an
engine that does not answer in time lists its last known runs as ``unreachable``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

from ..errors import DockerUnavailableError, PodConfigError, SessionNotFoundError, one_line
from ..pods import Mount
from .protocol import ContainerInfo, ExecHandle, Runner, RunOptions, StdinPipe, Writer
from .setting import Engine, EngineSetting, parse_engine, parse_engines

logger = logging.getLogger(__package__)


#: Status of a run whose engine did not answer the last listing.
UNREACHABLE = "unreachable"


_T = TypeVar("_T")


def docker_runner_for(engine: Engine, timeout: float = 30.0) -> Runner:
    """A DockerRunner on one engine (a SwarmRunner on a Swarm manager's); every call but
    a stream gives up after ``timeout`` s."""
    from .docker import DockerRunner

    runner = DockerRunner(
        base_url=engine.url,
        tls=engine.tls,
        use_ssh_client=engine.use_ssh_client,
        timeout=timeout,
    )
    if not engine.swarm:
        return runner
    from .swarm import SwarmRunner

    return SwarmRunner(
        runner,
        node_runner=lambda entry: docker_runner_for(parse_engine(entry), timeout),
        registry=engine.registry,
    )


def check_mounts(engine: Engine, mounts: Iterable[Mount], what: str) -> None:
    """Refuse bind mounts of this machine's paths on a remote engine.

    Args:
        engine: Where the container would run.
        mounts: Its bind mounts.
        what: The pod or container, for the message.

    Raises:
        PodConfigError: A mount's source is a path here, not known to exist on the engine.
    """
    if not engine.remote:
        return
    for mount in mounts:
        if not mount.remote:
            raise PodConfigError(
                f"{what} mounts {mount.source}, a path on this machine, but runs on the "
                f'remote engine {engine.name}; add "remote": true to that mount if the path '
                "exists on the engine's host, or pin the pod to a local engine."
            )


class _Outcome:
    """What a call made in a helper thread came to: a value, an error, or nothing in time."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None


@contextlib.contextmanager
def _ending(pipe: StdinPipe | None) -> Iterator[None]:
    """End a run's stdin pipe when the call that was to use it returns or raises (its
    process has ended then, or never ran); ending twice is harmless."""
    try:
        yield
    finally:
        if pipe is not None:
            pipe.end()


def _spawn(fn: Callable[[], Any], name: str) -> _Outcome:
    """Call ``fn`` in a daemon thread, so that a caller can give up on an engine that hangs."""
    outcome = _Outcome()

    def target() -> None:
        try:
            outcome.value = fn()
        except BaseException as exc:
            outcome.error = exc
        finally:
            outcome.done.set()

    threading.Thread(target=target, daemon=True, name=f"cldpd-engine-{name}").start()
    return outcome


class MultiEngineRunner:
    """A Runner over several engines; the first is the default.

    Args:
        engines: Each engine with its runner.
        probe_timeout: Seconds an engine has to answer its probe (once per engine).
        list_timeout: Seconds an engine has to answer a listing or a search.
        retry_after: Seconds before an engine that failed its probe is probed again.
    """

    def __init__(
        self,
        engines: Sequence[tuple[Engine, Runner]],
        *,
        probe_timeout: float = 5.0,
        list_timeout: float = 10.0,
        retry_after: float = 30.0,
    ) -> None:
        if not engines:
            raise PodConfigError("The engines setting names no engine; name at least one.")
        self.engines = [engine for engine, _ in engines]
        self._runners = {engine.name: runner for engine, runner in engines}
        self.probe_timeout = probe_timeout
        self.list_timeout = list_timeout
        self.retry_after = retry_after
        self._lock = threading.Lock()
        self._probed: dict[str, float] = {}  # name -> time of a failed probe (0: it answered)
        self._probe_errors: dict[str, DockerUnavailableError] = {}
        self._where: dict[str, str] = {}  # container name or id -> engine name
        self._known: dict[str, dict[str, ContainerInfo]] = {}  # engine -> last listing

    @classmethod
    def from_settings(
        cls,
        value: EngineSetting,
        *,
        timeout: float = 30.0,
        **kwargs: float,
    ) -> MultiEngineRunner | None:
        """The runner of an engines setting (see :func:`parse_engines`), None when it names none.

        Args:
            value: The setting.
            timeout: Seconds each engine's non-streaming calls may take.
            **kwargs: probe_timeout, list_timeout, retry_after.
        """
        engines = parse_engines(value)
        if not engines:
            return None
        return cls([(e, docker_runner_for(e, timeout)) for e in engines], **kwargs)

    @property
    def default(self) -> Engine:
        """The first engine."""
        return self.engines[0]

    def engine(self, name: str) -> Engine:
        """The engine a pod names (by name or endpoint); "" is the default.

        Raises:
            PodConfigError: No configured engine has that name.
        """
        if not name:
            return self.default
        for engine in self.engines:
            if name in (engine.name, engine.url):
                return engine
        names = ", ".join(e.name for e in self.engines)
        raise PodConfigError(
            f"Engine {name!r} is not configured (the engines are {names}); add it to the "
            "engines setting or change 'engine' in pod.json."
        )

    def _probe(self, engine: Engine) -> Runner:
        """The engine's runner once it has answered a probe; one sentence when it does not."""
        with self._lock:
            failed_at = self._probed.get(engine.name)
            if failed_at == 0:
                return self._runners[engine.name]
            if failed_at is not None and time.monotonic() - failed_at < self.retry_after:
                raise self._probe_errors[engine.name]
        runner = self._runners[engine.name]
        outcome = _spawn(runner.preflight, engine.name)
        outcome.done.wait(self.probe_timeout)
        error: DockerUnavailableError | None = None
        if not outcome.done.is_set():
            error = DockerUnavailableError(
                f"Engine {engine.name} did not answer within {self.probe_timeout:g} s; check "
                "that it runs and is reachable, or remove it from the engines setting."
            )
        elif outcome.error is not None:
            detail = one_line(str(outcome.error)).rstrip(".")
            error = DockerUnavailableError(f"Engine {engine.name} does not answer: {detail}.")
        with self._lock:
            if error is None:
                self._probed[engine.name] = 0
                return runner
            self._probed[engine.name] = time.monotonic()
            self._probe_errors[engine.name] = error
        raise error

    def _forget_probe(self, engine: Engine) -> None:
        with self._lock:
            if self._probed.get(engine.name) == 0:
                del self._probed[engine.name]

    def _on(self, engine: Engine, call: Callable[[Runner], _T]) -> _T:
        """Make a call on an engine; an engine that stopped answering is named."""
        runner = self._probe(engine)
        try:
            return call(runner)
        except DockerUnavailableError as exc:
            self._forget_probe(engine)
            if str(exc).startswith(f"Engine {engine.name}"):
                raise
            raise DockerUnavailableError(f"Engine {engine.name}: {exc}") from None

    def _remember(self, container: str, engine: Engine) -> None:
        with self._lock:
            self._where[container] = engine.name

    def _tagged(self, info: ContainerInfo, engine: Engine) -> ContainerInfo:
        self._remember(info.name, engine)
        self._remember(info.id, engine)
        return dataclasses.replace(info, engine=engine.name)

    def _each(
        self, call: Callable[[Runner], _T]
    ) -> list[tuple[Engine, _T | None, BaseException | None]]:
        """Make a call on every engine at once; each gives a value, or an error (timeouts too)."""
        outcomes = []
        deadline = time.monotonic() + self.list_timeout
        for engine in self.engines:
            try:
                runner = self._probe(engine)
            except DockerUnavailableError as exc:
                outcomes.append((engine, None, exc))
                continue
            outcomes.append((engine, _spawn(lambda r=runner: call(r), engine.name), None))
        results: list[tuple[Engine, _T | None, BaseException | None]] = []
        for engine, outcome, error in outcomes:
            if outcome is None:
                results.append((engine, None, error))
            elif not outcome.done.wait(max(0.0, deadline - time.monotonic())):
                self._forget_probe(engine)
                results.append(
                    (
                        engine,
                        None,
                        DockerUnavailableError(
                            f"Engine {engine.name} did not answer within {self.list_timeout:g} s."
                        ),
                    )
                )
            else:
                results.append((engine, outcome.value, outcome.error))
        return results

    def _holder(self, container: str) -> Engine | None:
        """The engine that holds a container: the one last seen with it, else a search."""
        with self._lock:
            name = self._where.get(container)
        if name is not None:
            engine = self.engine(name)
            if self._on(engine, lambda r: r.inspect(container)) is not None:
                return engine
        info = self.inspect(container)
        return None if info is None else self.engine(info.engine)

    # -- the Runner protocol --------------------------------------------------------

    def preflight(self) -> None:
        """Probe the default engine.

        Raises:
            DockerUnavailableError: It does not answer, in one sentence naming it.
        """
        self._probe(self.default)

    def build(
        self,
        tag: str,
        context_dir: str,
        build_args: dict[str, str] | None = None,
        on_output: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None,
        engine: str = "",
    ) -> None:
        """Build an image on an engine ("" the default); see DockerRunner.build."""
        self._on(
            self.engine(engine),
            lambda r: r.build(tag, context_dir, build_args, on_output, cancel),
        )

    def run(
        self,
        opts: RunOptions,
        stdout: Writer,
        stderr: Writer | None = None,
        on_start: Callable[[ContainerInfo], None] | None = None,
    ) -> int:
        """Run a container on ``opts.engine`` to its end; see DockerRunner.run.

        Raises:
            PodConfigError: The engine is not configured, or the pod mounts local paths
                on a remote engine.
        """
        with _ending(opts.stdin):
            engine = self.engine(opts.engine)
            check_mounts(engine, opts.mounts, opts.name)

            def started(info: ContainerInfo) -> None:
                tagged = self._tagged(info, engine)
                if on_start is not None:
                    on_start(tagged)

            self._remember(opts.name, engine)
            here = dataclasses.replace(opts, engine="")
            return self._on(engine, lambda r: r.run(here, stdout, stderr, on_start=started))

    def start(self, opts: RunOptions) -> ContainerInfo:
        """Start a container detached on ``opts.engine``; see DockerRunner.start."""
        engine = self.engine(opts.engine)
        check_mounts(engine, opts.mounts, opts.name)
        here = dataclasses.replace(opts, engine="")
        return self._tagged(self._on(engine, lambda r: r.start(here)), engine)

    def exec(
        self,
        container: str,
        cmd: list[str],
        stdout: Writer,
        stderr: Writer | None = None,
        on_start: Callable[[ExecHandle], None] | None = None,
        stdin: StdinPipe | None = None,
    ) -> int:
        """Run a command in a container on whichever engine holds it, its stdin ``stdin``
        when given (ended when the call returns, also when no engine could run it).

        Raises:
            SessionNotFoundError: No reachable engine holds a running container by that name.
        """
        with _ending(stdin):
            engine = self._holder(container)
            if engine is None:
                raise SessionNotFoundError(f"No running container named {container}.")
            return self._on(
                engine, lambda r: r.exec(container, cmd, stdout, stderr, on_start, stdin=stdin)
            )

    def stop_exec(self, handle: ExecHandle, timeout: float = 10.0) -> None:
        """Stop an exec on the engine that runs it."""
        engine = self._holder(handle.container)
        if engine is not None:
            self._on(engine, lambda r: r.stop_exec(handle, timeout))

    def stop(self, container: str, timeout: float = 10.0) -> None:
        """Stop a container on whichever engine holds it; a missing one is fine."""
        engine = self._holder(container)
        if engine is not None:
            self._on(engine, lambda r: r.stop(container, timeout))

    def capture(self, container: str, script: str, *, left_at: str | None = None) -> bytes:
        """Read an ended container's files on whichever engine holds it (see SnapshotRunner).

        Raises:
            SessionNotFoundError: No engine holds such a container.
        """
        engine = self._holder(container)
        if engine is None:
            raise SessionNotFoundError(f"No container named {container}.")
        return self._on(engine, lambda r: r.capture(container, script, left_at=left_at))  # type: ignore[attr-defined]

    def remove(self, container: str) -> None:
        """Remove a container on whichever engine holds it; a missing one is fine."""
        engine = self._holder(container)
        if engine is not None:
            self._on(engine, lambda r: r.remove(container))

    def logs(self, container: str, stdout: Writer, stderr: Writer | None = None) -> int:
        """Follow a container's output on whichever engine holds it.

        Raises:
            SessionNotFoundError: No reachable engine holds it.
        """
        engine = self._holder(container)
        if engine is None:
            raise SessionNotFoundError(f"No container named {container}.")
        return self._on(engine, lambda r: r.logs(container, stdout, stderr))

    def inspect(self, container: str) -> ContainerInfo | None:
        """Find a container on the engines, the default first.

        Returns:
            Its description with ``engine`` set; None when no engine that answered has it.

        Raises:
            DockerUnavailableError: It is not found, and the engine last seen holding it,
                or every engine, does not answer.
        """
        results = self._each(lambda r: r.inspect(container))
        for engine, info, _ in results:
            if info is not None:
                return self._tagged(info, engine)
        errors = {engine.name: error for engine, _, error in results if error is not None}
        with self._lock:
            last_seen = self._where.get(container)
        if last_seen in errors:
            raise DockerUnavailableError(
                f"{container} ran on engine {last_seen}, which does not answer; "
                "try again once it is back."
            )
        if len(errors) == len(results):
            raise next(iter(errors.values()))  # type: ignore[misc]
        return None

    def list(self, label: str) -> list[ContainerInfo]:
        """List the containers of every engine that carry a label.

        An engine that does not answer in time gives the runs it had at its last listing,
        with the status ``unreachable``, and never fails the list.
        """
        found: list[ContainerInfo] = []
        for engine, infos, error in self._each(lambda r: r.list(label)):
            if error is None and infos is not None:
                tagged = [self._tagged(i, engine) for i in infos]
                with self._lock:
                    self._known.setdefault(engine.name, {}).update({i.name: i for i in tagged})
                    listed = {i.name for i in tagged}
                    for name in set(self._known[engine.name]) - listed:
                        if _carries(self._known[engine.name][name], label):
                            del self._known[engine.name][name]
                found += tagged
                continue
            logger.debug("engine %s left out of a listing: %s", engine.name, error)
            with self._lock:
                known = list(self._known.get(engine.name, {}).values())
            found += [
                dataclasses.replace(i, status=UNREACHABLE) for i in known if _carries(i, label)
            ]
        return sorted(found, key=lambda c: (c.name, c.engine))

    def unreachable(self) -> list[str]:
        """The engines whose last probe failed, by name."""
        with self._lock:
            return [name for name, at in self._probed.items() if at]


def _carries(info: ContainerInfo, label: str) -> bool:
    key, sep, value = label.partition("=")
    return key in info.labels and (not sep or info.labels[key] == value)


__all__ = [
    "UNREACHABLE",
    "MultiEngineRunner",
    "check_mounts",
    "docker_runner_for",
]
