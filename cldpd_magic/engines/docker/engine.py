"""The runner layer's access to one Docker engine: clients, docker-py's private API behind
one adapter, multiplexed streams decoded into text, and docker-py's errors as ours."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import ssl
import struct
import threading
from collections.abc import Callable, Iterator
from typing import IO, Any

import docker
import docker.constants
import docker.errors
import docker.tls
import requests
import requests.exceptions
from docker.types.daemon import CancellableStream

from ...errors import ContainerFailedError, DockerUnavailableError, PodConfigError, one_line
from ..protocol import RunOptions, StdinPipe
from .streams import OutputStream

logger = logging.getLogger(__package__)


def _read_exactly(raw: Any, size: int) -> bytes:
    parts = []
    while size > 0:
        chunk = raw.read(size)
        if not chunk:
            break
        parts.append(chunk)
        size -= len(chunk)
    return b"".join(parts)


def _raw_socket(sock: Any) -> Any:
    """The socket under docker-py's hijacked one (a plain socket comes wrapped in SocketIO)."""
    return getattr(sock, "_sock", sock)


def half_close(sock: Any) -> None:
    """End the writing side of a hijacked connection; its output can still be read.

    The engine reads the end of the connection's input as the end of the process's stdin
    (a container created with StdinOnce, an exec). TLS has no half-close of its own: the
    TCP connection under it is shut for writing, as the docker CLI does
    (``SSLSocket.shutdown`` would also drop the TLS layer the output is still read
    through). paramiko's channel sends its end of file; docker-py's socket over the
    ``ssh`` command closes that command's stdin.
    """
    if isinstance(sock, ssl.SSLSocket):
        socket.socket.shutdown(sock, socket.SHUT_WR)
    elif hasattr(sock, "shutdown_write"):  # paramiko.Channel
        sock.shutdown_write()
    elif getattr(sock, "proc", None) is not None:  # docker.transport.sshconn.SSHSocket
        sock.proc.stdin.close()
    else:
        sock.shutdown(socket.SHUT_WR)


def connect_stdin(pipe: StdinPipe, sock: Any) -> None:
    """Connect a run's stdin pipe to the socket of an attach or exec made with stdin.

    The pipe's thread writes while the run's thread reads the output (an agent whose
    output is not read stops reading its input, so neither may wait for the other). On TLS
    that is one TLS session read and written at once, by two threads: each direction has
    its own record state, and the engine never renegotiates (checked by a stress of
    31 MB each way through a TLS engine, byte for byte).
    """
    pipe.connect(sock.sendall, functools.partial(half_close, sock))


