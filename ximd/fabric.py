"""The group fabric: the network a group's engines reach each other on. Pure but for `host_interfaces`.

The engines of a group (one model across hosts, docs/groups.md) talk to each other
directly: torch.distributed's rendezvous on the leader's master port, Gloo's full
mesh, NCCL's bootstrap and data, vLLM's ZeroMQ queues, on ephemeral TCP ports in
both directions, unauthenticated, carrying pickles. ximd cannot secure that; it
can make sure the engines use the network the operator chose, and refuse one
that is public.

vLLM finds its own address by a guess (the source address of a UDP "connect" to
8.8.8.8), and never tells Gloo or NCCL which interface to use, so Gloo resolves
the hostname (127.0.1.1 on Debian) and the group fails with "Gloo connectFullMesh
failed". So ximd resolves an explicit address and interface from `[group]` and
hands both to the engine (`ximd.engine.launch.fabric_env`).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import psutil


class FabricError(ValueError):
    """The fabric cannot be used as configured; the message says why and what to set."""


@dataclass(frozen=True)
class Fabric:
    address: str      # this node's address on the fabric (VLLM_HOST_IP)
    interface: str    # the interface holding it (GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME)
    first_port: int   # the leader's master port
    last_port: int

    @property
    def master_port(self) -> int:
        """Where the leader's torch.distributed rendezvous listens."""
        return self.first_port

    @property
    def engine_port(self) -> int:
        """VLLM_PORT: where vLLM's own search for free ports starts (its ZeroMQ queues)."""
        return self.first_port + 1


def parse_port_range(text: str) -> tuple[int, int]:
    """'29500-29599' → (29500, 29599); the configuration has checked the form."""
    low, high = text.split("-", 1)
    return int(low), int(high)


def host_interfaces() -> dict[str, list[str]]:
    """Each network interface with its IPv4 and IPv6 addresses (IPv4 first)."""
    found: dict[str, list[str]] = {}
    for name, addrs in psutil.net_if_addrs().items():
        v4 = [a.address for a in addrs if a.family == socket.AF_INET]
        v6 = [a.address.split("%", 1)[0] for a in addrs if a.family == socket.AF_INET6]
        found[name] = v4 + v6
    return found


def public_reason(address: str) -> str | None:
    """Why ``address`` cannot carry a group's traffic as a private fabric, or None when it can.

    Private means not routed on the internet: RFC 1918, unique-local IPv6, link-local,
    loopback (a group on one host, for tests) and shared address space (100.64/10,
    what carrier NAT and overlays such as Tailscale use) all count.
    """
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return f"{address!r} is not an IP address"
    if ip.is_unspecified or ip.is_multicast:
        return f"{address} is not the address of one host"
    if ip.is_global:
        return f"{address} is a public address"
    return None


def refusal(address: str, *, allow_public: bool) -> str | None:
    """Why a group's engines may not talk over ``address`` under `[group]`'s rule, or None.

    The rule of this node's own address, and of the leader's the router names with `run`:
    a follower's engine dials the leader and takes its pickles.
    """
    reason = public_reason(address)
    if reason is None or (allow_public and reason.endswith("public address")):
        return None
    return reason


def resolve_fabric(interface: str, address: str, interfaces: Mapping[str, Sequence[str]], *,
                   port_range: str, allow_public: bool) -> Fabric:
    """The fabric from `[group]`'s settings and the host's interfaces; FabricError when it cannot be used.

    One of interface and address is enough: the other is looked up. Neither set is an
    error, not a guess: a guess is how groups end up on the wrong network.
    """
    if not interface and not address:
        raise FabricError("a group needs its fabric: set group.fabric_interface (such as eth1) or "
                          "group.fabric_address (this node's address on the private network the "
                          "group's members share)")
    if interface and interface not in interfaces:
        raise FabricError(f"group.fabric_interface {interface!r}: no such interface on this host "
                          f"(it has {', '.join(sorted(interfaces)) or 'none'})")
    if address:
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise FabricError(f"group.fabric_address {address!r} is not an IP address") from None
        holders = [name for name, addrs in interfaces.items() if _same_ip(address, addrs)]
        if not holders:
            raise FabricError(f"group.fabric_address {address}: no interface of this host has it")
        if interface and interface not in holders:
            raise FabricError(f"group.fabric_address {address} is on {', '.join(holders)}, "
                              f"not on group.fabric_interface {interface}")
        interface = interface or holders[0]
    else:
        if not interfaces[interface]:
            raise FabricError(f"group.fabric_interface {interface} has no address")
        address = interfaces[interface][0]
    reason = refusal(address, allow_public=allow_public)
    if reason:
        raise FabricError(f"group fabric: {reason}; the group's engines exchange unauthenticated pickles on "
                          "every TCP port, so the fabric must be a private network"
                          + ("" if allow_public else " (group.allow_public_fabric = true overrides this)"))
    low, high = parse_port_range(port_range)
    return Fabric(address, interface, low, high)


def _same_ip(address: str, candidates: Sequence[str]) -> bool:
    try:
        wanted = ipaddress.ip_address(address)
    except ValueError:
        return False
    for candidate in candidates:
        try:
            if ipaddress.ip_address(candidate) == wanted:
                return True
        except ValueError:
            continue
    return False


def fabric_from_config(cfg, interfaces: Mapping[str, Sequence[str]] | None = None) -> Fabric:
    """`resolve_fabric` for a loaded configuration and (by default) this host's interfaces."""
    group = cfg.group
    return resolve_fabric(group.fabric_interface, group.fabric_address,
                          host_interfaces() if interfaces is None else interfaces,
                          port_range=group.port_range, allow_public=group.allow_public_fabric)
