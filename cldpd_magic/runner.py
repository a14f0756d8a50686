"""DockerRunner: the Runner protocol on a Docker engine; the only code that imports docker."""

from __future__ import annotations

import codecs
import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import struct
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from typing import IO, Any

import docker
import docker.constants
import docker.errors
import docker.tls
import docker.types
import requests
import requests.exceptions
from docker.types.daemon import CancellableStream
from docker.utils import build as build_utils

from .errors import (
    BuildFailedError,
    ContainerFailedError,
    DockerUnavailableError,
    PodConfigError,
    PodRunningError,
    SessionNotFoundError,
    StopFailedError,
    one_line,
)
from .protocol import ContainerInfo, ExecHandle, Runner, RunOptions, Writer

logger = logging.getLogger(__name__)

#: A legacy-builder log line naming the container that runs a build step.
_STEP_CONTAINER_RE = re.compile(r"^ ---> Running in ([0-9a-f]{12,64})\s*$")


#: Image label holding the digest of the build's inputs, to skip rebuilding an unchanged pod.
LABEL_CONTEXT = "cldpd.context"
_FROM_RE = re.compile(
    r"^\s*FROM\s+(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?", re.IGNORECASE | re.MULTILINE
)


#: Every pod container runs with these: no process gains privileges (setuid, file caps).
SECURITY_OPT = ["no-new-privileges"]
#: The /tmp of a read-only root: exec allowed (tools run scripts from /tmp), no devices.
TMP_TMPFS_OPTIONS = "rw,exec,nosuid,nodev,mode=1777"
#: Label on the anonymous volumes that keep a read-only root's directories writable.
LABEL_VOLUME_OF = "cldpd.volume-of"
#: SIGKILL's exit code, which the kernel's OOM killer leaves.
KILLED_EXIT_CODE = 137

#: Signals ($0) the live processes recorded by exec()'s pid files; exit 0 when any was alive.
_SIGNAL_EXECS = (
    'alive=1; for f in /tmp/.cldpd-exec-*.pid; do [ -f "$f" ] || continue; '
    'p=$(cat "$f"); if kill -0 "$p" 2>/dev/null; then alive=0; '
    '[ "$0" = 0 ] || kill -"$0" "$p" 2>/dev/null; else rm -f "$f"; fi; done; exit $alive'
)


class _StreamDecoder:
    """Decodes byte chunks of one stream into text for a writer, UTF-8 safe across chunks."""

    def __init__(self, writer: Writer | None) -> None:
        self.writer = writer
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, data: bytes | None) -> None:
        if data and self.writer is not None:
            text = self.decoder.decode(data)
            if text:
                self.writer.write(text)

    def close(self) -> None:
        if self.writer is not None:
            text = self.decoder.decode(b"", final=True)
            if text:
                self.writer.write(text)


def _pump(
    stream: Iterator[tuple[bytes | None, bytes | None]], stdout: Writer, stderr: Writer | None
) -> None:
    out, err = _StreamDecoder(stdout), _StreamDecoder(stderr)
    for chunk_out, chunk_err in stream:
        out.feed(chunk_out)
        err.feed(chunk_err)
    out.close()
    err.close()


def _read_exactly(raw: Any, size: int) -> bytes:
    parts = []
    while size > 0:
        chunk = raw.read(size)
        if not chunk:
            break
        parts.append(chunk)
        size -= len(chunk)
    return b"".join(parts)


class _SocketReader:
    """``read(n)`` over a socket's ``recv``, for :func:`_read_exactly`."""

    def __init__(self, sock: Any) -> None:
        self.sock = sock

    def read(self, size: int) -> bytes:
        return self.sock.recv(size)


def _is_tls(api: docker.APIClient) -> bool:
    return str(api.base_url).startswith("https://")


