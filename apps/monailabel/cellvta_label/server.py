"""What the launcher (``python apps/monailabel``) adds around MONAI Label's FastAPI app: browser origins limited
to the server's own, a token for the downloads that expose the model and the datastore, query ids checked
before any endpoint sees them, clear 4xx answers for malformed request bodies, and slow requests (inference,
active learning, uploads) served off the event loop so that the others keep answering."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from urllib.parse import parse_qs

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from .guards import MAX_NAME

logger = logging.getLogger(__name__)

Scope = dict
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]

# endpoints that hand out the served weights, the whole datastore or the server's log
PROTECTED_PREFIXES = ("/model", "/datastore/dataset", "/logs")
# endpoints whose work can take seconds to minutes
SLOW_PREFIXES = ("/infer", "/activelearning", "/datastore", "/scoring", "/batch")
ID_PARAMETERS = ("image", "id", "label", "tag")


def load_token(path: Path) -> str:
    """The download token stored in ``path``, created (random, readable by the owner only) when absent.

    Needs the bundle's ``scripts`` on ``sys.path`` (:func:`.bundle.use_bundle_scripts`) to create it.
    """
    from scripts.files import atomic_path

    if path.is_file():
        token = path.read_text().strip()
        if token:
            return token
    token = secrets.token_urlsafe(32)
    with atomic_path(path) as tmp:
        tmp.touch(mode=0o600)
        tmp.write_text(token + "\n")
    return token


def accept_token_algorithms(algorithms: Sequence[str]) -> None:
    """Make MONAI Label's token check work: its ``from_token`` calls ``jwt.decode(token, key, options=...)``
    without ``algorithms``, which PyJWT 2 (the version MONAI Label 0.8.5 requires) refuses, so every token
    would be rejected. Its auth module gets a ``jwt`` whose ``decode`` accepts only ``algorithms``."""
    import jwt
    from monailabel.endpoints.user import auth

    class _Jwt:
        @staticmethod
        def decode(token: str, key: str, **kwargs):
            return jwt.decode(token, key, algorithms=list(algorithms), **kwargs)

    auth.jwt = _Jwt


def _bad_id(value: str) -> bool:
    return (not value or len(value) > MAX_NAME or value.startswith(".") or any(c in value for c in "/\\\0"))


class RequestGuard:
    """ASGI middleware: ids in the query must be plain names of the datastore (else 400), and the protected
    downloads need ``Authorization: Bearer <token>`` (else 401), unless MONAI Label's own authentication is on.

    Args:
        app: the wrapped application. token: the download token, or None when MONAI Label authenticates.
    """

    def __init__(self, app, token: str | None) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        for key in ID_PARAMETERS:
            for value in query.get(key, []):
                if value and _bad_id(value):
                    return await _answer(scope, receive, send, 400,
                                         f"{key} {value!r}: not an id of the datastore (a plain name: no folders, "
                                         "no leading dot)")
        if self.token is not None and scope["path"].startswith(PROTECTED_PREFIXES):
            headers = dict(scope.get("headers") or [])
            given = headers.get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
                return await _answer(scope, receive, send, 401,
                                     "this download needs the server's token: Authorization: Bearer <token> "
                                     "(the token file named at start-up)", {"WWW-Authenticate": "Bearer"})
        return await self.app(scope, receive, send)


class OffLoop:
    """ASGI middleware: requests to ``prefixes`` run in a worker thread with their own event loop (MONAI Label's
    endpoints are ``async`` but compute synchronously, which would stall every other request)."""

    def __init__(self, app, prefixes: Sequence[str] = SLOW_PREFIXES) -> None:
        self.app = app
        self.prefixes = tuple(prefixes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.prefixes):
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()

        async def thread_receive() -> dict:
            return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(receive(), loop))

        async def thread_send(message: dict) -> None:
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(send(message), loop))

        await anyio.to_thread.run_sync(lambda: asyncio.run(self.app(scope, thread_receive, thread_send)))


async def _answer(scope: Scope, receive: Receive, send: Send, status: int, detail: str,
                  headers: dict[str, str] | None = None) -> None:
    await JSONResponse({"detail": detail}, status_code=status, headers=headers)(scope, receive, send)


async def _malformed_json(request: Request, err: json.JSONDecodeError) -> JSONResponse:
    return JSONResponse({"detail": f"malformed JSON in the request: {err.msg} at position {err.pos}"},
                        status_code=400)


async def _invalid_fields(request: Request, err: Exception) -> JSONResponse:
    errors = getattr(err, "errors", lambda: [])()
    details = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in errors) or str(err)
    return JSONResponse({"detail": f"invalid request fields: {details}"}, status_code=400)


def secure(app: FastAPI, token: str | None) -> FastAPI:
    """Add the request guard, the off-loop execution and the 400 answers for malformed bodies to ``app``."""
    from pydantic import ValidationError

    app.add_exception_handler(json.JSONDecodeError, _malformed_json)
    app.add_exception_handler(ValidationError, _invalid_fields)
    app.add_middleware(OffLoop)
    app.add_middleware(RequestGuard, token=token)
    return app
