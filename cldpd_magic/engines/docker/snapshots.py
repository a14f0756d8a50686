"""Reading an ended container's files: a run's changes, taken before its container goes.

An ended container cannot run an exec. Its filesystem is committed to a temporary image,
and a throwaway container of that image, with the ended one's volumes and bind mounts
(``volumes_from``), its user and working directory, no network and no capabilities, runs
the given ``sh`` script; its stdout is the result. Both are removed whatever happens.
"""

from __future__ import annotations

import contextlib
import io
import tarfile

import docker
import docker.errors

from ...errors import ContainerFailedError, SessionNotFoundError
from .engine import DockerConnection, PrivateAPI, engine_errors, explain, force_remove

#: Label on the temporary image and container of a capture: the container they read.
LABEL_SNAPSHOT = "cldpd.snapshot"
#: Processes the throwaway container may have at once (git and a few tools).
SNAPSHOT_PIDS = 256
#: The largest capture left in a container that is read as it is (the capture of a run
#: capped at changesMaxBytes prints about 4/3 of that, base64, plus its notes).
MAX_LEFT_BYTES = 256 << 20
#: Bytes of its stderr kept for an error message.
_STDERR_KEPT = 2000


class Snapshots:
    """Runs scripts over ended containers' files on one engine.

    Args:
        connection: The engine's clients.
    """

    def __init__(self, connection: DockerConnection) -> None:
        self.connection = connection

    @engine_errors
    def capture(self, container: str, script: str, *, left_at: str | None = None) -> bytes:
        """Run ``sh -c script`` over an ended (or running) container's files; its stdout.

        Args:
            container: The container's name or id.
            script: The ``sh`` program; it sees the container's filesystem as it was,
                its volumes and bind mounts, its user, working directory and environment.
            left_at: A file where the container's command may have left what the script
                prints as it ended: an ended container holding it is read (an archive of
                one file) instead of snapshotted and scripted.

        Returns:
            What the script printed on stdout, as bytes.

        Raises:
            SessionNotFoundError: There is no such container.
            ContainerFailedError: The snapshot could not be made or the script failed.
        """
        with self.connection.streaming() as api:
            try:
                attrs = api.inspect_container(container)
            except docker.errors.NotFound:
                raise SessionNotFoundError(f"No container named {container}.") from None
            if left_at and not (attrs.get("State") or {}).get("Running"):
                left = _left_file(api, attrs["Id"], left_at)
                if left is not None:
                    return left
            try:
                image = api.commit(
                    attrs["Id"], conf={"Labels": {LABEL_SNAPSHOT: container}}, pause=True
                )["Id"]
            except docker.errors.APIError as exc:
                raise ContainerFailedError(
                    f"Could not snapshot the container {container} to read its changes: "
                    f"{explain(exc)}"
                ) from None
            try:
                return self._run(api, attrs, image, script, container)
            finally:
                # Removed already, or still used by a container being removed: let it be.
                with contextlib.suppress(docker.errors.APIError):
                    api.remove_image(image, force=True)

    @staticmethod
    def _run(api: docker.APIClient, attrs: dict, image: str, script: str, container: str) -> bytes:
        config = attrs.get("Config") or {}
        host_config = api.create_host_config(
            volumes_from=[attrs["Id"]],
            network_mode="none",
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            pids_limit=SNAPSHOT_PIDS,
        )
        cid = ""
        try:
            cid = api.create_container(
                image=image,
                entrypoint=["sh"],
                command=["-c", script, "cldpd-capture"],
                user=config.get("User") or None,
                working_dir=config.get("WorkingDir") or None,
                labels={LABEL_SNAPSHOT: container},
                host_config=host_config,
                network_disabled=True,
            )["Id"]
            stream = PrivateAPI.attach(api, cid)
            api.start(cid)
            out, err = bytearray(), bytearray()
            for chunk_out, chunk_err in stream:
                if chunk_out:
                    out += chunk_out
                if chunk_err and len(err) < _STDERR_KEPT:
                    err += chunk_err
            code = int(api.wait(cid)["StatusCode"])
        except docker.errors.APIError as exc:
            raise ContainerFailedError(
                f"Could not read the files of the container {container}: {explain(exc)}"
            ) from None
        finally:
            if cid:
                force_remove(api, cid)
        if code != 0:
            detail = " ".join(err.decode("utf-8", "replace").split())[-300:]
            raise ContainerFailedError(
                f"Reading the files of the container {container} failed (exit {code}"
                + (f": {detail}" if detail else "")
                + ")."
            )
        return bytes(out)


__all__ = ["LABEL_SNAPSHOT", "Snapshots"]


def _left_file(api: docker.APIClient, cid: str, path: str) -> bytes | None:
    """A regular file's content in a container (through the archive API, which reads an
    ended container too), at most MAX_LEFT_BYTES; None when it is not there or not one."""
    try:
        stream, stat = api.get_archive(cid, path)
    except docker.errors.APIError:
        return None
    # The archive of one file: a small tar; a directory, a link or a device is not taken.
    if not isinstance(stat, dict) or stat.get("size", 0) > MAX_LEFT_BYTES:
        return None
    data = b"".join(stream)
    with (
        contextlib.suppress(tarfile.TarError, OSError),
        tarfile.open(fileobj=io.BytesIO(data)) as tar,
    ):
        member = tar.next()
        if member is not None and member.isreg():
            extracted = tar.extractfile(member)
            if extracted is not None:
                return extracted.read()
    return None
