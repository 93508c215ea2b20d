"""What every HTTP route module of the router shares: the app key, error bodies, JSON input."""

from __future__ import annotations

import json
import logging

from aiohttp import web

log = logging.getLogger("xim_router.http")

ROUTER_KEY = "xim_router"        # a plain string key: aiohttp 3.8 has no web.AppKey

_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 413: "too_large"}


def error_body(code: str, message: str) -> dict:
    """The one error body shape of this API: {"error": {"code", "message"}}."""
    return {"error": {"code": code, "message": message}}


def error_response(status: int, code: str, message: str) -> web.Response:
    return web.json_response(error_body(code, message), status=status)


class ApiError(Exception):
    """Raise from a handler to answer with ``status`` and an error body."""

    def __init__(self, status: int, code: str, message: str):
        self.status, self.code, self.message = status, code, message
        super().__init__(f"{status} {code}: {message}")


@web.middleware
async def json_errors(request: web.Request, handler):
    """Every failure leaves as a JSON error body, never an HTML page or a traceback."""
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.code, exc.message)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(exc.status, _HTTP_CODES.get(exc.status, "http_error"), exc.reason)
    except ConnectionError:     # the client hung up (e.g. mid-body): nobody to answer, nothing broke
        log.debug("%s %s: the client went away", request.method, request.path)
        return web.Response(status=499)
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return error_response(500, "internal", "internal error; see the router's log")


class NotJsonObject(ValueError):
    """A body that is not a JSON object; the message says what is wrong, for a 400."""


def parse_json_object(raw: bytes) -> dict:
    """``raw`` as a JSON object; NotJsonObject says why not.

    Nesting deeper than Python's recursion limit is refused like any other
    bad body: json raises RecursionError for it, which would otherwise leave
    as a 500. The time is bounded by the body size limit (the parser is linear).
    """
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise NotJsonObject("the body is not valid JSON") from None
    except RecursionError:
        raise NotJsonObject("the body is nested too deeply") from None
    if not isinstance(body, dict):
        raise NotJsonObject("the body must be a JSON object")
    return body


async def read_json(request: web.Request) -> dict:
    """The request body as a JSON object, or a 400 that says what is wrong."""
    try:
        return parse_json_object(await request.read())
    except NotJsonObject as exc:
        raise ApiError(400, "bad_request", str(exc)) from None


def bearer_token(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "missing_token", "send the agent token as 'Authorization: Bearer <token>'")
    if not token.isascii():     # aiohttp passes non-UTF-8 header bytes on as surrogates
        raise ApiError(401, "invalid_token", "this token is not known")
    return token.strip()
