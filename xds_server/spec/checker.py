"""The one way the spec is validated: a `Checker` collects every problem (field path and
what is wrong) instead of stopping at the first, so a user fixes a spec in one pass and
a bad live edit is logged in full while the last good spec keeps being served.

Each reader reports its own problem and returns None (or the default it was given), so
parsers read like a list of fields.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any, TypeVar

from xds_server.spec.model import SpecProblem
from xds_server.spec.values import kind_of, parse_duration, parse_number

E = TypeVar("E")

DURATION_HINT = "expected a positive number of seconds or a string like 500ms, 30s, 5m"
MAX_DURATION = 365 * 24 * 3600.0
"""A year: longer than any step, hold, timeout or interval means, and small enough for
every place a duration goes (protobuf Durations, socket and thread timeouts)."""
MAX_WHOLE_NUMBER = 2**31 - 1
"""Counts and thresholds end up in protobuf uint32 fields and loop bounds."""


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def one_line(text: str) -> str:
    """`text` with its lines (every break `str.splitlines` knows) joined by a space: a
    problem is one line of output, whatever a YAML error message or a key holds."""
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def shown(value: Any) -> str:
    """repr(value), shortened in the middle past 60 characters (a 400-digit number)."""
    text = repr(value)
    if len(text) <= 60:
        return text
    unit = "digits" if isinstance(value, int) else "characters"
    return f"{text[:40]}...{text[-10:]} ({len(text)} {unit})"


class Checker:
    def __init__(self) -> None:
        self.problems: list[SpecProblem] = []

    def fail(self, path: str, message: str) -> None:
        self.problems.append(SpecProblem(one_line(path), one_line(message)))

    def mapping(self, value: Any, path: str, known: Collection[str]) -> dict[str, Any]:
        """The known fields of a mapping; a non-mapping and each unknown field are problems."""
        if not isinstance(value, dict):
            self.fail(path or "(top level)", f"expected a mapping, got {kind_of(value)}")
            return {}
        for key in value:
            if not isinstance(key, str) or key not in known:
                self.fail(
                    join(path, str(key)),
                    f"unknown field (expected one of: {', '.join(sorted(known))})",
                )
        return {k: v for k, v in value.items() if k in known}

    def whole_number(self, value: Any, path: str, minimum: int) -> int | None:
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or not minimum <= value <= MAX_WHOLE_NUMBER
        ):
            self.fail(
                path,
                f"expected a whole number from {minimum} to {MAX_WHOLE_NUMBER}, got {shown(value)}",
            )
            return None
        return value

    def boolean(self, value: Any, path: str) -> bool | None:
        if not isinstance(value, bool):
            self.fail(path, f"expected true or false, got {kind_of(value)}")
            return None
        return value

    def duration(self, value: Any, path: str, *, zero_ok: bool = False) -> float | None:
        seconds = parse_duration(value)  # (None for .nan, .inf and out-of-range numbers)
        if (
            seconds is None
            or seconds < 0
            or (seconds == 0 and not zero_ok)
            or seconds > MAX_DURATION
        ):
            hint = DURATION_HINT + (" (or 0)" if zero_ok else "") + ", at most 8760h (a year)"
            self.fail(path, f"bad duration {shown(value)}: {hint}")
            return None
        return seconds

    def number(
        self,
        value: Any,
        path: str,
        low: float,
        high: float | None,
        what: str,
        *,
        open_low: bool = False,
        open_high: bool = False,
    ) -> float | None:
        """A finite number (or 'N%') from `low` to `high`, each bound included unless it
        is open; `what` names the range for the message."""
        n = parse_number(value)  # (None for a non-finite or out-of-range number)
        if (
            n is None
            or not math.isfinite(n)
            or n < low
            or (open_low and n == low)
            or (high is not None and (n > high or (open_high and n == high)))
        ):
            self.fail(path, f"expected {what}, got {shown(value)}")
            return None
        return n

    def choice(self, value: Any, path: str, choices: type[E]) -> E | None:
        """One of a StrEnum's values."""
        allowed = [str(c) for c in choices]  # type: ignore[attr-defined]
        if value not in allowed:
            self.fail(path, f"expected one of: {', '.join(allowed)}; got {shown(value)}")
            return None
        return choices(value)  # type: ignore[call-arg]