class _PrivateAPI:
    """The few private ``APIClient`` calls the runner needs, in one place.

    docker-py's public ``build()`` hands back a bare generator, so a build cannot be
    cancelled from another thread (its response must be closed), and its public
    ``logs()`` merges stdout and stderr into one stream. These calls give both; they are
    the same in docker-py 4 to 7, and pyproject pins ``docker<8`` so a change is seen.
    ``docker.utils.socket.frames_iter`` reads a hijacked socket (attach, exec); a logs
    response is plain HTTP whose body urllib3 may already have buffered, so its frames
    are read from the response as docker-py's own multiplexed-stream helper does.
    """

    @staticmethod
    def attach(
        api: docker.APIClient, container: str
    ) -> Iterator[tuple[bytes | None, bytes | None]]:
        """Attach to a container's output (and what it printed so far) as ``(stdout, stderr)``."""
        if not _is_tls(api):
            return api.attach(
                container, stdout=True, stderr=True, stream=True, logs=True, demux=True
            )
        params = {"stdout": 1, "stderr": 1, "stream": 1, "logs": 1}
        return _PrivateAPI.blocking_frames(api, api.attach_socket(container, params=params))

    @staticmethod
    def exec_start(
        api: docker.APIClient, exec_id: str
    ) -> Iterator[tuple[bytes | None, bytes | None]]:
        """Start an exec and stream its output as ``(stdout, stderr)``."""
        if not _is_tls(api):
            return api.exec_start(exec_id, stream=True, demux=True)
        return _PrivateAPI.blocking_frames(api, api.exec_start(exec_id, socket=True))

    @staticmethod
    def blocking_frames(
        api: docker.APIClient, sock: Any
    ) -> Iterator[tuple[bytes | None, bytes | None]]:
        """Read a hijacked TLS socket's frames with blocking reads.

        docker-py polls the socket before each read: on TLS, bytes already decrypted
        wait in the SSL buffer while the poll blocks, so a line stays unseen until the
        engine sends more.
        """
        api._disable_socket_timeout(sock)
        try:
            while True:
                header = _read_exactly(_SocketReader(sock), 8)
                if len(header) < 8:
                    return
                kind, size = struct.unpack(">BxxxL", header)
                data = _read_exactly(_SocketReader(sock), size)
                yield (None, data) if kind == 2 else (data, None)
                if len(data) < size:
                    return
        finally:
            sock.close()

    @staticmethod
    def use_server_version(api: docker.APIClient) -> None:
        """Talk the engine's API version, as ``version="auto"`` does when connecting."""
        api._version = api._retrieve_server_version()

    @staticmethod
    def post_build(
        api: docker.APIClient, context: IO[bytes], params: dict[str, Any]
    ) -> CancellableStream:
        """Start a build; the stream yields the engine's decoded JSON log items."""
        response = api._post(
            api._url("/build"),
            data=context,
            params=params,
            headers={"Content-Type": "application/tar"},
            stream=True,
            timeout=None,
        )
        api._raise_for_status(response)
        return CancellableStream(api._stream_helper(response, decode=True), response)

    @staticmethod
    def follow_logs(
        api: docker.APIClient, container: str
    ) -> Iterator[tuple[bytes | None, bytes | None]]:
        """Follow a (non-TTY) container's log from its start as ``(stdout, stderr)`` chunks."""
        response = api._get(
            api._url("/containers/{0}/logs", container),
            params={"stdout": 1, "stderr": 1, "follow": 1, "tail": "all"},
            stream=True,
            timeout=None,
        )
        api._raise_for_status(response)
        api._disable_socket_timeout(api._get_raw_response_socket(response))
        try:
            while True:
                header = _read_exactly(response.raw, 8)
                if len(header) < 8:
                    return
                kind, size = struct.unpack(">BxxxL", header)
                data = _read_exactly(response.raw, size)
                yield (None, data) if kind == 2 else (data, None)
                if len(data) < size:
                    return
        finally:
            response.close()


def _engine_errors(method: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a docker-py or connection error escaping a runner method into one sentence."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise DockerUnavailableError(
                f"Docker stopped answering ({one_line(_explain(exc))}); check that the "
                "engine runs, then try again."
            ) from None

    return wrapper


def _refuse_engine_pin(engine: str, what: str) -> None:
    """A pod pinned to an engine needs the engines setting; one engine alone is no match."""
    if engine:
        raise PodConfigError(
            f"{what} is pinned to engine {engine!r}, but no engines are configured; name it "
            "in CLDPD_ENGINES, %config CldpdMagics.engines or cldpd --engine, or drop "
            "'engine' from pod.json."
        )


def _container_error(opts: RunOptions, action: str, exc: Exception) -> ContainerFailedError:
    """One sentence for a container the engine would not create or start."""
    explanation = _explain(exc)
    if opts.network and f"network {opts.network} not found" in explanation:
        return ContainerFailedError(
            f"Docker network {opts.network!r} does not exist on this engine; create it "
            "(docker network create) or change 'network' in pod.json."
        )
    return ContainerFailedError(f"Could not {action} container {opts.name}: {explanation}")


#: Causes of an unreachable engine, as they appear in docker-py's and urllib3's messages.
_UNREACHABLE_CAUSES = (
    ("FileNotFoundError", "no socket there"),
    ("No such file or directory", "no socket there"),
    ("Connection refused", "the connection was refused"),
    ("PermissionError", "permission denied: is this user in the docker group?"),
    ("Permission denied", "permission denied: is this user in the docker group?"),
    ("timed out", "it did not answer in time"),
    ("Name or service not known", "the host name is unknown"),
    ("certificate", "its TLS certificate was refused"),
)


def _unreachable(exc: Exception, where: str = "") -> DockerUnavailableError:
    """One sentence for an engine that cannot be reached: where, and the likely cause."""
    if where:
        advice = "start that engine or change the engines setting"
    else:
        where = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
        advice = "start the Docker engine or set DOCKER_HOST"
    text = _explain(exc)
    cause = next((c for key, c in _UNREACHABLE_CAUSES if key in text), one_line(text)[:200])
    return DockerUnavailableError(f"Docker is not reachable at {where} ({cause}); {advice}.")


