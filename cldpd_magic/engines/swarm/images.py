"""A swarm's images: built on every ready node, or once on the manager and pushed to a
registry the nodes pull from."""

from __future__ import annotations

import threading
from collections.abc import Callable

from ...errors import BuildFailedError, one_line
from .nodes import Nodes


class Images:
    """Puts a pod's image where the swarm's tasks find it.

    Args:
        nodes: The swarm's nodes.
        registry: A registry (``host[:port]``) to push images to, built once on the
            manager, for the nodes to pull; "" builds each image on every ready node.
    """

    def __init__(self, nodes: Nodes, registry: str = "") -> None:
        self.nodes = nodes
        self.registry = registry

    def build(
        self,
        tag: str,
        context_dir: str,
        build_args: dict[str, str] | None = None,
        on_output: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> None:
        """Build the image on every ready node, through each node's engine; or, with a
        registry, on the manager, then push it there.

        Raises:
            BuildFailedError: A build failed, or the registry refused the push.
        """
        if self.registry:
            self.nodes.manager.build(tag, context_dir, build_args, on_output, cancel)
            self._push(tag, on_output)
            return
        built: set[int] = set()
        for node_id in self.nodes.ready():
            runner = self.nodes.runner_of(node_id)
            if id(runner) not in built:
                built.add(id(runner))
                runner.build(tag, context_dir, build_args, on_output, cancel)

    def _push(self, tag: str, on_output: Callable[[str], None] | None) -> None:
        """Tag the manager's image for the registry and push it."""
        reference = self.pulled(tag)
        named = ":" in reference.rpartition("/")[2]
        repository, version = reference.rsplit(":", 1) if named else (reference, "latest")
        api = self.nodes.api()
        api.tag(tag, repository, version)
        for chunk in api.push(repository, version, stream=True, decode=True):
            if chunk.get("error"):
                raise BuildFailedError(
                    f"Pushing image {tag} to {self.registry} failed: {one_line(chunk['error'])}"
                )
            if on_output is not None and chunk.get("status") and not chunk.get("progress"):
                on_output(f"{chunk['status']}\n")

    def pulled(self, tag: str) -> str:
        """The reference nodes run an image by: in the registry when there is one."""
        return f"{self.registry}/{tag}" if self.registry else tag

    def unpulled(self, image: str) -> str:
        """The pod's own tag of an image reference the nodes run."""
        prefix = f"{self.registry}/"
        if not self.registry or not image.startswith(prefix):
            return image
        return image[len(prefix) :]
