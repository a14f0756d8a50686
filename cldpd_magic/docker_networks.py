"""Networks on a Docker engine, for a pod's egress: internal bridges and addresses on them."""

from __future__ import annotations

import contextlib

import docker.errors

from .docker_engine import DockerConnection, engine_errors


class Networks:
    """Creates, lists and removes the bridge networks of one engine.

    Args:
        connection: The engine's clients.
    """

    def __init__(self, connection: DockerConnection) -> None:
        self.connection = connection

    @engine_errors
    def create_network(self, name: str, labels: dict[str, str], internal: bool = True) -> str:
        """Create a bridge network; an internal one has no way out but through its containers.

        Returns:
            Its subnet, such as ``172.30.0.0/16``.
        """
        api = self.connection.control()
        api.create_network(name, driver="bridge", internal=internal, labels=labels)
        config = (api.inspect_network(name).get("IPAM") or {}).get("Config") or [{}]
        return config[0].get("Subnet", "")

    @engine_errors
    def remove_network(self, name: str) -> None:
        """Remove a network, disconnecting what is still on it; a missing one is fine."""
        api = self.connection.control()
        try:
            attached = api.inspect_network(name).get("Containers") or {}
        except docker.errors.NotFound:
            return
        for cid in attached:
            with contextlib.suppress(docker.errors.APIError):
                api.disconnect_container_from_network(cid, name, force=True)
        with contextlib.suppress(docker.errors.NotFound):
            api.remove_network(name)

    @engine_errors
    def list_networks(self, label: str) -> list[str]:
        """Names of the networks that carry a label (``key`` or ``key=value``)."""
        return sorted(
            n["Name"] for n in self.connection.control().networks(filters={"label": label})
        )

    @engine_errors
    def address(self, container: str, network: str) -> str:
        """A container's IP address on a network ("" when it is not on it)."""
        attrs = self.connection.control().inspect_container(container)
        networks = (attrs.get("NetworkSettings") or {}).get("Networks") or {}
        return (networks.get(network) or {}).get("IPAddress") or ""
