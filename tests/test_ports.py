"""Free ports: outside the kernel's ephemeral range, never one in use, never the same twice."""

from __future__ import annotations

import socket
from pathlib import Path

from clusterft import ports


def test_ports_are_outside_the_ephemeral_range_distinct_and_bindable():
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    picked = ports.free_ports(7) + ports.free_ports(7) + [ports.free_port()]
    assert len(set(picked)) == 15
    assert all(port >= 20000 and not low <= port <= high for port in picked), picked
    for port in picked:
        with socket.socket() as sock:
            sock.bind(("0.0.0.0", port))


def test_a_port_someone_listens_on_is_passed_over():
    taken = ports._CANDIDATES[ports._NEXT]  # the port the next pick would probe first
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", taken))
        listener.listen()
        assert ports.free_port() != taken
