"""etcd over TLS and with a user (issue 30): what this process proves to etcd, and how
each of its clients carries it.

`--store etcds://...` dials each member over TLS (`--store-ca`: the CA that signed the
members' certificates; without it, the system's trusted roots), presents a client
certificate (`--store-cert`, `--store-key`) when given, and logs in as the user of
`--store-credentials FILE` (one line `user:password`; never a flag, so never in `ps`).

Why each TLS channel dials one member: a member's certificate names that member, and a
gRPC channel checks every address it dials against one name. So a TLS channel dials the
first member of the process's order (`Members`) under the host name written in
`--store`, and the failover of `ha/etcd.py` moves it on, as it does on plaintext.

etcd's token: `Authenticate` returns one; every call carries it as the `token`
metadata. etcd forgets a token (a simple token unused for `--auth-token-ttl`, 300 s by
default, on the member asked; a restarted member; an expired JWT) and then answers
"invalid auth token": the client logs in again and repeats the call once. The async
client does it in a channel interceptor (`TokenInterceptor`: every call, the ones that
use aetcd's stubs directly too); the blocking commit channel in `SyncAuth`. A watch
created under a token etcd no longer knows is cancelled ("permission denied") rather
than failed, which aetcd would take for a live watch that never delivers: the
interceptor turns it into an error, so the store's watch loop watches again.

`diagnose` is the command line's check before anything starts: one line naming the
flag or file at fault (a wrong password, a certificate etcd does not accept, a CA that
did not sign the member's), rather than a gRPC status several lines long.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import ssl
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from aetcd import rpc

log = logging.getLogger("xds_server.ha.security")

AUTHENTICATE = b"/etcdserverpb.Auth/Authenticate"
WATCH = b"/etcdserverpb.Watch/Watch"
AUTH_TIMEOUT = 5.0
"""The longest a login may take (a raft write and a bcrypt check on the member)."""
STALE_TOKEN = ("invalid auth token", "revision of auth store is old")
"""etcd's words for a token it no longer accepts: log in again (as etcd's own client does)."""
AUTH_OFF = "authentication is not enabled"
CLIENT_CERT_REFUSED = (
    "TSI_DATA_CORRUPTED",
    "BAD_CERTIFICATE",
    "CERTIFICATE_REQUIRED",
    "UNKNOWN_CA",
)
"""How gRPC reports a member that ended TLS over the client certificate (TLS 1.3 checks
it after the handshake, so it shows as a broken record, not a failed handshake)."""


class StoreSecurityError(ValueError):
    """A store flag or file that cannot be used; the message names it, in one line."""


class StoreAccessError(Exception):
    """etcd refused this process (TLS, the user, a permission); one line that says why
    and which flag to look at."""


@dataclass(frozen=True)
class Login:
    """The etcd user of `--store-credentials FILE`."""

    user: str
    password: str = field(repr=False)
    source: str = ""
    """Where it was read (`--store-credentials FILE`), to name it in errors."""


@dataclass(frozen=True)
class StoreSecurity:
    """How this process reaches etcd: TLS (`etcds://`) with its CA and client
    certificate, and a login. The default is plaintext without a user."""

    tls: bool = False
    ca: bytes | None = field(default=None, repr=False)
    """PEM roots for the members' certificates; None: the system's trusted roots."""
    cert: bytes | None = field(default=None, repr=False)
    key: bytes | None = field(default=None, repr=False)
    login: Login | None = None
    files: dict[str, str] = field(default_factory=dict, compare=False)
    """flag -> file, to name them in errors."""

    @property
    def plain(self) -> bool:
        return not self.tls and self.login is None

    @property
    def identity(self) -> bool:
        """Does this process prove who it is (a client certificate or a login)?"""
        return self.cert is not None or self.login is not None

    def describe_user(self) -> str:
        if self.login is not None:
            return f"user {self.login.user!r} ({self.login.source})"
        if self.cert is not None:
            return f"the user named by the CN of --store-cert {self.files.get('--store-cert')}"
        return "no user"

    def sync_channel(self, target: str, name: str) -> grpc.Channel:
        if not self.tls:
            return grpc.insecure_channel(target)
        return grpc.secure_channel(target, self._credentials(), _name_options(name))

    def aio_channel(
        self, target: str, name: str, options: list[tuple[str, Any]], interceptors: list[Any]
    ) -> grpc.aio.Channel:
        if not self.tls:
            return grpc.aio.insecure_channel(target, options, interceptors=interceptors)
        options = [*options, *_name_options(name)]
        return grpc.aio.secure_channel(
            target, self._credentials(), options, interceptors=interceptors
        )

    def _credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.ca, self.key, self.cert)


def _name_options(name: str) -> list[tuple[str, Any]]:
    """The member's certificate must name the host as `--store` wrote it."""
    return [("grpc.ssl_target_name_override", name), ("grpc.default_authority", name)]


