"""An ASGI middleware that puts every route of vLLM's server behind the API key.

vLLM's own --api-key guards only paths under /v1: POST /invocations answers completions
without it (vllm-project/vllm#58144), and /tokenize, /detokenize, /pooling, /score, /metrics,
/openapi.json and /docs are open too. The launch passes `--middleware
bundler.engines.vllm_auth.KeyOnEveryRoute`; vLLM adds a class with app.add_middleware(). Only
/health stays open (the installer's and a load balancer's health check). Standard library
only: it runs inside vLLM's process, from the release's own site.
"""

from __future__ import annotations

import hmac
import json
import os

OPEN = ("/health",)


class KeyOnEveryRoute:
    def __init__(self, app, key: str | None = None):
        self.app = app
        self.key = (key if key is not None else os.environ.get("VLLM_API_KEY", "")).encode()
        if not self.key:
            raise RuntimeError("KeyOnEveryRoute: VLLM_API_KEY is empty; refusing to serve without a key")

    async def __call__(self, scope, receive, send):
        if scope.get("type") not in ("http", "websocket") or scope.get("path") in OPEN:
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        auth = headers.get(b"authorization", b"")
        given = auth[7:].strip() if auth[:7].lower() == b"bearer " else headers.get(b"x-api-key", b"")
        if given and hmac.compare_digest(given, self.key):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        body = json.dumps({"error": {"message": "invalid or missing API key", "type": "invalid_request_error",
                                     "code": 401}}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})


MIDDLEWARE = f"{__name__}.KeyOnEveryRoute"
