"""Networks on a Docker engine, for a pod's egress: internal bridges and addresses on them."""

from __future__ import annotations

import contextlib

import docker.errors

from .engine import DockerConnection, engine_errors

#: The bridge driver's option that leaves the host without an address on the network.
INHIBIT_HOST_ADDRESS = "com.docker.network.bridge.inhibit_ipv4"


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

        An internal network's bridge gets no address on the engine's host: its containers
        then have no way to the host either (its services on any address, its other
        networks), which an address there would give them through the host's INPUT chain.

        Returns:
            Its subnet, such as ``172.30.0.0/16``.
        """
        api = self.connection.control()
        options = {INHIBIT_HOST_ADDRESS: "true"} if internal else None
        api.create_network(name, driver="bridge", internal=internal, labels=labels, options=options)
        return self._ipam(name).get("Subnet", "")

    def _ipam(self, name: str) -> dict[str, str]:
        config = (self.connection.control().inspect_network(name).get("IPAM") or {}).get("Config")
        return (config or [{}])[0]

    @engine_errors
    def gateway(self, name: str) -> str:
        """The gateway address the engine reserved on a network ("" when none)."""
        return self._ipam(name).get("Gateway", "")

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
