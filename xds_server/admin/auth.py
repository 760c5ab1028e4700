"""Who may use the admin API and the dashboard, and what each may do: names, each with
a bearer token and a scope (`--admin-token-file`: one `NAME:TOKEN[:SCOPE]` per line, or
one bare token named "admin").

A scope (issue 30, least privilege) is `verbs=V1,V2;services=S1,PREFIX*`: the verbs a
token may use (`VERBS`) on the services named (a trailing `*` names a prefix). A line
without a scope, or a part left out, keeps full power, so token files written before
scopes read as they did.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, NamedTuple

BARE_TOKEN_NAME = "admin"
"""The name of the token in a token file that is one bare token (no `NAME:`)."""
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
_TOKEN_RE = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no spaces: a header value


_SERVICE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\*?|\*")
_SCOPE_RE = re.compile(r"(verbs|services)=")


class TokenFileError(ValueError):
    """A token file that cannot be used; the message names the file and the line."""


class Verb(StrEnum):
    """What a token may do. Every admin RPC and dashboard route is one of these (see
    `METHOD_VERBS`); a read is any method that changes nothing."""

    READ = "read"
    PAUSE = "pause"
    RESUME = "resume"
    ABORT = "abort"
    PROMOTE = "promote"
    SET_WEIGHTS = "set-weights"
    SPEC_PUSH = "spec-push"
    """Reserved: `xds-server spec push` writes etcd directly, not through the admin API,
    so etcd's own credentials guard it; accepted here so one file can say it all."""


VERBS = tuple(Verb)
METHOD_VERBS = {
    "PauseRollout": Verb.PAUSE,
    "ResumeRollout": Verb.RESUME,
    "AbortRollout": Verb.ABORT,
    "PromoteRollout": Verb.PROMOTE,
    "SetWeights": Verb.SET_WEIGHTS,
}
"""The admin API's changes, by method name; every other method is a read."""


def method_verb(method: str) -> Verb:
    """The verb of an admin port's method path (`/pkg.Service/Method`)."""
    return METHOD_VERBS.get(method.rpartition("/")[2], Verb.READ)


@dataclass(frozen=True)
class Scope:
    """What one token may do: `verbs` on `services` (names, or prefixes ending in `*`);
    None: every verb, every service."""

    verbs: frozenset[Verb] | None = None
    services: tuple[str, ...] | None = None

    @property
    def full(self) -> bool:
        return self.verbs is None and self.services is None

    def may(self, verb: Verb) -> bool:
        return self.verbs is None or verb in self.verbs

    def covers(self, service: str) -> bool:
        if self.services is None:
            return True
        return any(
            service.startswith(p[:-1]) if p.endswith("*") else service == p for p in self.services
        )

    def lacks(self, verb: Verb, services: Iterable[str] = ()) -> str:
        """The part of the scope `verb` on `services` needs and this one lacks, as the
        token file would write it ("verbs=promote", "services=ranker"); "": none."""
        if not self.may(verb):
            return f"verbs={verb}"
        outside = [s for s in services if not self.covers(s)]
        return f"services={','.join(outside)}" if outside else ""

    def describe(self) -> str:
        """As the token file writes it; "full" for no limits."""
        if self.full:
            return "full"
        parts = []
        if self.verbs is not None:
            parts.append("verbs=" + ",".join(v for v in VERBS if v in self.verbs))
        if self.services is not None:
            parts.append("services=" + ",".join(self.services))
        return ";".join(parts)


FULL = Scope()


class Grant(NamedTuple):
    """One line of the token file: the token and what it may do."""

    token: str
    scope: Scope


def parse_tokens(text: str, source: str) -> dict[str, str]:
    """{name: token} of a token file (`parse_grants` without the scopes)."""
    return {name: grant.token for name, grant in parse_grants(text, source).items()}


def parse_scopes(text: str, source: str) -> dict[str, Scope]:
    """{name: scope} of a token file."""
    return {name: grant.scope for name, grant in parse_grants(text, source).items()}