def _explain(exc: Exception) -> str:
    if isinstance(exc, docker.errors.APIError):
        return str(exc.explanation or exc).strip()
    return str(exc).strip()


def _size(size: int) -> str:
    """A byte count as people write it: ``64 MiB``, ``1.5 GiB``."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.4g} {unit}"
    return f"{size} bytes"


def out_of_memory_line(limit: int, exit_code: int) -> str:
    """The line a run's stderr gets when the kernel killed a process of it for memory.

    Args:
        limit: The container's memory limit in bytes (0: none).
        exit_code: The agent's exit code.
    """
    where = f" (limit {_size(limit)})" if limit else ""
    if exit_code == 0:
        return f"cldpd: a process of the agent ran out of memory{where} and was killed.\n"
    return f"cldpd: the agent ran out of memory{where} and was killed.\n"


def _is_under(path: str, parent: str) -> bool:
    parent = parent.rstrip("/")
    return path == parent or path.startswith(parent + "/")


def _home_of(user: str, env: dict[str, str]) -> str:
    """The home directory of an image's user, "" when it cannot be told without running it."""
    if env.get("HOME"):
        return env["HOME"]
    name = user.partition(":")[0]
    if name in ("", "root", "0"):
        return "/root"
    return "" if name.isdigit() else f"/home/{name}"


