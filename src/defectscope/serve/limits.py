"""Limits a station enforces while a request is still arriving (pure ASGI middlewares).

FastAPI checks nothing about a body's size: Starlette parses a whole multipart form
before a route runs, and a chunked body has no Content-Length to check. `BodyLimit`
counts the bytes as the server receives them and answers 413 the moment a body passes
its limit, so an oversized upload costs at most the limit, never the upload. `RateLimit`
answers 429 to a client that sends more requests than its allowance (the `limits`
library's moving window, kept per client address; behind a reverse proxy uvicorn takes
the address from X-Forwarded-For of a trusted proxy).
"""

from __future__ import annotations

import json
import time
from typing import Any

from limits import parse
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MB = 2**20


async def reply(send: Send, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    """A complete JSON response sent straight to the server, closing the connection."""
    body = json.dumps({"detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"connection", b"close")]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """413 for a body over ``max_raw`` bytes (one raw image) or ``max_multipart`` bytes (a
    multipart form of several images), decided while the body arrives."""

    def __init__(self, app: ASGIApp, *, max_raw: int, max_multipart: int) -> None:
        self.app, self.max_raw, self.max_multipart = app, max_raw, max_multipart

    def limit_for(self, headers: Headers) -> int:
        kind = headers.get("content-type", "").lower()
        return self.max_multipart if kind.startswith("multipart/") else self.max_raw

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        limit = self.limit_for(headers)
        too_big = f"The request body is over the station's limit of {limit / MB:.0f} MB; send fewer or smaller images."
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                await reply(send, 400, "Content-Length is not a number.")
                return
            if int(declared) > limit:
                await reply(send, 413, too_big)
                return
        received = 0
        refused = False
        started = False

        async def limited() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    refused = True
                    if not started:
                        await reply(send, 413, too_big)
                    return {"type": "http.disconnect"}
            return message

        async def guarded(message: Message) -> None:
            nonlocal started
            if refused:
                return  # the 413 has gone out; whatever the app says after the cut-off is dropped
            started = True
            await send(message)

        try:
            await self.app(scope, limited, guarded)
        except Exception:
            if not refused:
                raise  # the app's own failure, for the server's error handling
            # the app tripped over the body we cut off; the client already has its 413


class RateLimit:
    """429 (with Retry-After) for a client over ``rate`` (e.g. "200/second"); paths in
    ``exempt`` are never limited, paths in ``strict`` get the ``strict_rate`` instead."""

    def __init__(self, app: ASGIApp, *, rate: str, strict_rate: str, strict: tuple[str, ...], exempt: tuple[str, ...]) -> None:
        self.app, self.exempt, self.strict = app, exempt, strict
        self.item, self.strict_item = parse(rate), parse(strict_rate)
        self.limiter = MovingWindowRateLimiter(MemoryStorage())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.exempt:
            await self.app(scope, receive, send)
            return
        client: Any = scope.get("client") or ("unknown", 0)
        strict = scope["path"] in self.strict
        item = self.strict_item if strict else self.item
        key = (client[0], "strict" if strict else "all")
        if not self.limiter.hit(item, *key):
            retry = max(1, round(self.limiter.get_window_stats(item, *key).reset_time - time.time()))
            await reply(send, 429, f"Too many requests from {client[0]}: the station allows {item}.", {"retry-after": str(retry)})
            return
        await self.app(scope, receive, send)