def parse_grants(text: str, source: str) -> dict[str, Grant]:
    """`NAME:TOKEN[:SCOPE]` lines -> {name: Grant}. A file of one line without a colon is
    a single bare token, named "admin" (full power). Never puts a token in an error
    message."""
    lines = text.splitlines()
    if not "".join(lines).strip():
        raise TokenFileError(f"{source}: the token file is empty")
    if len(lines) == 1 and ":" not in lines[0]:
        _check_token(lines[0].strip(), f"{source} line 1")
        return {BARE_TOKEN_NAME: Grant(lines[0].strip(), FULL)}
    grants: dict[str, Grant] = {}
    seen: dict[str, int] = {}  # token -> line
    for number, raw in enumerate(lines, 1):
        where = f"{source} line {number}"
        if not raw.strip():
            raise TokenFileError(f"{where}: empty line (every line is NAME:TOKEN[:SCOPE])")
        name, colon, token = (part.strip() for part in raw.partition(":"))
        token, scope = _split_scope(token, where)
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
        if name in grants:
            raise TokenFileError(f"{where}: the name {name!r} is already on an earlier line")
        if token in seen:
            raise TokenFileError(
                f"{where}: the same token as line {seen[token]} (each name needs its own)"
            )
        grants[name], seen[token] = Grant(token, scope), number
    return grants


def _split_scope(rest: str, where: str) -> tuple[str, Scope]:
    """TOKEN[:SCOPE] -> (token, scope). A token may hold colons itself: only a last
    part that starts `verbs=` or `services=` is a scope."""
    token, colon, tail = rest.rpartition(":")
    if not colon or not _SCOPE_RE.match(tail.strip()):
        return rest, FULL
    return token.strip(), parse_scope(tail.strip(), where)


def parse_scope(text: str, where: str) -> Scope:
    """`verbs=V,V;services=S,P*` (either part, in any order) -> Scope."""
    verbs: frozenset[Verb] | None = None
    services: tuple[str, ...] | None = None
    for part in text.split(";"):
        key, eq, value = (p.strip() for p in part.partition("="))
        items = [i.strip() for i in value.split(",") if i.strip()]
        if not eq or key not in ("verbs", "services") or not items:
            raise TokenFileError(
                f"{where}: scope part {part.strip()[:60]!r}: expected verbs=V1,V2 or "
                "services=NAME,PREFIX* (parts joined by ';')"
            )
        if (verbs if key == "verbs" else services) is not None:
            raise TokenFileError(f"{where}: scope: {key}= given twice")
        if key == "verbs":
            unknown = [v for v in items if v not in VERBS]
            if unknown:
                raise TokenFileError(
                    f"{where}: scope: unknown verb {unknown[0][:40]!r} (verbs: {', '.join(VERBS)})"
                )
            verbs = frozenset(Verb(v) for v in items)
        else:
            bad = [s for s in items if not _SERVICE_RE.fullmatch(s)]
            if bad:
                raise TokenFileError(
                    f"{where}: scope: {bad[0][:40]!r} is not a service name or a prefix "
                    "ending in '*'"
                )
            services = None if "*" in items else tuple(items)
    return Scope(verbs, services)


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

    def __init__(
        self,
        tokens: Mapping[str, str] | None = None,
        auth_reads: bool = False,
        scopes: Mapping[str, Scope] | None = None,
    ) -> None:
        if auth_reads and not tokens:
            raise ValueError("auth_reads needs tokens")
        self._digests = [(name, _digest(token)) for name, token in (tokens or {}).items()]
        self.auth_reads = auth_reads
        self.scopes = dict(scopes or {})
        """Name -> what its token may do; a name not here has full power."""

    def scope(self, name: str | None) -> Scope:
        """What the token of `name` may do (None, no token: nothing is limited here;
        whether a caller without a token may act at all is the caller's check)."""
        return self.scopes.get(name, FULL) if name is not None else FULL

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
        scoped = [n for n in self.names if not self.scope(n).full]
        limited = f"; scoped: {', '.join(scoped)}" if scoped else ""
        return f"tokens for {', '.join(self.names)} required for {needed}{limited}"