class PrivateAPI:
    """The few private ``APIClient`` calls the runner needs, in one place.

    docker-py's public ``build()`` hands back a bare generator, so a build cannot be
    cancelled from another thread (its response must be closed), and its public
    ``logs()`` merges stdout and stderr into one stream. These calls give both; they are
    the same in docker-py 4 to 7, and pyproject pins ``docker<8`` so a change is seen.
    A hijacked socket (attach, exec) is read here in large reads (see
    :meth:`output_stream`), not by ``docker.utils.socket.frames_iter``; a logs response
    is plain HTTP whose body urllib3 may already have buffered, so its frames are read
    from the response as docker-py's own multiplexed-stream helper does.
    """

    @staticmethod
    def attach(api: docker.APIClient, container: str) -> OutputStream:
        """Attach to a created container's output, before it starts.

        The engine subscribes the attach to the container's output before it answers, so
        nothing a container started afterwards prints is missed. No ``logs``: replaying
        the log as well would deliver twice what the container printed before the replay
        ran (seen under load: every line twice), as the docker CLI's own run avoids.
        """
        params = {"stdout": 1, "stderr": 1, "stream": 1, "logs": 0}
        return PrivateAPI.output_stream(api, api.attach_socket(container, params=params))

    @staticmethod
    def attach_with_stdin(api: docker.APIClient, container: str) -> tuple[Any, OutputStream]:
        """Attach to a container's stdin and output (no log replay).

        Returns:
            The socket, to write the container's stdin, and its output.
        """
        params = {"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1, "logs": 0}
        stream = PrivateAPI.output_stream(
            api, api.attach_socket(container, params=params), answered=True
        )
        return stream.sock, stream

    @staticmethod
    def exec_start(api: docker.APIClient, exec_id: str) -> OutputStream:
        """Start an exec; its output."""
        return PrivateAPI.output_stream(api, api.exec_start(exec_id, socket=True))

    @staticmethod
    def exec_start_with_stdin(api: docker.APIClient, exec_id: str) -> tuple[Any, OutputStream]:
        """Start an exec created with stdin; the socket to write it, and its output."""
        stream = PrivateAPI.output_stream(api, api.exec_start(exec_id, socket=True), answered=True)
        return stream.sock, stream

    @staticmethod
    def output_stream(api: docker.APIClient, sock: Any, answered: bool = False) -> OutputStream:
        """A hijacked socket's output, read in large reads (see :class:`OutputStream`).

        docker-py polls the socket before each of two reads a frame: that costs a kernel
        of fifty runs a fifth of a core, and on TLS, bytes already decrypted wait in the
        SSL buffer while the poll blocks, so a line stays unseen until the engine sends
        more. Here one read takes whatever has come, often several frames. A stream whose
        stdin is ``answered`` (attached) is read at once, in its caller's thread.

        Args:
            api: The client that made the connection.
            sock: The hijacked socket docker-py returned (its response attached to it).
            answered: Its stdin is attached.
        """
        buffered = PrivateAPI._read_past_headers(getattr(sock, "_response", None))
        sock = _raw_socket(sock)
        api._disable_socket_timeout(sock)
        return OutputStream(sock, answered=answered, buffered=buffered)

    @staticmethod
    def _read_past_headers(response: Any) -> bytes:
        """What the engine sent right after its ``101 UPGRADED`` headers, if the response
        read it with them: http.client reads the headers through a buffer, which may hold
        the first output of an exec that printed at once. The socket is read from there
        on, so these bytes come first. Nothing is waited for."""
        try:  # urllib3's response, http.client's, and the buffered reader it read through
            reader = response.raw._fp.fp
            sock = reader.raw._sock
        except AttributeError:  # none (a test's socket), or no socket under it (ssh)
            return b""
        if not isinstance(sock, socket.socket):
            return b""
        timeout = sock.gettimeout()
        sock.setblocking(False)  # an empty buffer would be filled by a read: not waited for
        try:
            return bytes(reader.peek(0))  # the whole buffer, or one read of what has come
        except (OSError, ValueError):  # nothing buffered (a TLS read that would wait)
            return b""
        finally:
            sock.settimeout(timeout)

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
        for kind, data in response_frames(response):
            yield (None, data) if kind == 2 else (data, None)

    @staticmethod
    def service_logs(api: docker.APIClient, service: str, follow: bool) -> Any:
        """A Swarm service's log as a streamed response of frames (:func:`response_frames`).

        docker-py's ``service_logs`` merges stdout and stderr, like its ``logs``.
        """
        response = api._get(
            api._url("/services/{0}/logs", service),
            params={"stdout": 1, "stderr": 1, "follow": int(follow), "details": 0},
            stream=True,
            timeout=None,
        )
        api._raise_for_status(response)
        if follow:
            api._disable_socket_timeout(api._get_raw_response_socket(response))
        return response

    @staticmethod
    def response_socket(api: docker.APIClient, response: Any) -> Any:
        """The socket under a streamed response, to shut it down from another thread."""
        return api._get_raw_response_socket(response)


def response_frames(response: Any) -> Iterator[tuple[int, bytes]]:
    """``(stream id, payload)`` frames of a multiplexed log response until it ends; closes it."""
    try:
        while True:
            header = _read_exactly(response.raw, 8)
            if len(header) < 8:
                return
            kind, size = struct.unpack(">BxxxL", header)
            data = _read_exactly(response.raw, size)
            yield kind, data
            if len(data) < size:
                return
    finally:
        response.close()


def engine_errors(method: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a docker-py or connection error escaping a runner method into one sentence."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise DockerUnavailableError(
                f"Docker stopped answering ({one_line(explain(exc))}); check that the "
                "engine runs, then try again."
            ) from None

    return wrapper


def refuse_engine_pin(engine: str, what: str) -> None:
    """A pod pinned to an engine needs the engines setting; one engine alone is no match."""
    if engine:
        raise PodConfigError(
            f"{what} is pinned to engine {engine!r}, but no engines are configured; name it "
            "in CLDPD_ENGINES, %config CldpdMagics.engines or cldpd --engine, or drop "
            "'engine' from pod.json."
        )


def container_error(opts: RunOptions, action: str, exc: Exception) -> ContainerFailedError:
    """One sentence for a container the engine would not create or start."""
    explanation = explain(exc)
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


def unreachable(exc: Exception, where: str = "") -> DockerUnavailableError:
    """One sentence for an engine that cannot be reached: where, and the likely cause."""
    if where:
        advice = "start that engine or change the engines setting"
    else:
        where = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
        advice = "start the Docker engine or set DOCKER_HOST"
    text = explain(exc)
    cause = next((c for key, c in _UNREACHABLE_CAUSES if key in text), one_line(text)[:200])
    return DockerUnavailableError(f"Docker is not reachable at {where} ({cause}); {advice}.")


def explain(exc: Exception) -> str:
    """The engine's own words for an error, without docker-py's request URL."""
    if isinstance(exc, docker.errors.APIError):
        return str(exc.explanation or exc).strip()
    return str(exc).strip()


def force_remove(api: docker.APIClient, cid: str) -> None:
    """Force-remove a container and its anonymous volumes; a missing one is fine."""
    with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
        api.remove_container(cid, force=True, v=True)


class DockerConnection:
    """The clients of one Docker engine: a shared one for control calls, one per stream.

    Args:
        client: A ``docker.DockerClient`` used for everything; when None, a shared client
            is made on first use and each streaming operation gets a client of its own,
            since docker-py clients are not documented as thread-safe.
        base_url: The endpoint (``unix://``, ``tcp://``, ``ssh://``); DOCKER_HOST when None.
        tls: ``(ca, cert, key)`` file paths.
        use_ssh_client: Reach ``ssh://`` endpoints through the system's ``ssh`` command.
        timeout: Seconds any call but a stream may take (docker-py's default when None).
    """

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
        self.base_url = base_url
        self._tls = tls
        self._use_ssh_client = use_ssh_client
        self._timeout = timeout
        self._version: str | None = None  # the engine's API version, once asked

    def control(self) -> docker.APIClient:
        """The shared low-level client, for calls that return at once."""
        with self._lock:
            if self._shared is None:
                self._shared = self.connect()
            return self._shared.api

    def connect(self) -> docker.DockerClient:
        """A new client of the engine; DockerUnavailableError when it cannot be reached."""
        timeout = {} if self._timeout is None else {"timeout": self._timeout}
        known = self._version  # a stream's client need not ask the engine again
        try:
            if self.base_url is None:
                client = docker.from_env(version=known, **timeout)
            else:
                tls: docker.tls.TLSConfig | bool = False
                if self._tls is not None:
                    ca, cert, key = self._tls
                    tls = docker.tls.TLSConfig(client_cert=(cert, key), ca_cert=ca, verify=True)
                client = docker.DockerClient(
                    base_url=self.base_url,
                    tls=tls,
                    use_ssh_client=self._use_ssh_client,
                    # Asked once the client trusts the engine's CA alone (below).
                    version=known or (docker.constants.DEFAULT_DOCKER_API_VERSION if tls else None),
                    **timeout,
                )
                if tls:
                    # requests lets $REQUESTS_CA_BUNDLE replace the engine's CA (requests #3829).
                    client.api.trust_env = False
                    if known is None:
                        PrivateAPI.use_server_version(client.api)
            if str(client.api.base_url).startswith("http+docker://"):
                client.api.trust_env = False  # a local socket: no proxy or netrc to look up
            self._version = client.api.api_version
            return client
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise unreachable(exc, self.base_url or "") from None

    @contextlib.contextmanager
    def streaming(self) -> Iterator[docker.APIClient]:
        """A low-level client for one stream, closed afterwards unless it is the given one."""
        if self._client is not None:
            yield self._client.api
            return
        client = self.connect()
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
            self.control().ping()
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise unreachable(exc, self.base_url or "") from None
