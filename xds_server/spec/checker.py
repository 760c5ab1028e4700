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


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class Checker:
    def __init__(self) -> None:
        self.problems: list[SpecProblem] = []

    def fail(self, path: str, message: str) -> None:
        self.problems.append(SpecProblem(path, message))

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
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            self.fail(path, f"expected a whole number >= {minimum}, got {value!r}")
            return None
        return value

    def boolean(self, value: Any, path: str) -> bool | None:
        if not isinstance(value, bool):
            self.fail(path, f"expected true or false, got {kind_of(value)}")
            return None
        return value

    def duration(self, value: Any, path: str, *, zero_ok: bool = False) -> float | None:
        seconds = parse_duration(value)
        if seconds is None or seconds < 0 or (seconds == 0 and not zero_ok):
            hint = DURATION_HINT + (" (or 0)" if zero_ok else "")
            self.fail(path, f"bad duration {value!r}: {hint}")
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
        n = parse_number(value)
        if (
            n is None
            or not math.isfinite(n)
            or n < low
            or (open_low and n == low)
            or (high is not None and (n > high or (open_high and n == high)))
        ):
            self.fail(path, f"expected {what}, got {value!r}")
            return None
        return n

    def choice(self, value: Any, path: str, choices: type[E]) -> E | None:
        """One of a StrEnum's values."""
        allowed = [str(c) for c in choices]  # type: ignore[attr-defined]
        if value not in allowed:
            self.fail(path, f"expected one of: {', '.join(allowed)}; got {value!r}")
            return None
        return choices(value)  # type: ignore[call-arg]