def _build_context(context_dir: str) -> IO[bytes]:
    """The build context as a tar file: the directory less .dockerignore's matches and pod.json."""
    exclude = [".dockerignore"]
    ignore = os.path.join(context_dir, ".dockerignore")
    if os.path.exists(ignore):
        with open(ignore, encoding="utf-8") as f:
            exclude += [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
    exclude.append("pod.json")  # last, so that no "!pod.json" can bring it back
    return build_utils.tar(context_dir, exclude=exclude)


class _BuildLog:
    """A build's log: split into lines for ``on_output``, with a tail kept for errors."""

    def __init__(self, on_output: Callable[[str], None] | None) -> None:
        self.on_output = on_output
        self.tail: deque[str] = deque(maxlen=40)
        self.step_containers: list[str] = []
        self.built = False
        self._pending = ""

    def say(self, line: str) -> None:
        """Pass a line of our own to ``on_output``."""
        if self.on_output is not None:
            self.on_output(line)

    def feed(self, text: str) -> None:
        """Take a piece of the engine's log; complete lines go out at once."""
        *lines, self._pending = (self._pending + text).split("\n")
        for line in lines:
            self.tail.append(line)
            step = _STEP_CONTAINER_RE.match(line)
            if step:
                self.step_containers.append(step.group(1))
            elif line.startswith("Successfully built"):
                self.built = True
            self.say(line)

    def close(self) -> None:
        """Send the last, unterminated line."""
        if self._pending:
            self.feed("\n")

    def tail_text(self) -> str:
        """The last lines of the log."""
        return "\n".join(self.tail)


class DockerRunner:
    """Runner on the Docker engine, through docker-py.

    Args:
        client: A ``docker.DockerClient``; ``docker.from_env()`` when None, which honours
            DOCKER_HOST. Without a client, each streaming operation gets a client of its
            own, since docker-py clients are not documented as thread-safe.
        base_url: Connect to this endpoint (``unix://``, ``tcp://``, ``ssh://``) instead.
        tls: ``(ca, cert, key)`` file paths: verify the engine with ``ca`` and present
            the client certificate ``cert`` with its key ``key``.
        use_ssh_client: Reach ``ssh://`` endpoints through the system's ``ssh`` command.
        timeout: Seconds any call but a stream may take (docker-py's default when None).
    """

    #: Shares of the stop timeout given to SIGINT and SIGTERM before SIGKILL.
    STOP_SHARES = (0.6, 0.3)

    def __init__(
        self,
        client: docker.DockerClient | None = None,
        *,
        base_url: str | None = None,
        tls: tuple[str, str, str] | None = None,
        use_ssh_client: bool = False,
        timeout: float | None = None,
    ) -> None:
        self._client = client
        self._shared: docker.DockerClient | None = client
        self._lock = threading.Lock()
        self._base_url = base_url
        self._tls = tls
        self._use_ssh_client = use_ssh_client
        self._timeout = timeout

    def _control(self) -> docker.APIClient:
        with self._lock:
            if self._shared is None:
                self._shared = self._connect()
            return self._shared.api

    def _connect(self) -> docker.DockerClient:
        timeout = {} if self._timeout is None else {"timeout": self._timeout}
        try:
            if self._base_url is None:
                return docker.from_env(**timeout)
            tls: docker.tls.TLSConfig | bool = False
            if self._tls is not None:
                ca, cert, key = self._tls
                tls = docker.tls.TLSConfig(client_cert=(cert, key), ca_cert=ca, verify=True)
            client = docker.DockerClient(
                base_url=self._base_url,
                tls=tls,
                use_ssh_client=self._use_ssh_client,
                # Asked once the client trusts the engine's CA alone (below).
                version=docker.constants.DEFAULT_DOCKER_API_VERSION if tls else None,
                **timeout,
            )
            if tls:
                # requests lets $REQUESTS_CA_BUNDLE replace the engine's CA (requests #3829).
                client.api.trust_env = False
                _PrivateAPI.use_server_version(client.api)
            return client
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise _unreachable(exc, self._base_url or "") from None

    @contextlib.contextmanager
    def _streaming(self) -> Iterator[docker.APIClient]:
        if self._client is not None:
            yield self._client.api
            return
        client = self._connect()
        try:
            yield client.api
        finally:
            client.close()

    def preflight(self) -> None:
        """Check that the Docker engine answers.

        Raises:
            DockerUnavailableError: It does not.
        """
        try:
            self._control().ping()
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise _unreachable(exc, self._base_url or "") from None

    def build(
        self,
        tag: str,
        context_dir: str,
        build_args: dict[str, str] | None = None,
        on_output: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None,
        engine: str = "",
    ) -> None:
        """Build an image from a directory, streaming the log as it comes.

        The directory's pod.json (and what its .dockerignore excludes) stays out of the
        build context, so no configured value reaches the engine that way.

        Args:
            tag: Image tag.
            context_dir: The build context, with a Dockerfile at its top.
            build_args: Docker build args.
            on_output: Called with each line of the build log.
            cancel: When set from another thread, the build is abandoned.
            engine: Must be "": this runner is one engine, not a configured engine.

        Raises:
            PodConfigError: ``engine`` names an engine.
            BuildFailedError: The build failed or was cancelled; carries the log tail.
        """
        _refuse_engine_pin(engine, tag)
        log = _BuildLog(on_output)
        context = _build_context(context_dir)
        try:
            digest = self._context_digest(context, context_dir, build_args or {})
            if digest is not None and self._image_digest(tag) == digest:
                log.say(f"cldpd: image {tag} is up to date (the pod has not changed)")
                return
            params = {
                "t": tag,
                "rm": True,
                "forcerm": True,
                "q": False,
                "buildargs": json.dumps(build_args or {}),
                "labels": json.dumps({LABEL_CONTEXT: digest or ""}),
            }
            error = self._stream_build(context, params, log, cancel)
        finally:
            context.close()
        log.close()
        if cancel is not None and cancel.is_set():
            error = error or "the build was stopped"
            # The engine may still be running the step's container: it is ours to remove.
            self._discard(log.step_containers[-1:])
        elif not error and not log.built:
            error = "the engine ended the build without an image"
        if error:
            raise BuildFailedError(f"Building image {tag} failed: {error}", log.tail_text())

    def _stream_build(
        self,
        context: IO[bytes],
        params: dict[str, Any],
        log: _BuildLog,
        cancel: threading.Event | None,
    ) -> str:
        """Run a build, feeding its log to ``log``; return the engine's error ("" if none)."""
        error = ""
        try:
            with self._streaming() as api:
                stream = _PrivateAPI.post_build(api, context, params)
                watcher = _Canceller(cancel, stream)
                try:
                    for item in stream:
                        if "aux" in item and "ID" in (item["aux"] or {}):
                            log.built = True
                        if "stream" in item:
                            log.feed(item["stream"])
                        elif "error" in item:
                            error = item["error"].strip()
                        elif "status" in item:
                            log.feed(item["status"] + "\n")
                finally:
                    watcher.done()
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            if cancel is not None and cancel.is_set():
                return "the build was stopped"
            logger.debug("build stream failed", exc_info=True)
            return _explain(exc)
        return error

    def _discard(self, containers: list[str], timeout: float = 10.0) -> None:
        """Force-remove containers and wait until the engine has let them go."""
        api = self._control()
        for cid in containers:
            self._force_remove(api, cid)
            deadline = time.monotonic() + timeout
            while self.inspect(cid) is not None and time.monotonic() < deadline:
                time.sleep(0.05)

    def _context_digest(
        self, context: IO[bytes], context_dir: str, build_args: dict[str, str]
    ) -> str | None:
        """Digest of what a build depends on: context, build args and base image ids.

        None when it cannot be known (a FROM with a variable, a base image not here yet),
        in which case the engine builds as usual.
        """
        digest = hashlib.sha256()
        for chunk in iter(lambda: context.read(1 << 20), b""):
            digest.update(chunk)
        context.seek(0)
        digest.update(json.dumps(build_args, sort_keys=True).encode())
        try:
            with open(os.path.join(context_dir, "Dockerfile"), encoding="utf-8") as f:
                dockerfile = f.read()
        except (OSError, UnicodeDecodeError):
            return None
        stages: set[str] = set()
        api = self._control()
        for match in _FROM_RE.finditer(dockerfile):
            image, stage = match.group(1), match.group(2)
            if image.lower() not in stages:
                if "$" in image:
                    return None
                try:
                    digest.update(api.inspect_image(image)["Id"].encode())
                except docker.errors.APIError:
                    return None
            if stage:
                stages.add(stage.lower())
        return "sha256:" + digest.hexdigest()

    def _image_digest(self, tag: str) -> str | None:
        try:
            labels = self._control().inspect_image(tag)["Config"].get("Labels") or {}
        except (docker.errors.APIError, KeyError, TypeError):
            return None
        return labels.get(LABEL_CONTEXT)

    @staticmethod
    def _writable_dirs(api: docker.APIClient, opts: RunOptions) -> list[str]:
        """The working and home directories a read-only root keeps writable with volumes.

        Directories already under a mount or /tmp need none; neither does "/".
        """
        try:
            config = api.inspect_image(opts.image).get("Config") or {}
        except docker.errors.NotFound:
            return []  # creating the container says so
        image_env = dict(item.partition("=")[::2] for item in config.get("Env") or [])
        candidates = [
            opts.workdir or config.get("WorkingDir") or "",
            _home_of(config.get("User") or "", {**image_env, **opts.env}),
        ]
        covered = ["/tmp", *(m.target for m in opts.mounts)]
        chosen: list[str] = []
        for path in sorted(p.rstrip("/") for p in candidates if p.startswith("/")):
            if path and not any(_is_under(path, c) for c in covered + chosen):
                chosen.append(path)
        return chosen

    def _create(self, api: docker.APIClient, opts: RunOptions, stdin_open: bool = False) -> str:
        _refuse_engine_pin(opts.engine, opts.name)
        mounts = [
            docker.types.Mount(m.target, m.source, type="bind", read_only=m.read_only)
            for m in opts.mounts
        ]
        tmpfs = None
        if opts.read_only_root:
            # Volumes, not tmpfs: the image's files there are copied in, and they take
            # disk rather than the container's memory limit.
            labels = {LABEL_VOLUME_OF: opts.name}
            mounts += [
                docker.types.Mount(path, None, type="volume", labels=labels)
                for path in self._writable_dirs(api, opts)
            ]
            if not any(_is_under("/tmp", m.target) for m in opts.mounts):
                tmpfs = {"/tmp": TMP_TMPFS_OPTIONS}
        limits = opts.resources
        host_config = api.create_host_config(
            init=True,
            mounts=mounts,
            network_mode=opts.network or None,
            cap_drop=["ALL"],
            cap_add=list(opts.cap_add) or None,
            security_opt=SECURITY_OPT,
            read_only=opts.read_only_root or None,
            tmpfs=tmpfs,
            nano_cpus=None if limits.cpus is None else round(limits.cpus * 1e9),
            mem_limit=limits.memory,
            memswap_limit=limits.memory,
            pids_limit=limits.pids,
            dns=opts.dns or None,
        )
        try:
            created = api.create_container(
                image=opts.image,
                command=opts.cmd,
                name=opts.name,
                environment=opts.resolved_env(),
                working_dir=opts.workdir or None,
                labels=opts.labels,
                host_config=host_config,
                stdin_open=stdin_open,
                tty=False,
            )
        except docker.errors.APIError as exc:
            if exc.status_code == 409:
                raise PodRunningError(
                    f"A container named {opts.name} already exists; stop it first."
                ) from None
            raise _container_error(opts, "create", exc) from None
        return created["Id"]

    def _start_or_remove(self, api: docker.APIClient, opts: RunOptions, cid: str) -> None:
        try:
            api.start(cid)
        except docker.errors.APIError as exc:
            self._force_remove(api, cid)
            raise _container_error(opts, "start", exc) from None

    @staticmethod
    def _force_remove(api: docker.APIClient, cid: str) -> None:
        with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
            api.remove_container(cid, force=True, v=True)

    @staticmethod
    def _say_if_out_of_memory(
        api: docker.APIClient, container: str, code: int, stderr: Writer | None
    ) -> None:
        """After a container's exit: one line on stderr when the kernel killed it for memory."""
        if stderr is None:
            return
        with contextlib.suppress(docker.errors.APIError):
            attrs = api.inspect_container(container)
            if (attrs.get("State") or {}).get("OOMKilled"):
                limit = (attrs.get("HostConfig") or {}).get("Memory") or 0
                stderr.write(out_of_memory_line(limit, code))

    @staticmethod
    def _say_if_exec_out_of_memory(
        api: docker.APIClient, container: str, since: float, stderr: Writer | None
    ) -> None:
        """After an exec killed by SIGKILL: one line when the engine saw an OOM since it began.

        The container's ``OOMKilled`` is only set when the container itself exits, so
        an exec is judged by the engine's ``oom`` events of its container.
        """
        if stderr is None:
            return
        with contextlib.suppress(docker.errors.APIError, requests.exceptions.RequestException):
            limit = (api.inspect_container(container).get("HostConfig") or {}).get("Memory")
            events = api.events(
                since=f"{since:.9f}",
                until=f"{time.time():.9f}",
                filters={"container": container, "event": "oom"},
                decode=True,
            )
            try:
                if any(True for _ in events):
                    stderr.write(out_of_memory_line(limit or 0, KILLED_EXIT_CODE))
            finally:
                events.close()

    @_engine_errors
    def run(
        self,
        opts: RunOptions,
        stdout: Writer,
        stderr: Writer | None = None,
        on_start: Callable[[ContainerInfo], None] | None = None,
    ) -> int:
        """Create, attach and start a container, stream its output, and wait for its end.

        The output stream is attached before the container starts, so nothing a fast
        container prints is missed. A non-zero exit code is a return value, not an error.

        Args:
            opts: What to run.
            stdout: Receives the container's stdout as text.
            stderr: Receives its stderr; None drops it.
            on_start: Called once the container has started.

        Returns:
            The container's exit code.

        Raises:
            PodRunningError: The container name is taken.
            ContainerFailedError: The container could not be created or started.
        """
        with self._streaming() as api:
            cid = self._create(api, opts)
            try:
                try:
                    stream = _PrivateAPI.attach(api, cid)
                except docker.errors.APIError as exc:
                    raise ContainerFailedError(
                        f"Could not attach to container {opts.name}: {_explain(exc)}"
                    ) from None
                self._start_or_remove(api, opts, cid)
                if on_start is not None:
                    on_start(ContainerInfo(opts.name, cid, "running", opts.labels, opts.image))
                _pump(stream, stdout, stderr)
                code = int(api.wait(cid)["StatusCode"])
                self._say_if_out_of_memory(api, cid, code, stderr)
                return code
            except docker.errors.NotFound:
                return -1
            finally:
                if opts.remove:
                    self._force_remove(api, cid)

    @_engine_errors
    def start(self, opts: RunOptions) -> ContainerInfo:
        """Create and start a container detached (for keepAlive pods).

        Args:
            opts: What to run; ``remove`` is ignored, the container lives until stopped.

        Returns:
            The started container.

        Raises:
            PodRunningError: The container name is taken.
            ContainerFailedError: The container could not be created or started.
        """
        api = self._control()
        cid = self._create(api, opts)
        self._start_or_remove(api, opts, cid)
        return ContainerInfo(opts.name, cid, "running", opts.labels, opts.image)

    @_engine_errors
    def exec(
        self,
        container: str,
        cmd: list[str],
        stdout: Writer,
        stderr: Writer | None = None,
        on_start: Callable[[ExecHandle], None] | None = None,
    ) -> int:
        """Run a command in a running container and stream its output.

        The command runs under ``sh``, which records its pid, so that
        :meth:`stop_exec` can signal this exec alone.

        Args:
            container: Container name or id.
            cmd: Command and arguments.
            stdout: Receives stdout as text.
            stderr: Receives stderr; None drops it.
            on_start: Called with a handle for stop_exec once the exec exists.

        Returns:
            The command's exit code.

        Raises:
            SessionNotFoundError: The container does not exist or is not running.
        """
        info = self.inspect(container)
        if info is None or not info.running:
            raise SessionNotFoundError(f"No running container named {container}.")
        pidfile = f"/tmp/.cldpd-exec-{uuid.uuid4().hex[:12]}.pid"
        wrapped = ["sh", "-c", '{ echo $$ >"$0"; } 2>/dev/null; exec "$@"', pidfile, *cmd]
        began = time.time()
        with self._streaming() as api:
            try:
                exec_id = api.exec_create(container, wrapped, stdout=True, stderr=True)["Id"]
                stream = _PrivateAPI.exec_start(api, exec_id)
            except docker.errors.NotFound:
                raise SessionNotFoundError(f"No running container named {container}.") from None
            except docker.errors.APIError as exc:
                if "not running" in _explain(exc):
                    raise SessionNotFoundError(f"No running container named {container}.") from None
                raise ContainerFailedError(
                    f"Could not run a command in {container}: {_explain(exc)}"
                ) from None
            if on_start is not None:
                on_start(ExecHandle(container, exec_id, pidfile))
            _pump(stream, stdout, stderr)
            try:
                for _ in range(50):
                    result = api.exec_inspect(exec_id)
                    if not result.get("Running"):
                        break
                    time.sleep(0.02)
                code = result.get("ExitCode")
            except docker.errors.NotFound:
                code = None
            if code == KILLED_EXIT_CODE:
                self._say_if_exec_out_of_memory(api, container, began, stderr)
            return -1 if code is None else int(code)

    def _signal_exec(self, handle: ExecHandle, signal: str) -> None:
        api = self._control()
        script = f'kill -{signal} "$(cat "$0")" 2>/dev/null'
        with contextlib.suppress(docker.errors.APIError):
            exec_id = api.exec_create(handle.container, ["sh", "-c", script, handle.pidfile])["Id"]
            api.exec_start(exec_id)

    def _signal_execs(self, container: str, signal: str) -> bool:
        """Signal every agent exec() started in a container (``0``: none); True if any is alive."""
        try:
            api = self._control()
            exec_id = api.exec_create(container, ["sh", "-c", _SIGNAL_EXECS, signal])["Id"]
            api.exec_start(exec_id)
            return api.exec_inspect(exec_id).get("ExitCode") == 0
        except (docker.errors.APIError, requests.exceptions.RequestException):
            return False

    def _exec_running(self, handle: ExecHandle) -> bool:
        try:
            return bool(self._control().exec_inspect(handle.exec_id).get("Running"))
        except docker.errors.APIError:
            return False

    @_engine_errors
    def stop_exec(self, handle: ExecHandle, timeout: float = 10.0) -> None:
        """Stop one exec gracefully: SIGINT, then SIGTERM, then SIGKILL; the container stays.

        Args:
            handle: The exec, from exec()'s on_start.
            timeout: Seconds before SIGKILL.
        """
        shares = (*self.STOP_SHARES, 0.1)
        for signal, share in zip(("INT", "TERM", "KILL"), shares, strict=True):
            if not self._exec_running(handle):
                return
            self._signal_exec(handle, signal)
            deadline = time.monotonic() + max(timeout * share, 0.5)
            while time.monotonic() < deadline:
                if not self._exec_running(handle):
                    return
                time.sleep(0.05)

    def _wait_exit(self, api: docker.APIClient, container: str, seconds: float) -> bool:
        try:
            api.wait(container, timeout=max(seconds, 0.1))
        except docker.errors.NotFound:
            return True
        except (requests.exceptions.RequestException, docker.errors.APIError):
            info = self.inspect(container)
            return info is None or not info.running
        return True

    @_engine_errors
    def stop(self, container: str, timeout: float = 10.0) -> None:
        """Stop a container gracefully: SIGINT (the agent ends its turn), SIGTERM, then SIGKILL.

        Args:
            container: Container name or id; a missing or stopped container is fine.
            timeout: Seconds before SIGKILL.

        Raises:
            StopFailedError: The engine refused to stop it.
        """
        info = self.inspect(container)
        if info is None or info.status not in ("running", "paused", "restarting"):
            return
        deadline = time.monotonic() + timeout * self.STOP_SHARES[0]
        if info.running and self._signal_execs(container, "INT"):
            # Agents running through exec (resumes, keepAlive runs) end their turn first:
            # stopping the container would kill them.
            while time.monotonic() < deadline and self._signal_execs(container, "0"):
                time.sleep(0.1)
        with self._streaming() as api:
            for signal, share in zip(("SIGINT", "SIGTERM"), self.STOP_SHARES, strict=True):
                try:
                    api.kill(container, signal=signal)
                except docker.errors.NotFound:
                    return
                except docker.errors.APIError as exc:
                    if "is not running" in _explain(exc):
                        return
                    raise StopFailedError(f"Could not stop {container}: {_explain(exc)}") from None
                if self._wait_exit(api, container, timeout * share):
                    return
            try:
                api.kill(container)
            except docker.errors.NotFound:
                return
            except docker.errors.APIError as exc:
                if "is not running" not in _explain(exc):
                    raise StopFailedError(f"Could not stop {container}: {_explain(exc)}") from None
            self._wait_exit(api, container, 10)

    @_engine_errors
    def remove(self, container: str) -> None:
        """Force-remove a container; a missing one is fine."""
        self._force_remove(self._control(), container)

    @_engine_errors
    def image_exists(self, tag: str) -> bool:
        """Whether the engine has an image of this tag."""
        try:
            self._control().inspect_image(tag)
        except docker.errors.ImageNotFound:
            return False
        return True

    @_engine_errors
    def create_network(self, name: str, labels: dict[str, str], internal: bool = True) -> str:
        """Create a bridge network; an internal one has no way out but through its containers.

        Returns:
            Its subnet, such as ``172.30.0.0/16``.
        """
        api = self._control()
        api.create_network(name, driver="bridge", internal=internal, labels=labels)
        config = (api.inspect_network(name).get("IPAM") or {}).get("Config") or [{}]
        return config[0].get("Subnet", "")

    @_engine_errors
    def remove_network(self, name: str) -> None:
        """Remove a network, disconnecting what is still on it; a missing one is fine."""
        api = self._control()
        try:
            attached = api.inspect_network(name).get("Containers") or {}
        except docker.errors.NotFound:
            return
        for cid in attached:
            with contextlib.suppress(docker.errors.APIError):
                api.disconnect_container_from_network(cid, name, force=True)
        with contextlib.suppress(docker.errors.NotFound):
            api.remove_network(name)

    @_engine_errors
    def list_networks(self, label: str) -> list[str]:
        """Names of the networks that carry a label (``key`` or ``key=value``)."""
        return sorted(n["Name"] for n in self._control().networks(filters={"label": label}))

    @_engine_errors
    def start_service(self, opts: RunOptions, networks: list[str], stdin: bytes) -> ContainerInfo:
        """Start a detached container on ``opts.network`` and more networks, fed on stdin.

        Whatever ``stdin`` holds reaches the process through the engine's attach stream
        only: it is in no environment, label, file or ``docker inspect`` output.

        Args:
            opts: What to run.
            networks: Further networks the container joins before it starts.
            stdin: Bytes written to its stdin, which is then closed.

        Raises:
            PodRunningError: The container name is taken.
            ContainerFailedError: It could not be created, connected or started.
        """
        api = self._control()
        cid = self._create(api, opts, stdin_open=True)
        try:
            for network in networks:
                api.connect_container_to_network(cid, network)
            sock = api.attach_socket(cid, params={"stdin": 1, "stream": 1})
        except docker.errors.APIError as exc:
            self._force_remove(api, cid)
            raise _container_error(opts, "connect", exc) from None
        raw = getattr(sock, "_sock", sock)
        try:
            self._start_or_remove(api, opts, cid)
            raw.sendall(stdin)
        finally:
            raw.close()
        return ContainerInfo(opts.name, cid, "running", opts.labels, opts.image)

    @_engine_errors
    def address(self, container: str, network: str) -> str:
        """A container's IP address on a network ("" when it is not on it)."""
        attrs = self._control().inspect_container(container)
        networks = (attrs.get("NetworkSettings") or {}).get("Networks") or {}
        return (networks.get(network) or {}).get("IPAddress") or ""

    @staticmethod
    def _info(attrs: dict[str, Any]) -> ContainerInfo:
        config = attrs.get("Config") or {}
        state = attrs.get("State") or {}
        return ContainerInfo(
            name=attrs.get("Name", "").lstrip("/"),
            id=attrs.get("Id", ""),
            status=state.get("Status", ""),
            labels=config.get("Labels") or {},
            image=config.get("Image", ""),
            started_at=state.get("StartedAt", ""),
            env=dict(item.partition("=")[::2] for item in config.get("Env") or []),
        )

    @_engine_errors
    def inspect(self, container: str) -> ContainerInfo | None:
        """Describe a container.

        Args:
            container: Name or id.

        Returns:
            Its description, None when there is no such container.
        """
        try:
            return self._info(self._control().inspect_container(container))
        except docker.errors.NotFound:
            return None
        except docker.errors.DockerException as exc:
            raise DockerUnavailableError(f"Docker did not answer: {_explain(exc)}.") from None

    @_engine_errors
    def list(self, label: str) -> list[ContainerInfo]:
        """List containers, running or not, that carry a label.

        Args:
            label: A label key, or ``key=value``.
        """
        api = self._control()
        found = []
        for summary in api.containers(all=True, filters={"label": label}):
            info = self.inspect(summary["Id"])
            if info is not None:
                found.append(info)
        return sorted(found, key=lambda c: c.name)

    @_engine_errors
    def logs(self, container: str, stdout: Writer, stderr: Writer | None = None) -> int:
        """Follow a container's output from its start until it exits.

        The output already printed is read back from the engine's log (an attach with
        ``logs`` can miss it), then followed as it comes.

        Args:
            container: Name or id.
            stdout: Receives stdout as text.
            stderr: Receives stderr; None drops it.

        Returns:
            The exit code, or -1 when the container vanished.

        Raises:
            SessionNotFoundError: There is no such container.
        """
        if self.inspect(container) is None:
            raise SessionNotFoundError(f"No container named {container}.")
        with self._streaming() as api:
            try:
                _pump(_PrivateAPI.follow_logs(api, container), stdout, stderr)
                return int(api.wait(container)["StatusCode"])
            except docker.errors.NotFound:
                return -1


class _Canceller:
    """Closes a stream from a helper thread once an event is set."""

    def __init__(self, cancel: threading.Event | None, stream: CancellableStream) -> None:
        self._finished = threading.Event()
        self._cancel = cancel
        self._stream = stream
        if cancel is not None:
            threading.Thread(target=self._watch, daemon=True, name="cldpd-build-cancel").start()

    def _watch(self) -> None:
        assert self._cancel is not None
        while not self._finished.is_set():
            if self._cancel.wait(0.1):
                with contextlib.suppress(Exception):
                    self._stream.close()
                return

    def done(self) -> None:
        self._finished.set()


__all__ = [
    "LABEL_CONTEXT",
    "ContainerInfo",
    "DockerRunner",
    "ExecHandle",
    "RunOptions",
    "Runner",
    "Writer",
]
