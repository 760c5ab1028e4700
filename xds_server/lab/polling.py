"""One way to wait for something: poll a predicate until it holds, with a deadline.

The lab, the benchmarks and the tests all wait this way (never a bare sleep): for a
process to answer, a rollout to reach a phase, an Envoy to apply its routes.
`wait_for` polls from the caller's thread; `wait_for_async` polls on a running event
loop, between the turns of the tasks whose state the predicate reads. Both take the
same arguments in the same order, `(predicate, what, timeout=..., interval=...)`, and
fail the same way: TimeoutError naming `what`, the last value and the last error.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")

TIMEOUT = 15.0
"""Seconds a wait gives its predicate when the call does not say."""
INTERVAL = 0.05
"""Between two polls from a thread: a predicate there often runs a command or an HTTP call."""
LOOP_INTERVAL = 0.01
"""Between two polls on an event loop: the predicate reads memory; the tasks it watches
get the loop in between."""
SHOWN = 300
"""Characters of the last value a failure message shows."""


class _Attempts(Generic[T]):
    """One wait's bookkeeping, the same for both waits: the deadline, the last value and
    the last error the predicate raised."""

    def __init__(self, predicate: Callable[[], T | None], what: str, timeout: float) -> None:
        self.predicate = predicate
        self.what = what
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.last: object = None
        self.error: Exception | None = None

    def attempt(self) -> T | None:
        """The predicate's value when truthy; None to poll again; TimeoutError once the
        deadline has passed. A predicate that raises has not held yet (a server still
        starting refuses connections, a command fails until it answers): its error is
        kept for the message."""
        try:
            value = self.predicate()
        except Exception as exc:
            self.error = exc
        else:
            if value:
                return value
            self.last = value
        if time.monotonic() > self.deadline:
            raise TimeoutError(self.message())
        return None

    def message(self) -> str:
        shown = repr(self.last)
        if len(shown) > SHOWN:
            shown = shown[:SHOWN] + "..."
        error = f"; last error: {type(self.error).__name__}: {self.error}" if self.error else ""
        return (
            f"timed out after {self.timeout:g}s waiting for {self.what} "
            f"(last value: {shown}{error})"
        )


def wait_for(
    predicate: Callable[[], T | None],
    what: str,
    *,
    timeout: float = TIMEOUT,
    interval: float = INTERVAL,
) -> T:
    """Poll `predicate` until it returns something truthy, and return that."""
    attempts = _Attempts(predicate, what, timeout)
    while (value := attempts.attempt()) is None:
        time.sleep(interval)  # the poll period, bounded by the deadline
    return value


async def wait_for_async(
    predicate: Callable[[], T | None],
    what: str,
    *,
    timeout: float = TIMEOUT,
    interval: float = LOOP_INTERVAL,
) -> T:
    """`wait_for` on the running event loop: the loop's tasks run between polls."""
    attempts = _Attempts(predicate, what, timeout)
    while (value := attempts.attempt()) is None:
        await asyncio.sleep(interval)  # the poll period, bounded by the deadline
    return value
