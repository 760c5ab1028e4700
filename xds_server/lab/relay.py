"""A TCP relay that can be cut: a network partition between one process and another,
without root or network namespaces.

Point a replica's `--store` at a `Relay` in front of an etcd member and `cut()` it:
bytes stop flowing both ways and new connections are accepted but never reach the
target, as with packets dropped on the way (nothing is refused or reset, so the
client waits on its own timeouts); `heal()` lets everything through again.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading

from xds_server.lab.procs import free_port

POLL = 0.05
"""How often a blocked relay thread looks at the cut and stop flags (seconds)."""


class Relay:
    """127.0.0.1:`port` -> `target`, one thread per direction of each connection."""

    def __init__(self, target: tuple[str, int], port: int = 0) -> None:
        self.target = target
        self.port = port or free_port()
        self._open = threading.Event()
        self._open.set()
        self._stop = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        self._listener.settimeout(POLL)
        threading.Thread(target=self._accept, daemon=True, name=f"relay-{self.port}").start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def cut(self) -> None:
        """Nothing goes through from now on (connections stay open, and hang)."""
        self._open.clear()

    def heal(self) -> None:
        self._open.set()

    def close(self) -> None:
        self._stop.set()
        self._open.set()
        with self._lock:
            for s in [self._listener, *self._sockets]:
                with contextlib.suppress(OSError):
                    s.close()

    def _accept(self) -> None:
        while not self._stop.is_set():  # until close()
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        self._track(client)
        while not self._open.wait(POLL):  # a cut: the connection never gets through
            if self._stop.is_set():
                return
        try:
            upstream = socket.create_connection(self.target, timeout=2)
        except OSError:
            with contextlib.suppress(OSError):
                client.close()
            return
        self._track(upstream)
        threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
        self._pump(upstream, client)

    def _track(self, s: socket.socket) -> None:
        with self._lock:
            self._sockets.append(s)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        """Copy src -> dst while open; while cut, read nothing (the sender's data waits
        in the kernel's buffers, then the sender blocks)."""
        try:
            while not self._stop.is_set():  # until close() or either side ends
                if not self._open.wait(POLL):
                    continue
                ready, _, _ = select.select([src], [], [], POLL)
                if not ready or not self._open.is_set():
                    continue
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except (OSError, ValueError):  # ValueError: the other pump closed src (fileno -1)
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
