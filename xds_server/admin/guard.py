"""The guard in front of every method of the admin port (the admin API and CSDS).

grpc.aio logs a traceback for a request that does not decode and for a handler that
raises; behind `AdminGuard` each becomes one log line and a status (INVALID_ARGUMENT,
INTERNAL). It also asks for a credential for reads (`--admin-auth-reads`, implied off
loopback: the servicer checks changes itself) with the `read` verb in its scope, and
marks every status the server sends itself with `STATUS_MARK`, which is how `xdsctl`
tells "the server said no" from "nothing answered".
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import NoReturn, TypeVar, cast

import grpc

from xds_server.admin.auth import Credentials, Verb, method_verb
from xds_server.admin.operator import unauthenticated
from xds_server.admin.wire import STATUS_MARK

Ctx = grpc.aio.ServicerContext
Rq = TypeVar("Rq")
Rs = TypeVar("Rs")
log = logging.getLogger("xds_server.admin")


def invocation_metadata(context: Ctx[Rq, Rs]) -> dict[str, str | bytes]:
    """A call's headers, by key."""
    return dict(context.invocation_metadata() or ())


class _Undecodable:
    """A request that did not decode, passed to its handler's guard to refuse."""

    def __init__(self, size: int, error: Exception) -> None:
        self.size = size
        self.error = error


class AdminGuard(grpc.aio.ServerInterceptor):
    """In front of every method of the admin port (the admin API and CSDS).

    grpc.aio logs a traceback for a request that does not decode and for a handler that
    raises; here each becomes one log line and a status (INVALID_ARGUMENT, INTERNAL).
    With `auth_reads`, every method needs a credential (the servicer checks changes
    itself). Every status sent carries `STATUS_MARK`."""

    def __init__(self, auth: Credentials) -> None:
        self.auth = auth

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Rq, Rs] | None]
        ],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Rq, Rs] | None:
        handler = await continuation(details)
        if handler is None:  # no such method: UNIMPLEMENTED, as without the guard
            return None
        return _Guarded(self.auth, str(details.method)).wrap(handler)


GuardedCall = Callable[[object, Ctx[object, object]], object]
"""A method's behaviour as the guard wraps it, whatever its messages (a coroutine
function, or an async generator function for a server stream)."""


class _Guarded:
    """One call path's handler behind the guard."""

    def __init__(self, auth: Credentials, method: str) -> None:
        self.auth = auth
        self.method = method

    def wrap(self, handler: grpc.RpcMethodHandler[Rq, Rs]) -> grpc.RpcMethodHandler[Rq, Rs]:
        deserialize = handler.request_deserializer

        def lenient(raw: bytes) -> object:
            try:
                return deserialize(raw) if deserialize is not None else raw
            except Exception as exc:
                return _Undecodable(len(raw), exc)

        changes: dict[str, object] = {"request_deserializer": lenient}
        for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            behavior = getattr(handler, kind)
            if behavior is not None:
                streams_in, streams_out = kind.startswith("stream"), kind.endswith("stream")
                make = self._streaming if streams_out else self._unary
                changes[kind] = make(behavior, streams_in)
        # grpc makes its handlers as namedtuples (grpc._utilities); its stubs do not say so.
        replace = handler._replace  # type: ignore[attr-defined]
        return cast("grpc.RpcMethodHandler[Rq, Rs]", replace(**changes))

    def _unary(self, behavior: GuardedCall, streams_in: bool) -> GuardedCall:
        async def call(request: object, context: Ctx[object, object]) -> object:
            request = await self._admit(request, context, streams_in)
            try:
                return await cast("Awaitable[object]", behavior(request, context))
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await self._failed(context, exc)

        return call

    def _streaming(self, behavior: GuardedCall, streams_in: bool) -> GuardedCall:
        async def call(request: object, context: Ctx[object, object]) -> AsyncIterator[object]:
            request = await self._admit(request, context, streams_in)
            try:
                async for response in cast("AsyncIterator[object]", behavior(request, context)):
                    yield response
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await self._failed(context, exc)

        return call

    async def _admit(self, request: object, context: Ctx[Rq, Rs], streams_in: bool) -> object:
        context.set_trailing_metadata(((STATUS_MARK, "1"),))
        if self.auth.auth_reads:
            meta = invocation_metadata(context)
            name = self.auth.identify(meta)
            if name is None:
                refused = unauthenticated("reads as well as changes", meta)
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, refused.message)
            if method_verb(self.method) is Verb.READ:  # changes: the operator checks
                scope = self.auth.scope(name)
                if not scope.may(Verb.READ):
                    await context.abort(
                        grpc.StatusCode.PERMISSION_DENIED,
                        f"the token {name} may not read ({self.method}): its scope lacks "
                        f"verbs=read (it has {scope.describe()})",
                    )
        if streams_in:
            return self._each_decoded(cast("AsyncIterator[object]", request), context)
        return await self._decoded(request, context)

    async def _each_decoded(
        self, requests: AsyncIterator[object], context: Ctx[Rq, Rs]
    ) -> AsyncIterator[object]:
        async for request in requests:
            yield await self._decoded(request, context)

    async def _decoded(self, request: object, context: Ctx[Rq, Rs]) -> object:
        if isinstance(request, _Undecodable):
            error = " ".join(str(request.error).split())
            log.warning(
                "admin API %s from %s: undecodable request (%d bytes): %s",
                self.method,
                context.peer(),
                request.size,
                error,
            )
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the request to {self.method} does not decode: {error}",
            )
        return request

    async def _failed(self, context: Ctx[Rq, Rs], exc: Exception) -> NoReturn:
        """A handler raised: a bug. One line at error level; the traceback at debug."""
        frames = traceback.extract_tb(exc.__traceback__)
        where = f" ({Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
        message = " ".join(str(exc).split())
        log.error("admin API %s failed: %s: %s%s", self.method, type(exc).__name__, message, where)
        log.debug("admin API %s failed", self.method, exc_info=exc)
        await context.abort(
            grpc.StatusCode.INTERNAL,
            f"{self.method} failed: {type(exc).__name__} (the server's log has the details)",
        )
