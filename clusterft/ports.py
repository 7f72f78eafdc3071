"""Free TCP ports for servers that clusterft starts on one machine (the demo's HTTP endpoint, the
benchmarks' apps, the tests' Ray nodes), picked so that nothing takes them before the server binds.

A port picked by binding to 0 comes from the kernel's ephemeral range, from which every outgoing
connection (a gRPC client's, Ray's own) also takes its local port: one can take it between the pick
and the server's bind. These ports lie outside that range and outside Ray's worker ports
(10002-19999 by default, which raylets hand to the workers they fork).
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import time
from pathlib import Path

_ISSUED: set[int] = set()


def _port_candidates() -> list[int]:
    """20000-65535 less the ephemeral range (read from the kernel; Linux's default if unreadable)."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return [port for port in range(20000, 65536) if not low <= port <= high]


_CANDIDATES = _port_candidates()
# Each process starts at its own place in the range, so two processes rarely probe the same port.
_NEXT = random.Random(f"{os.getpid()}-{time.time_ns()}").randrange(len(_CANDIDATES))


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports, none issued before in this process. Each port is probed by
    binding it on every address (what a server binding 0.0.0.0 or the node's IP needs), and held
    until all are picked: `ray start` refuses a port given to two of its components."""
    global _NEXT
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        for _ in range(len(_CANDIDATES)):
            port = _CANDIDATES[_NEXT]
            _NEXT = (_NEXT + 1) % len(_CANDIDATES)
            if port in _ISSUED:
                continue
            sock = socket.socket()
            try:
                sock.bind(("0.0.0.0", port))
            except OSError:  # in use, or in TIME_WAIT from an earlier server
                sock.close()
                continue
            stack.enter_context(sock)  # held until all are picked
            ports.append(port)
            if len(ports) == count:
                _ISSUED.update(ports)
                return ports
        raise RuntimeError(f"fewer than {count} free ports outside the ephemeral range")


def free_port() -> int:
    """One free port (see free_ports)."""
    return free_ports(1)[0]
