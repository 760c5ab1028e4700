"""`serve --workers N`: the parent process. It serves nothing itself: it starts N workers
(its own command line again, each told its place by `WORKER_ENV`), restarts one that
dies, forwards SIGHUP to all, and on SIGTERM or SIGINT stops them all and exits 0.

A worker that dies loses only its own streams: their clients reconnect to the xDS port
and the kernel gives them to the workers still listening. Restarts back off (doubling
from RESTART_MIN to RESTART_MAX while a worker keeps dying within STABLE_AFTER of its
start); a worker that exits with 2 (a usage error: its command line cannot serve) stops
the whole server, as does one that fails GIVE_UP_AFTER times in a row at its start.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

log = logging.getLogger("xds_server.workers")

WORKER_ENV = "XDS_SERVER_WORKER"
"""Set in each worker's environment: 'INDEX/COUNT/SUPERVISOR_PID'."""

RESTART_MIN = 0.1
RESTART_MAX = 5.0
STABLE_AFTER = 10.0
"""A worker that ran this long and died is restarted at once (RESTART_MIN)."""
GIVE_UP_AFTER = 5
STOP_GRACE = 10.0
"""How long the workers get to stop on SIGTERM before SIGKILL."""
USAGE_ERROR = 2


class Supervisor:
    def __init__(
        self,
        argv: Sequence[str],
        workers: int,
        on_death: Callable[[int], None] = lambda index: None,
        env_name: str = WORKER_ENV,
    ) -> None:
        """`argv`: the worker's command line after the interpreter (`-m xds_server.cli
        serve ...`); `on_death(index)`: told each time a worker dies (the board marks it
        gone, so the leader counts its nodes as unknown at once)."""
        self.argv = list(argv)
        self.count = workers
        self.on_death = on_death
        self.env_name = env_name
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self._stop = asyncio.Event()
        self.exit_code = 0

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._forward(signal.SIGHUP))
        log.info("serving with %d workers (supervisor pid %d)", self.count, os.getpid())
        keepers = [asyncio.create_task(self._keep(i)) for i in range(1, self.count + 1)]
        await self._stop.wait()
        log.info("stopping %d workers", len(self.procs))
        self._forward(signal.SIGTERM)
        try:
            async with asyncio.timeout(STOP_GRACE):
                await asyncio.gather(*(p.wait() for p in self.procs.values()))
        except TimeoutError:
            log.warning("workers still running after %.0fs: killing them", STOP_GRACE)
            self._forward(signal.SIGKILL)
        for k in keepers:
            k.cancel()
        await asyncio.gather(*keepers, return_exceptions=True)
        return self.exit_code

    def _forward(self, sig: int) -> None:
        for proc in self.procs.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)

    async def _start(self, index: int) -> asyncio.subprocess.Process:
        env = {**os.environ, self.env_name: f"{index}/{self.count}/{os.getpid()}"}
        proc = await asyncio.create_subprocess_exec(sys.executable, *self.argv, env=env)
        self.procs[index] = proc
        log.info("worker-%d started (pid %d)", index, proc.pid)
        return proc

    async def _keep(self, index: int) -> None:
        """Keep worker `index` running until the server stops."""
        backoff, failed = RESTART_MIN, 0
        while not self._stop.is_set():
            started = time.monotonic()
            proc = await self._start(index)
            code = await proc.wait()
            if self._stop.is_set():
                return
            self.on_death(index)
            ran = time.monotonic() - started
            failed = failed + 1 if ran < STABLE_AFTER else 0
            if code == USAGE_ERROR or failed >= GIVE_UP_AFTER:
                log.error(
                    "worker-%d (pid %d) exited with %d%s: stopping the server",
                    index,
                    proc.pid,
                    code,
                    "" if code == USAGE_ERROR else f", {failed} times in a row at its start",
                )
                self.exit_code = code or 1
                self._stop.set()
                return
            backoff = RESTART_MIN if not failed else min(RESTART_MAX, backoff * 2)
            log.warning(
                "worker-%d (pid %d) %s after %.1fs: restarting it in %.1fs",
                index,
                proc.pid,
                f"killed by signal {-code}" if code < 0 else f"exited with {code}",
                ran,
                backoff,
            )
            await asyncio.sleep(backoff)  # the restart's backoff


@dataclass(frozen=True)
class WorkerId:
    index: int
    count: int
    parent: int

    @property
    def name(self) -> str:
        return f"worker-{self.index}"


def worker_id() -> WorkerId | None:
    """This process's place among the workers (from the supervisor), or None."""
    raw = os.environ.get(WORKER_ENV, "")
    try:
        index, count, parent = (int(x) for x in raw.split("/"))
    except ValueError:
        return None
    return WorkerId(index, count, parent)


def bind_to_parent(me: WorkerId) -> None:
    """Die with the supervisor (SIGTERM when it goes, even by SIGKILL), and at once if
    it went already."""
    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != me.parent:
        raise SystemExit(f"{me.name}: its supervisor (pid {me.parent}) is gone")


def tag_log_lines(me: WorkerId) -> None:
    """Every log line names the worker (the workers share the supervisor's stderr)."""
    tag = f"[{me.name}]"

    def add_tag(record: logging.LogRecord) -> bool:
        if not record.name.endswith(tag):
            record.name = f"{record.name}{tag}"
        return True

    for handler in logging.getLogger().handlers:
        handler.addFilter(add_tag)


def supervise(argv: Sequence[str], workers: int, on_death: Callable[[int], None]) -> int:
    """Run `workers` workers of `xds-server {argv}` until SIGTERM or SIGINT; the exit code."""
    return asyncio.run(Supervisor(["-m", "xds_server.cli", *argv], workers, on_death).run())
