"""What every HTTP shape beside the native one shares (OpenAI's, engine/server/openai_api.py; Automatic1111's,
engine/server/a1111_api.py): a route class whose errors, the API key's 401 and a FastAPI validation error included,
are answered in that shape's own body with the native status code."""
from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute

from ipadapter_instruct.engine.server.errors import ApiError
from ipadapter_instruct.engine.server.parsing import raise_first


def shaped_route(answer) -> type[APIRoute]:
    """An APIRoute class answering every ApiError of its routes with `answer(request, error)` -> a Response."""

    class ShapedRoute(APIRoute):
        def get_route_handler(self):
            handler = super().get_route_handler()

            async def shaped(request: Request):
                try:
                    return await handler(request)
                except ApiError as e:
                    return answer(request, e)
                except RequestValidationError as e:
                    try:
                        raise_first(e.errors())
                    except ApiError as first:
                        return answer(request, first)
            return shaped
    return ShapedRoute