def load_security(
    tls: bool,
    ca: str | None = None,
    cert: str | None = None,
    key: str | None = None,
    credentials: str | None = None,
) -> StoreSecurity:
    """The store flags' files, read and checked now (a cert and key that do not match, a
    CA that is no certificate, a credentials file without `user:password`):
    StoreSecurityError, one line naming the flag and the file."""
    if not tls and (ca or cert or key):
        given = ", ".join(f for f, v in (("--store-ca", ca), ("--store-cert", cert),
                                          ("--store-key", key)) if v)  # fmt: skip
        raise StoreSecurityError(
            f"{given}: TLS flags, but --store etcd://... is plaintext: use etcds://"
        )
    if bool(cert) != bool(key):
        raise StoreSecurityError("--store-cert and --store-key go together")
    files = {f: v for f, v in (("--store-ca", ca), ("--store-cert", cert), ("--store-key", key),
                                ("--store-credentials", credentials)) if v}  # fmt: skip
    ca_pem = _read("--store-ca", ca) if ca else None
    if ca:
        _check_ca(ca)
    cert_pem = _read("--store-cert", cert) if cert else None
    key_pem = _read("--store-key", key) if key else None
    if cert and key:
        _check_pair(cert, key)
    login = read_login(credentials) if credentials else None
    return StoreSecurity(tls, ca_pem, cert_pem, key_pem, login, files)


def _read(flag: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise StoreSecurityError(f"{flag} {path}: cannot read it ({exc.strerror})") from None


def _check_ca(path: str) -> None:
    try:
        ssl.create_default_context(cafile=path)
    except (ssl.SSLError, ValueError) as exc:
        raise StoreSecurityError(
            f"--store-ca {path}: not a PEM certificate ({_ssl_reason(exc)})"
        ) from None


def _check_pair(cert: str, key: str) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        reason = _ssl_reason(exc)
        what = (
            "the key is not the certificate's"
            if "MISMATCH" in reason
            else "not a PEM certificate and its private key"
        )
        raise StoreSecurityError(
            f"--store-cert {cert}, --store-key {key}: {what} ({reason})"
        ) from None


def _ssl_reason(exc: Exception) -> str:
    reason = getattr(exc, "reason", None)
    return str(reason) if reason else " ".join(str(exc).split())[:120]


def read_login(path: str) -> Login:
    """`--store-credentials FILE`: one line `user:password` (the password may hold ':')."""
    flag = f"--store-credentials {path}"
    raw = _read("--store-credentials", path)
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise StoreSecurityError(f"{flag}: not UTF-8 text") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) != 1 or ":" not in lines[0]:
        raise StoreSecurityError(f"{flag}: expected one line user:password")
    user, _, password = lines[0].partition(":")
    if not user or not password:
        raise StoreSecurityError(f"{flag}: expected one line user:password, both not empty")
    with contextlib.suppress(OSError):
        if os.stat(path).st_mode & 0o077:
            log.warning("%s: readable by others than its owner (chmod 600 it)", flag)
    return Login(user, password, flag)


# ---- the token ----


def stale_token(code: grpc.StatusCode | None, details: str | None) -> bool:
    """Is this etcd's answer to a token it no longer accepts?"""
    if code not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INVALID_ARGUMENT):
        return False
    return any(s in (details or "") for s in STALE_TOKEN)


def is_stale(exc: BaseException) -> bool:
    """The same, of an error: a gRPC one, or aetcd's (which keeps etcd's words)."""
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        return stale_token(exc.code(), exc.details() if hasattr(exc, "details") else "")
    return any(s in str(exc) for s in STALE_TOKEN)


def _with_token(metadata: Any, token: str) -> grpc.aio.Metadata:
    pairs = [(k, v) for k, v in (metadata or ()) if k != "token"]
    return grpc.aio.Metadata(*pairs, ("token", token))


class Token:
    """The token of one login, shared by every channel of a process's store address
    (`EtcdAddress.token`): etcd 3.4 gives every member the token a login got (the login
    is a raft write), so a process logs in once, not once per channel or member (each
    login costs etcd a raft write and a bcrypt check, tens of ms of its CPU), and again
    only when a member says it does not know the token."""

    def __init__(self, login: Login | None) -> None:
        self.login = login
        self.value: str | None = None if login else ""
        """None: log in first; "": no login (or etcd has auth off)."""
        self.logins = 0
        self._lock = threading.Lock()

    def set(self, value: str) -> None:
        with self._lock:
            self.value = value
            self.logins += 1

    def forget(self, token: str) -> None:
        """etcd does not know `token` (unless another login replaced it already)."""
        with self._lock:
            if self.value == token and self.login is not None:
                self.value = None


