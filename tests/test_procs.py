"""Port choice for the local mesh: a port picked now and bound later must still be free."""

from __future__ import annotations

import socket

from xds_server.lab import procs


def test_free_ports_are_below_the_kernels_ephemeral_range_and_never_repeat() -> None:
    """Ports from the ephemeral range were taken by outgoing connections (scrapes, load)
    between choosing and binding them; one CI run failed on it."""
    low = procs._ephemeral_low()
    ports = [procs.free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    assert all(1024 <= p < low for p in ports)


def test_a_port_someone_listens_on_is_never_handed_out() -> None:
    """Fill the allocator's only candidate with a listener: it must fall back, not return it."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        saved = procs._LOWEST_PORT, procs._MIN_CANDIDATES, procs._ephemeral_low
        try:
            # The taken port is the only candidate.
            procs._LOWEST_PORT, procs._MIN_CANDIDATES = taken, 1
            procs._ephemeral_low = lambda: taken + 1  # type: ignore[assignment]
            assert procs.free_port() != taken
        finally:
            procs._LOWEST_PORT, procs._MIN_CANDIDATES, procs._ephemeral_low = saved  # type: ignore[assignment]
