"""Image builds on a Docker engine: the context and its digest, the streamed log, clean-up
of a cancelled build."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Callable
from typing import IO, Any

import docker
import docker.errors
import requests
import requests.exceptions
from docker.types.daemon import CancellableStream
from docker.utils import build as build_utils

from ...errors import BuildFailedError
from ...logs import log_swallowed
from ...secrets import Masker, looks_secret
from .containers import Containers
from .engine import (
    DockerConnection,
    PrivateAPI,
    engine_errors,
    explain,
    force_remove,
    refuse_engine_pin,
)

logger = logging.getLogger(__package__)

#: A legacy-builder log line naming the container that runs a build step.
_STEP_CONTAINER_RE = re.compile(r"^ ---> Running in ([0-9a-f]{12,64})\s*$")


#: Image label holding the digest of the build's inputs, to skip rebuilding an unchanged pod.
LABEL_CONTEXT = "cldpd.context"
_FROM_RE = re.compile(
    r"^\s*FROM\s+(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?", re.IGNORECASE | re.MULTILINE
)


def _build_context(context_dir: str) -> IO[bytes]:
    """The build context as a tar file: the directory less .dockerignore's matches and pod.json."""
    exclude = [".dockerignore"]
    ignore = os.path.join(context_dir, ".dockerignore")
    if os.path.exists(ignore):
        with open(ignore, encoding="utf-8") as f:
            exclude += [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
    exclude.append("pod.json")  # last, so that no "!pod.json" can bring it back
    return build_utils.tar(context_dir, exclude=exclude)


def _url_mask(build_args: dict[str, str]) -> Masker:
    """Masks the secret build args (by their names), also as a request's URL writes them:
    build args travel in the URL, which the error of a failed request holds."""
    values = [value for name, value in build_args.items() if looks_secret(name)]
    return Masker(values + [urllib.parse.quote_plus(json.dumps(v)[1:-1]) for v in values])


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


class ImageBuilder:
    """Builds the images of one engine, skipping a build whose inputs have not changed.

    Args:
        connection: The engine's clients.
        containers: The engine's containers (a cancelled build's step container goes).
    """

    def __init__(self, connection: DockerConnection, containers: Containers) -> None:
        self.connection = connection
        self.containers = containers

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
        refuse_engine_pin(engine, tag)
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
            error = self._stream_build(context, params, log, cancel, _url_mask(build_args or {}))
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
        mask: Callable[[str], str] | None = None,
    ) -> str:
        """Run a build, feeding its log to ``log``; return the engine's error ("" if none).

        ``mask`` masks the error of a failed request and what is logged of it.
        """
        error = ""
        try:
            with self.connection.streaming() as api:
                stream = PrivateAPI.post_build(api, context, params)
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
            log_swallowed(logger, "build stream failed", mask)
            return explain(exc) if mask is None else mask(explain(exc))
        return error

    def _discard(self, containers: list[str], timeout: float = 10.0) -> None:
        """Force-remove containers and wait until the engine has let them go."""
        api = self.connection.control()
        for cid in containers:
            force_remove(api, cid)
            deadline = time.monotonic() + timeout
            while self.containers.inspect(cid) is not None and time.monotonic() < deadline:
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
        api = self.connection.control()
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
            labels = self.connection.control().inspect_image(tag)["Config"].get("Labels") or {}
        except (docker.errors.APIError, KeyError, TypeError):
            return None
        return labels.get(LABEL_CONTEXT)

    @engine_errors
    def image_exists(self, tag: str) -> bool:
        """Whether the engine has an image of this tag."""
        try:
            self.connection.control().inspect_image(tag)
        except docker.errors.ImageNotFound:
            return False
        return True


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