class TokenInterceptor(grpc.aio.UnaryUnaryClientInterceptor):
    """Every call of one aio channel carries the login's token; a unary call etcd
    answers "invalid auth token" logs in again and is made once more. `bind` the
    channel once it exists (the login goes over it, to the member it dials). The
    channel takes `interceptors()`: grpc.aio files an interceptor under one kind of
    call only, so the streams (the watch, lease renewals) have their own, sharing this
    one's token."""

    def __init__(self, token: Token) -> None:
        assert token.login is not None
        self.login = token.login
        self.token = token
        self._channel: grpc.aio.Channel | None = None
        self._lock = asyncio.Lock()

    def bind(self, channel: grpc.aio.Channel) -> None:
        self._channel = channel

    def interceptors(self) -> list[Any]:
        return [self, _StreamTokens(self)]

    async def current(self) -> str:
        """The token, logging in first when there is none ("" when etcd has auth off)."""
        async with self._lock:
            if self.token.value is None:
                assert self._channel is not None
                request = rpc.AuthenticateRequest(
                    name=self.login.user, password=self.login.password
                )
                try:
                    reply = await rpc.AuthStub(self._channel).Authenticate(
                        request, timeout=AUTH_TIMEOUT
                    )
                    self.token.set(str(reply.token))
                except grpc.aio.AioRpcError as exc:
                    if AUTH_OFF not in (exc.details() or ""):
                        raise
                    self.token.set("")
            return self.token.value or ""

    def forget(self, token: str) -> None:
        self.token.forget(token)

    async def intercept_unary_unary(
        self, continuation: Callable[..., Awaitable[Any]], details: Any, request: Any
    ) -> Any:
        if details.method == AUTHENTICATE:
            return await continuation(details, request)
        for attempt in (1, 2):
            token = await self.current()
            call = await continuation(self._details(details, token), request)
            if attempt == 1 and token and stale_token(await call.code(), await call.details()):
                log.info("etcd forgot this process's token: logging in again")
                self.forget(token)
                continue
            return call
        raise AssertionError("unreachable")

    @staticmethod
    def _details(details: Any, token: str) -> Any:
        if not token:
            return details
        return grpc.aio.ClientCallDetails(
            details.method,
            details.timeout,
            _with_token(details.metadata, token),
            details.credentials,
            details.wait_for_ready,
        )


class _StreamTokens(grpc.aio.StreamStreamClientInterceptor):
    """The token on a channel's streams (`TokenInterceptor.interceptors`)."""

    def __init__(self, tokens: TokenInterceptor) -> None:
        self.tokens = tokens

    async def intercept_stream_stream(
        self, continuation: Callable[..., Awaitable[Any]], details: Any, requests: Any
    ) -> Any:
        token = await self.tokens.current()
        call = await continuation(TokenInterceptor._details(details, token), requests)
        return self._watch(call, token) if details.method == WATCH else call

    async def _watch(self, call: Any, token: str) -> AsyncIterator[Any]:
        """The watch stream's responses; a watch cancelled for its token or permission
        ("...: etcdserver: invalid auth token") ends the stream with an error, and the
        token is logged in afresh."""
        async for response in call:
            reason = response.cancel_reason
            if response.canceled and any(s in reason for s in (*STALE_TOKEN, "permission")):
                self.tokens.forget(token)
                call.cancel()
                raise grpc.aio.AioRpcError(
                    grpc.StatusCode.PERMISSION_DENIED,
                    grpc.aio.Metadata(),
                    grpc.aio.Metadata(),
                    details=f"watch cancelled: {response.cancel_reason}",
                )
            yield response


class SyncAuth:
    """The login of one blocking channel: the (shared) token as call metadata, got on
    first use and again when etcd says it forgot it (`call`). A login may take
    AUTH_TIMEOUT, longer than a commit's deadline: it is rare (the async client of the
    same address has usually logged in already, and its probe keeps the token in use)."""

    def __init__(self, channel: grpc.Channel, token: Token) -> None:
        self.channel = channel
        self.token = token

    def metadata(self) -> tuple[tuple[str, str], ...]:
        if self.token.value is None:
            login = self.token.login
            assert login is not None
            request = rpc.AuthenticateRequest(name=login.user, password=login.password)
            try:
                reply = rpc.AuthStub(self.channel).Authenticate(request, timeout=AUTH_TIMEOUT)
                self.token.set(str(reply.token))
            except grpc.RpcError as exc:
                if AUTH_OFF not in str(exc.details() if hasattr(exc, "details") else exc):
                    raise
                self.token.set("")
        token = self.token.value
        return (("token", token),) if token else ()

    def call(self, method: Callable[..., Any], request: Any, timeout: float) -> Any:
        """`method(request)` with the token; once more after a new login when etcd
        answers that it does not know the token."""
        for attempt in (1, 2):
            metadata = self.metadata()
            try:
                return method(request, timeout=timeout, metadata=metadata)
            except grpc.RpcError as exc:
                if attempt == 2 or not metadata or not is_stale(exc):
                    raise
                log.info("etcd forgot this process's token: logging in again")
                self.token.forget(metadata[0][1])
        raise AssertionError("unreachable")


