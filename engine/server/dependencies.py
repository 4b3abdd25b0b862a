"""What the routes take through `Depends`: the app's state and the API key check."""
from __future__ import annotations

import hmac

from fastapi import Request

from ipadapter_instruct.engine.server.errors import ApiError
from ipadapter_instruct.engine.server.state import ServerState


def engine_state(request: Request) -> ServerState:
    """The state of the app answering this request (create_app puts it on `app.state.engine`)."""
    return request.app.state.engine


def authorize(request: Request) -> None:
    """With --api-key-file, `Authorization: Bearer <key>` or 401."""
    key = engine_state(request).api_key
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise ApiError(401, "unauthorized", "missing or wrong API key: send `Authorization: Bearer <key>`",
                       headers={"www-authenticate": "Bearer"})
