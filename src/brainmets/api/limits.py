"""The upload limit, enforced while the body streams in.

FastAPI's own `max_body_size` answers a declared oversize body in plain text; clients of this API read a
JSON `detail`, so the limit lives here: a declared Content-Length over it is refused before any body
byte is read, and a body without one (chunked) is refused as soon as the bytes received pass it.
"""

from __future__ import annotations

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send


def too_large(max_bytes: int) -> str:
    return (f"request body over the upload limit of {max_bytes / 2**20:g} MB: send a smaller file "
            f"(one slice, or a compressed .nii.gz volume)")


class UploadLimit:
    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await JSONResponse({"detail": too_large(self.max_bytes)}, 413)(scope, receive, send)
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:  # FastAPI passes HTTPExceptions from body parsing on to the handlers
                raise HTTPException(413, too_large(self.max_bytes))
            return message

        await self.app(scope, counted, send)
