"""Limits on what a client may hold: request head and body sizes, read deadlines, memory for bodies in flight.

Two layers, each doing what only it can:

- :class:`GuardedHttpToolsProtocol` (the HTTP protocol uvicorn runs): the request head — request line and
  headers — must arrive within ``timeout_header`` seconds of the connection opening (or of the first byte
  of the next request on a kept-alive connection), and must not exceed :data:`MAX_HEAD_BYTES`; otherwise
  408 or 431, and the connection is closed. No ASGI app exists yet at that point, so these answers are
  written by the protocol and do not show in the request metrics.
- :class:`BodyLimitMiddleware` (pure ASGI, around the app), in this order:

  1. a ``Content-Length`` above ``max_body_bytes`` is answered 413 at once, without reading the body;
  2. a body reserves its declared length (``max_body_bytes`` when chunked) from a budget of
     ``max_inflight_body_bytes`` shared by all requests until the request ends; past the budget, 503 with
     ``Retry-After`` at once, so slow or large uploads cannot grow the memory without bound;
  3. the whole body must arrive within ``timeout_body`` seconds of the request head, else 408;
  4. a body without a length (chunked) or one that lies about it is counted while it streams in and
     refused with 413 the moment it passes the limit.

  The 408 and 413 raised while the app reads are :class:`HTTPException` subclasses, so FastAPI's body
  readers pass them to the error handlers (one JSON sentence, counted in the metrics); if one still escapes
  to this middleware before a response has started, it answers itself. Every refusal closes the connection.
"""

from __future__ import annotations

import asyncio
import json
import logging
from asyncio import TimerHandle
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

log = logging.getLogger("service")

# Request line plus headers; large cookies or tokens are a few KiB. httptools itself has no limit.
MAX_HEAD_BYTES = 64 * 1024
RETRY_AFTER_S = 1
CLOSE = {"Connection": "close"}


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than the limit of {limit} bytes.", headers=CLOSE)


class BodyTimeout(HTTPException):
    def __init__(self, seconds: float):
        super().__init__(408, f"the request body did not arrive within {seconds:g} s (DISALIGN_TIMEOUT_BODY).", headers=CLOSE)


class BodyBudget:
    """Bytes reserved by the bodies of the requests in progress (one event loop: no lock needed)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.reserved = 0

    def try_reserve(self, size: int) -> bool:
        if self.reserved + size > self.limit:
            return False
        self.reserved += size
        return True

    def release(self, size: int) -> None:
        self.reserved -= size


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int, max_inflight_body_bytes: int, timeout_body: float):
        self.app = app
        self.limit = max_body_bytes
        self.budget = BodyBudget(max_inflight_body_bytes)
        self.timeout = timeout_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared, chunked = None, False
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await send_error(send, 400, "the Content-Length header is not a number.")
                    return
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        if declared is not None and declared > self.limit:
            await send_error(send, 413, BodyTooLarge(self.limit).detail)
            return
        if not declared and not chunked:  # no body to read: nothing to reserve or to wait for
            await self.app(scope, receive, send)
            return
        reserved = self.limit if declared is None else declared
        if not self.budget.try_reserve(reserved):
            await send_error(send, 503, "the server is receiving too many request bodies at once; retry shortly.",
                             {"retry-after": str(RETRY_AFTER_S)})
            return
        try:
            await self._guarded(scope, receive, send)
        finally:
            self.budget.release(reserved)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        received = 0
        body_complete = False
        started = False

        async def guarded_receive() -> Message:
            nonlocal received, body_complete
            if body_complete:  # after the body, receive only waits for a disconnect: no deadline
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise BodyTimeout(self.timeout) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
                body_complete = not message.get("more_body", False)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, guarded_receive, tracking_send)
        except (BodyTooLarge, BodyTimeout) as exc:
            if started:
                raise
            await send_error(send, exc.status_code, exc.detail)


async def send_error(send: Send, status: int, sentence: str, headers: dict[str, str] | None = None) -> None:
    """An error response of this middleware, outside the app: ``{"error": sentence}``, connection closed."""
    body = json.dumps({"error": sentence}).encode()
    extra = [(name.encode(), value.encode()) for name, value in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *extra]})
    await send({"type": "http.response.body", "body": body})


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline and a size limit on each request head (module docstring).

    uvicorn bounds only the idle time between requests (``timeout_keep_alive``): a connection that sends
    nothing, or a request line or headers byte by byte, would otherwise stay open for ever.
    Give it to uvicorn as ``http=functools.partial(GuardedHttpToolsProtocol, timeout_header=…)``.
    """

    def __init__(self, *args: Any, timeout_header: float, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.timeout_header = timeout_header
        self.in_head = False  # between the first byte of a request (or the connection) and its last header
        self.head_bytes = 0
        self.head_deadline: TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._end_head()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if not self.in_head:
            self._start_head()

    def on_headers_complete(self) -> None:
        self._end_head()
        super().on_headers_complete()

    def data_received(self, data: bytes) -> None:
        # Bytes of a chunk that starts inside a head and ends before it is complete are all head bytes;
        # a chunk in which a pipelined head begins is not counted (at most one read, 256 KiB, too few).
        counting = self.in_head
        super().data_received(data)
        if counting and self.in_head:
            self.head_bytes += len(data)
            if self.head_bytes > MAX_HEAD_BYTES:
                self._refuse(431, f"the request line and headers are larger than {MAX_HEAD_BYTES} bytes.")

    def on_response_complete(self) -> None:
        cycle = self.cycle
        super().on_response_complete()
        if cycle is not None and cycle.response_complete and cycle.more_body and not self.transport.is_closing():
            # Answered before its body was read (404, 415 …): the rest is never read; a client trickling it
            # in would otherwise hold the connection, since every byte re-arms uvicorn's keep-alive timer.
            self.transport.close()

    def _start_head(self) -> None:
        self.in_head, self.head_bytes = True, 0
        self.head_deadline = self.loop.call_later(self.timeout_header, self._head_timed_out)

    def _end_head(self) -> None:
        self.in_head = False
        if self.head_deadline is not None:
            self.head_deadline.cancel()
            self.head_deadline = None

    def _head_timed_out(self) -> None:
        self.head_deadline = None
        self._refuse(408, f"the request line and headers did not arrive within {self.timeout_header:g} s (DISALIGN_TIMEOUT_HEADER).")

    def _refuse(self, status: int, sentence: str) -> None:
        self._end_head()
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # The previous request is still being answered on this connection: close once its response is out.
            self.cycle.keep_alive = False
            self.flow.pause_reading()
            return
        log.debug("refusing a request head from %s with %d: %s", self.client, status, sentence)
        body = json.dumps({"error": sentence}).encode()
        self.transport.write(b"".join([STATUS_LINE[status], b"content-type: application/json\r\n",
                                       b"content-length: %d\r\n" % len(body), b"connection: close\r\n\r\n", body]))
        self.transport.close()
