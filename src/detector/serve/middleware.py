"""ASGI middleware in front of LitServe's routes: the API key, the upload checks, the request
log and one error shape (``{"error": "..."}``) for every refusal.

LitServe reads a multipart body whole through Starlette (no cap before it is read, no deadline
for a slow client, 1,000 parts by default) and sends any other body through ``json()``. Here
``POST /predict`` is taken first: the body is read under :mod:`.uploads`' caps and deadline,
every image header checked, and only then handed to LitServe as the JSON it expects
(``{"images": [{"name", "data": base64}]}``), so a refusal never reaches a worker.
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import json
import logging
import time
from typing import Any

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from detector.serve.uploads import Limits, UploadError, parse_uploads, read_body

log = logging.getLogger("detector.serve.requests")

OPEN_PATHS = ("/health",)
KEY_HEADER = "x-api-key"
NAME_CHARS = 120  # a client's file name is shown back, shortened, and never used as a path


def key_matches(headers: Headers, api_key: str) -> bool:
    """``X-API-Key: KEY``, ``Authorization: Bearer KEY`` or HTTP Basic with KEY as the password
    (what a browser asks for on the page); compared in constant time."""
    given = headers.get(KEY_HEADER, "")
    auth = headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer":
        given = given or value.strip()
    elif scheme.lower() == "basic":
        with contextlib.suppress(ValueError, UnicodeDecodeError):
            given = given or base64.b64decode(value.strip()).decode("utf-8").partition(":")[2]
    return hmac.compare_digest(given.encode("utf-8"), api_key.encode("utf-8"))


async def send_json(send: Send, status: int, body: dict, headers: list | None = None) -> None:
    data = json.dumps(body).encode("utf-8")
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": head + (headers or [])})
    await send({"type": "http.response.body", "body": data})


class ServiceMiddleware:
    def __init__(self, app: ASGIApp, limits: Limits, api_key: str | None = None) -> None:
        self.app = app
        self.limits = limits
        self.api_key = api_key or None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        headers = Headers(scope=scope)
        seen: dict[str, Any] = {"status": 500, "bytes": 0, "labels": []}

        async def watched(message: Message) -> None:
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
            await send(message)

        path, method = scope["path"], scope["method"]
        try:
            if self.api_key and path not in OPEN_PATHS and not key_matches(headers, self.api_key):
                challenge = b'Basic realm="detector"' if path == "/" else b"Bearer"
                await send_json(
                    watched,
                    401,
                    {"error": "missing or wrong API key: send it as the X-API-Key header"},
                    [(b"www-authenticate", challenge)],
                )
            elif path == "/predict" and method == "POST":
                await self._predict(scope, receive, watched, headers, seen)
            else:
                await self.app(scope, receive, watched)
        finally:
            client = (scope.get("client") or ("-",))[0]
            ms = (time.perf_counter() - start) * 1000
            log.info(
                "%s %s %s %d %dB %d image(s) %.1fms %s",
                client, method, path, seen["status"], seen["bytes"], len(seen["labels"]), ms,
                ",".join(seen["labels"]) or "-",
            )  # fmt: skip

    async def _predict(
        self, scope: Scope, receive: Receive, send: Send, headers: Headers, seen: dict
    ) -> None:
        declared = headers.get("content-length", "")
        seen["bytes"] = int(declared) if declared.isdigit() else 0
        try:
            body = await read_body(receive, headers, self.limits)
            seen["bytes"] = len(body)
            uploads = await parse_uploads(headers, body, self.limits)
        except UploadError as e:
            # The rest of a refused body is not read: the connection ends with the answer.
            await send_json(send, e.status, {"error": e.message}, [(b"connection", b"close")])
            return
        images = [
            {"name": u.name[:NAME_CHARS], "data": base64.b64encode(u.data).decode("ascii")}
            for u in uploads
        ]
        payload = json.dumps({"images": images}).encode("ascii")
        del body, uploads, images
        kept = [
            (k, v) for k, v in scope["headers"] if k not in (b"content-type", b"content-length")
        ]
        inner = {
            **scope,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *kept,
            ],
        }
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": payload, "more_body": False}

        await self._answer(inner, replay, send, seen)

    async def _answer(self, scope: Scope, receive: Receive, send: Send, seen: dict) -> None:
        """LitServe's JSON, with a worker's ``{"error", "status"}`` turned into that status
        and FastAPI's ``{"detail"}`` into ``{"error"}``."""
        start: Message = {}
        chunks: list[bytes] = []

        async def capture(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(scope, receive, capture)
        status = start.get("status", 500)
        try:
            body = json.loads(b"".join(chunks) or b"{}")
        except ValueError:
            body = {"error": "the model worker sent no readable answer"}
            status = 500
        if isinstance(body, dict) and "error" in body:
            status = int(body.pop("status", status if status >= 400 else 422))
        elif isinstance(body, dict) and "detail" in body and status >= 400:
            body = {"error": str(body["detail"])}
        for row in body.get("predictions", []) if isinstance(body, dict) else []:
            seen["labels"].append(row["label"])
        await send_json(send, status, body)
