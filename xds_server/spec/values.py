"""Small value syntaxes the spec and the command lines share: durations, percentages,
HOST:PORT, IP addresses, Kubernetes names. Each parser returns None (or raises
ValueError with a message) instead of guessing."""

from __future__ import annotations

import ipaddress
import math
import re
from typing import Any

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)?$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
"""A region, service or namespace name: a DNS label."""
_LABEL_NAME_RE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")


def parse_duration(value: Any) -> float | None:
    """Seconds from a number or a string like 500ms, 30s, 5m, 1h; None if it is neither
    or is not finite (.nan, .inf, or too large for a float)."""
    if isinstance(value, bool):
        return None
    seconds: float | None = None
    if isinstance(value, int | float):
        seconds = _float(value)
    elif isinstance(value, str):
        m = _DURATION.match(value.strip())
        if m:
            seconds = float(m.group(1)) * _UNITS[m.group(2)]
    return seconds if seconds is not None and math.isfinite(seconds) else None


def parse_number(value: Any) -> float | None:
    """A finite number, or a percentage string like '5%' (as a fraction); None if it is
    neither (an integer too large for a float is not a number here)."""
    if isinstance(value, bool):
        return None
    n: float | None = None
    if isinstance(value, int | float):
        n = _float(value)
    elif isinstance(value, str) and value.strip().endswith("%"):
        try:
            n = float(value.strip()[:-1]) / 100
        except ValueError:
            return None
    return n if n is not None and math.isfinite(n) else None


def _float(value: int | float) -> float | None:
    """float(value), or None for an integer beyond a float's range (float() raises
    OverflowError there, where YAML's own 1e400 is inf)."""
    try:
        return float(value)
    except OverflowError:
        return None


def parse_host_port(text: str, *, port_from: int = 0) -> tuple[str, int]:
    """`HOST:PORT` or `[IPv6]:PORT` -> (host, port); ValueError saying what is wrong
    (callers put the text itself in front)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError("expected 'HOST:PORT'")
    if not port_from <= int(port) <= 65535:
        raise ValueError(f"port must be from {port_from} to 65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def is_ip(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def is_dns_subdomain(value: str) -> bool:
    return 0 < len(value) <= 253 and all(NAME_RE.match(p) for p in value.split("."))


def is_label_key(value: str) -> bool:
    """A Kubernetes label key: NAME or PREFIX/NAME, PREFIX a DNS subdomain."""
    prefix, slash, name = value.rpartition("/")
    return bool(_LABEL_NAME_RE.match(name)) and (not slash or is_dns_subdomain(prefix))


def is_label_value(value: str) -> bool:
    return value == "" or bool(_LABEL_NAME_RE.match(value))


def kind_of(value: Any) -> str:
    """How a YAML value reads to a person: 'a mapping', 'a list', 'nothing'."""
    if value is None:
        return "nothing"
    return {
        dict: "a mapping",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
    }.get(type(value), type(value).__name__)
