"""Who may use the admin API and the dashboard: names, each with a bearer token
(`--admin-token-file`: one `NAME:TOKEN` per line, or one bare token named "admin")."""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping
from typing import Any

BARE_TOKEN_NAME = "admin"
"""The name of the token in a token file that is one bare token (no `NAME:`)."""
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
_TOKEN_RE = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no spaces: a header value


class TokenFileError(ValueError):
    """A token file that cannot be used; the message names the file and the line."""


def parse_tokens(text: str, source: str) -> dict[str, str]:
    """`NAME:TOKEN` lines -> {name: token}. A file of one line without a colon is a single
    bare token, named "admin". Never puts a token in an error message."""
    lines = text.splitlines()
    if not "".join(lines).strip():
        raise TokenFileError(f"{source}: the token file is empty")
    if len(lines) == 1 and ":" not in lines[0]:
        _check_token(lines[0].strip(), f"{source} line 1")
        return {BARE_TOKEN_NAME: lines[0].strip()}
    tokens: dict[str, str] = {}
    seen: dict[str, int] = {}  # token -> line
    for number, raw in enumerate(lines, 1):
        where = f"{source} line {number}"
        if not raw.strip():
            raise TokenFileError(f"{where}: empty line (every line is NAME:TOKEN)")
        name, colon, token = (part.strip() for part in raw.partition(":"))
        if not colon:
            raise TokenFileError(
                f"{where}: expected NAME:TOKEN (a bare token is only allowed as the "
                "file's single line)"
            )
        if not _NAME_RE.fullmatch(name):
            raise TokenFileError(
                f"{where}: the name before ':' must be 1-64 letters, digits, '.', '_', "
                "'@' or '-', starting with a letter or digit"
            )
        _check_token(token, where)
        if name in tokens:
            raise TokenFileError(f"{where}: the name {name!r} is already on an earlier line")
        if token in seen:
            raise TokenFileError(
                f"{where}: the same token as line {seen[token]} (each name needs its own)"
            )
        tokens[name], seen[token] = token, number
    return tokens


def _check_token(token: str, where: str) -> None:
    if not token:
        raise TokenFileError(f"{where}: the token is empty")
    if not _TOKEN_RE.fullmatch(token):
        raise TokenFileError(
            f"{where}: the token must be printable ASCII without spaces (it is sent as "
            "a gRPC header)"
        )


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class Credentials:
    """Who may use the admin API: names, each with a bearer token. A token is found by
    comparing digests in constant time, against every name (no early exit)."""

    def __init__(self, tokens: Mapping[str, str] | None = None, auth_reads: bool = False) -> None:
        if auth_reads and not tokens:
            raise ValueError("auth_reads needs tokens")
        self._digests = [(name, _digest(token)) for name, token in (tokens or {}).items()]
        self.auth_reads = auth_reads

    @property
    def configured(self) -> bool:
        return bool(self._digests)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self._digests]

    def identify(self, metadata: Mapping[str, Any]) -> str | None:
        """The name whose token `authorization: Bearer TOKEN` carries, or None."""
        scheme, _, token = str(metadata.get("authorization", "")).strip().partition(" ")
        given = _digest(token.strip() if scheme.lower() == "bearer" else "")
        found = None
        for name, digest in self._digests:
            if hmac.compare_digest(digest, given) and found is None:
                found = name
        return found

    def describe(self) -> str:
        if not self.configured:
            return "no tokens configured: changes are unauthenticated, reads open"
        needed = "changes and reads" if self.auth_reads else "changes (reads open)"
        return f"tokens for {', '.join(self.names)} required for {needed}"