# ---- the check before anything starts ----


@contextlib.contextmanager
def quiet_grpc_core() -> Iterator[None]:
    """gRPC's C core prints a failed TLS handshake to stderr itself, several lines;
    while `diagnose` tries the members, its one line is all the user should read."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def probe_member(
    security: StoreSecurity, member: str, name: str, key: bytes, prefix: str, timeout: float
) -> tuple[str, bool] | None:
    """Read `key` from one member as this process (logging in first): None when it
    answers; why it could not be reached (`unreachable`: the next member may answer);
    StoreAccessError
    when etcd refused this process, which no other member would accept either."""
    channel = security.sync_channel(member, name)
    try:
        auth = SyncAuth(channel, Token(security.login))
        request = rpc.RangeRequest(key=key, count_only=True, serializable=True)
        auth.call(rpc.KVStub(channel).Range, request, timeout)
        if security.login is not None and auth.token.value == "":
            raise StoreAccessError(
                f"{security.login.source}: etcd at {member} has authentication off, so a "
                "user protects nothing: enable it (etcdctl auth enable) or leave the flag out"
            )
        return None
    except grpc.RpcError as exc:
        code = exc.code() if hasattr(exc, "code") else None
        details = " ".join(str(exc.details() if hasattr(exc, "details") else exc).split())
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return unreachable(security, member, name, code, details)
        raise StoreAccessError(refused(security, member, prefix, details)) from None
    finally:
        channel.close()


def refused(security: StoreSecurity, member: str, prefix: str, details: str) -> str:
    """etcd's refusal of a reachable member, as what to do about it."""
    words = details.removeprefix("etcdserver: ")
    if "authentication failed" in details and security.login is not None:
        return (
            f"{security.login.source}: etcd at {member} refused user "
            f"{security.login.user!r}: wrong user name or password"
        )
    if "user name is empty" in details:
        return (
            f"etcd at {member} requires a user: give --store-credentials FILE (user:password) "
            "or a client certificate (--store-cert) whose CN is an etcd user"
        )
    if "permission denied" in details:
        return (
            f"etcd at {member}: {security.describe_user()} may not read {prefix}/: grant its "
            "role readwrite on the prefix"
        )
    return f"etcd at {member} refused {security.describe_user()}: {words}"


def unreachable(
    security: StoreSecurity, member: str, name: str, code: grpc.StatusCode, details: str
) -> tuple[str, bool]:
    """Why a member could not be used, and whether the reason is known (a TLS mismatch,
    with the flag that would fix it) rather than a member that is down or silent."""
    known = _tls_mismatch(security, member, name, details)
    if known is not None:
        return known, True
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"etcd at {member} did not answer in time", False
    return f"etcd at {member}: {_tail(details)}", False


def _tls_mismatch(security: StoreSecurity, member: str, name: str, details: str) -> str | None:
    ca = security.files.get("--store-ca")
    cert = security.files.get("--store-cert")
    if "CERTIFICATE_VERIFY_FAILED" in details:
        signer = f"the CA of --store-ca {ca}" if ca else "a CA this machine trusts"
        fix = "" if ca else ": give --store-ca"
        return f"etcd at {member}: its TLS certificate is not signed by {signer}{fix}"
    if "Hostname Verification" in details:
        return (
            f"etcd at {member}: its TLS certificate does not name {name!r}, the host --store "
            "gives (use a name or address the certificate lists)"
        )
    if security.tls and any(s in details for s in CLIENT_CERT_REFUSED):
        if cert is None:
            return (
                f"etcd at {member} asks for a client certificate: give --store-cert and --store-key"
            )
        return f"etcd at {member} refused --store-cert {cert} (signed by a CA it does not trust?)"
    if security.tls and ("WRONG_VERSION_NUMBER" in details or "handshake" in details.lower()):
        return f"etcd at {member} does not answer TLS ({_tail(details)}): plaintext? use etcd://"
    if not security.tls and "Socket closed" in details:
        return f"etcd at {member} closed a plaintext connection: if it serves TLS, use etcds://"
    return None


def _tail(details: str) -> str:
    """gRPC's reason without its preamble ("failed to connect to all addresses; last
    error: UNKNOWN: ipv4:HOST:PORT: ...")."""
    reason = details.rpartition("last error: ")[2]
    return re.sub(r"^[A-Z_]+: (ipv[46]:)?[^ ]+: ", "", reason)[:200]
