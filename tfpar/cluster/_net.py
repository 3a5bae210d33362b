"""Ports and listening sockets: free ports, who holds a port, what listens where (no TensorFlow).

TensorFlow's gRPC servers always listen on every interface (``0.0.0.0``/``[::]``), whatever host
the cluster spec names, so a port is free only if the wildcard address can be bound, and
:func:`listening_addresses` shows what a cluster exposes. Linux details come from ``/proc``.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
from collections.abc import Iterable

__all__ = ["can_bind", "free_ports", "is_local_host", "listening_addresses", "owned_by_this_process"]

_LOCAL_NAMES = ("localhost", "::1", "0.0.0.0", "::", "ip6-localhost")


def is_local_host(host: str) -> bool:
    """Whether `host` names this machine (loopback, a wildcard, or this host's name)."""
    host = host.lower()
    if host in _LOCAL_NAMES or host.startswith("127."):
        return True
    try:
        return host == socket.gethostname().lower()
    except OSError:
        return False


def can_bind(port: int) -> bool:
    """Whether TensorFlow's wildcard listener could bind `port` right now."""
    families = [(socket.AF_INET6, ("::", port)), (socket.AF_INET, ("0.0.0.0", port))]
    for family, address in families:
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(address)
            return True
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                return False
        finally:
            sock.close()
    return True


def owned_by_this_process(port: int) -> bool:
    """Whether a socket of this process listens on `port` (True where it cannot be told)."""
    if not sys.platform.startswith("linux"):
        return True  # cannot tell: do not raise a false alarm
    inodes = {inode for _, inode in _listening_sockets().get(port, [])}
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return True
    for fd in fds:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:[") and int(target[8:-1]) in inodes:
            return True
    return False


def _listening_sockets() -> dict[int, list[tuple[str, int]]]:
    """port -> [(local address, socket inode)] for TCP sockets in LISTEN state (Linux /proc)."""
    result: dict[int, list[tuple[str, int]]] = {}
    for name, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        try:
            with open(name, encoding="ascii") as handle:
                lines = handle.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != "0A":  # 0A = LISTEN
                continue
            hex_ip, hex_port = fields[1].split(":")
            raw = bytes.fromhex(hex_ip)
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            ip = socket.inet_ntop(family, raw)
            ip = f"[{ip}]" if family == socket.AF_INET6 else ip
            result.setdefault(int(hex_port, 16), []).append((ip, int(fields[9])))
    return result


def listening_addresses(ports: Iterable[int]) -> dict[int, list[str]]:
    """The local addresses on which each port has a listening TCP socket (Linux only).

    Use it to see what a cluster exposes: ``127.0.0.1:p`` / ``[::1]:p`` are loopback only,
    ``0.0.0.0:p`` / ``[::]:p`` accept connections from other hosts.

    Args:
        ports: TCP port numbers.

    Returns:
        ``{port: ["<address>:<port>", ...]}``, an empty list for a port nobody listens on (in
        this network namespace).

    Raises:
        RuntimeError: On systems without ``/proc/net/tcp``.

    Example:
    >>> tfpar.cluster.listening_addresses([1])
    {1: []}
    """
    if not os.path.exists("/proc/net/tcp"):
        raise RuntimeError(
            "listening_addresses() reads /proc/net/tcp, which exists on Linux only. "
            f"Received: platform={sys.platform!r}. Use `ss -ltn` or `netstat -an` instead."
        )
    table = _listening_sockets()
    ports = [int(p) for p in ports]
    return {p: sorted({f"{ip}:{p}" for ip, _ in table.get(p, [])}) for p in ports}


def free_ports(count: int) -> list[int]:
    """Picks `count` distinct TCP ports that are free right now (with portpicker).

    The ports are not reserved: bind them soon. Used for the 127.0.0.1 clusters tfpar makes.

    Args:
        count: How many ports, >= 1.

    Returns:
        Distinct port numbers.

    Raises:
        ValueError: If `count` is not an int >= 1.
        RuntimeError: If not enough free ports can be found.

    Example:
    >>> len(set(tfpar.cluster.free_ports(3)))
    3
    """
    import portpicker

    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"Expected count to be an int >= 1. Received: count={count!r}")

    ports: list[int] = []
    while len(ports) < count:
        try:
            port = portpicker.pick_unused_port()
        except portpicker.NoFreePortFoundError as error:
            raise RuntimeError(
                f"Could not find {count} free TCP ports on 127.0.0.1 (found {len(ports)}). "
                "Free some ports or retry."
            ) from error
        if port not in ports:
            ports.append(port)
    return ports
