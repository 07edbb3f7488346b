"""HTTP plumbing shared by the routes: JSON errors, bearer auth, request parsing, the route table.

Every error leaves as the OpenAI envelope `{"error": {"message", "type", "code"}}` with its
status, including aiohttp's own 404/405/413; no handler ever answers with a traceback.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from forge_cli import wire
from forge_cli.errors import (
    ApprovalRequired,
    EngineBusy,
    Forbidden,
    ForgeError,
    SpendDenied,
)

# The routes take the request parsers from here, beside read_json.
from forge_cli.inference.requests import bad_request as bad_request
from forge_cli.inference.requests import field as field
from forge_cli.node.throttle import Throttle

log = logging.getLogger("forge.node")

if TYPE_CHECKING:
    from forge_cli.economy.accounts import Resolved as Who
    from forge_cli.root.node import Node

NODE: web.AppKey[Node] = web.AppKey("node")
# Requests refused as bad input, per sender (forge_cli.node.throttle).
REJECTS: web.AppKey[Throttle] = web.AppKey("rejects", Throttle)
OPENAPI: web.AppKey[dict[str, Any]] = web.AppKey("openapi")
# Per request: who is calling (auth), the trade to log, and a stream already begun.
WHO: web.RequestKey[Who] = web.RequestKey("who")
TRADE_LOG: web.RequestKey[dict[str, Any]] = web.RequestKey("trade_log")
STREAMING: web.RequestKey[web.StreamResponse] = web.RequestKey("streaming")
PUBLIC = {"/health", "/metrics", "/openapi.json"}
MAX_BODY = 1024 * 1024
MAX_DEPTH = wire.MAX_DEPTH

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    summary: str
    public: bool = False

    @property
    def template(self) -> str:
        """The path as aiohttp names its resource: `{name:regex}` parts become `{name}`."""
        return re.sub(r"\{(\w+):[^}]*\}", r"{\1}", self.path)


def error_response(status: int, message: str, kind: str, code: str | None = None,
                   headers: dict[str, str] | None = None, **extra: Any) -> web.Response:
    body = {"error": {"message": message, "type": kind, "code": code, **extra}}
    return web.json_response(body, status=status, headers=headers)


def _kind(status: int) -> str:
    return {400: "invalid_request_error", 401: "authentication_error", 402: "insufficient_cu",
            403: "permission_denied", 404: "not_found_error", 405: "invalid_request_error",
            409: "conflict_error",
            413: "request_too_large", 422: "invalid_request_error", 423: "kill_switch",
            429: "rate_limit_error", 503: "service_unavailable"}.get(status, "server_error")


def error_body(exc: ForgeError) -> dict[str, Any]:
    """The OpenAI error envelope's inner object for a ForgeError (also sent as an SSE event)."""
    status = getattr(exc, "http_status", 400)
    body: dict[str, Any] = {"message": exc.message + (f" ({exc.hint})" if exc.hint else ""),
                            "type": _kind(status), "code": type(exc).__name__}
    if isinstance(exc, SpendDenied):
        body["gate"] = getattr(exc, "gate", None)
    if isinstance(exc, ApprovalRequired):
        body["approval_id"] = exc.approval_id
    return body


def forge_error_response(exc: ForgeError) -> web.Response:
    status = getattr(exc, "http_status", 400)
    headers = None
    retry = getattr(exc, "retry_after_s", None)
    if retry is not None:  # the error knows when its limit frees up
        headers = {"Retry-After": str(retry)}
    elif isinstance(exc, EngineBusy):
        headers = {"Retry-After": "1"}
    elif status == 429:  # a per-minute limit (new loans): the window frees up within a minute
        headers = {"Retry-After": "60"}
    return web.json_response({"error": error_body(exc)}, status=status, headers=headers)


def sse(data: dict[str, Any]) -> bytes:
    """One server-sent event carrying `data` as JSON."""
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except ForgeError as exc:
        begun = request.get(STREAMING)
        if begun is not None and begun.prepared:  # never a second response inside a stream
            log.warning("%s %s: %s after the stream began", request.method, request.path, exc)
            return begun
        response = forge_error_response(exc)
        status = response.status
        return response
    except web.HTTPException as exc:
        # aiohttp's own answers (no route, wrong method, body too large) become the envelope
        # here, the one boundary; routes themselves raise ForgeErrors, never web.HTTP….
        status = exc.status
        if exc.status < 400:
            raise
        defaults = {404: f"no route {request.method} {request.path}",
                    405: f"{request.method} is not allowed on {request.path}",
                    413: f"request body is larger than {MAX_BODY:,} bytes"}
        message = defaults.get(exc.status, exc.reason)
        headers = {k: v for k, v in exc.headers.items() if k in ("Allow", "Retry-After")}
        return error_response(exc.status, message, _kind(exc.status), None, headers)
    except ConnectionError:
        # The client went away (mid-stream, usually): nothing to answer, and nothing for the
        # log but this request's one line below. aiohttp finishes a begun stream quietly.
        status = 499
        begun = request.get(STREAMING)
        return begun if begun is not None and begun.prepared else web.Response(status=499)
    except Exception:
        log.exception("unexpected error on %s %s", request.method, request.path)
        begun = request.get(STREAMING)
        if begun is not None and begun.prepared:
            return begun
        return error_response(500, "internal error; the node log has the details",
                              "server_error", "internal_error")
    finally:
        who = request.get(WHO)
        node = request.app.get(NODE)
        if node is not None and request.path not in ("/metrics",):
            node.metrics.requests.labels(request.match_info.route.resource.canonical
                                         if request.match_info.route.resource else "unknown",
                                         str(status)).inc()
        trade = request.get(TRADE_LOG, {})
        log.info("%s %s %s account=%s model=%s tokens=%s cu=%s status=%d %.1fms", request.remote,
                 request.method, request.path, who.account_hex[:12] if who is not None else "-",
                 trade.get("model", "-"), trade.get("tokens", "-"), trade.get("cu", "-"),
                 status, (time.perf_counter() - started) * 1000)


def auth_middleware(throttle: Throttle, public: set[str] = PUBLIC) -> Any:
    """Bearer tokens on every route but the `public` ones (path templates).

    Public routes are liveness, metrics and the API description, plus the mesh's peer-to-peer
    routes, which authenticate by Ed25519 signatures over what they carry instead of tokens.
    """

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        resource = request.match_info.route.resource
        if request.path in public or (resource is not None and resource.canonical in public):
            return await handler(request)
        address = request.remote or "?"
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        node = request.app[NODE]
        who = node.accounts.resolve(token.strip()) if scheme.lower() == "bearer" and token else None
        if who is None:
            # Only failures are throttled, per address: a client behind the same address
            # with a valid token is not locked out by someone else's guessing.
            wait = throttle.blocked_for(address)
            if wait:
                return error_response(429, f"too many failed authentications from {address}; "
                                      f"retry in {wait} s", "rate_limit_error", "auth_throttled",
                                      {"Retry-After": str(wait)})
            throttle.failed(address)
            reason = "missing bearer token" if not header else "invalid or revoked token"
            return error_response(401, f"{reason}; send `Authorization: Bearer <token>`",
                                  "authentication_error", "invalid_token")
        request[WHO] = who
        return await handler(request)

    return middleware


async def read_json(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 naming what is wrong: every route reads its
    body here, so the size (MAX_BODY: BodyTooLarge, 413) and nesting (wire.MAX_DEPTH) limits
    hold on every route."""
    return await wire.read_object(request, MAX_BODY)


def int_query(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    """The integer query parameter `name`, `default` when absent; a 400 unless low ≤ value ≤ high."""
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise bad_request(f"query parameter {name} must be an integer, found {raw!r}") from None
    if not low <= value <= high:
        raise bad_request(f"query parameter {name} must be between {low} and {high}")
    return value


def account_query(request: web.Request) -> str:
    """The account a read is about: `?account=` (the operator's token only), else the caller's."""
    who = request[WHO]
    account = request.query.get("account")
    if account is None or account == who.account_hex:
        return who.account_hex
    if not who.is_operator:
        raise Forbidden("only the operator may read another account")
    if len(account) != 64 or any(c not in "0123456789abcdef" for c in account):
        raise bad_request("account must be a 64-digit lowercase hex public key")
    return account


def openapi(routes: list[Route]) -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for route in routes:
        op: dict[str, Any] = {
            "summary": route.summary,
            "responses": {"200": {"description": "OK"},
                          "default": {"description": "error",
                                      "content": {"application/json": {"schema": {
                                          "$ref": "#/components/schemas/Error"}}}}},
        }
        if not route.public:
            op["security"] = [{"bearer": []}]
        if route.method == "POST":
            op["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": {"type": "object"}}}}
        params = [part[1:-1] for part in route.template.split("/") if part.startswith("{")]
        if params:
            op["parameters"] = [{"name": p, "in": "path", "required": True,
                                 "schema": {"type": "integer", "minimum": 0} if p == "seq"
                                 else {"type": "string"}} for p in params]
        paths.setdefault(route.template, {})[route.method.lower()] = op
    return {
        "openapi": "3.0.3",
        "info": {"title": "forge node", "version": "1"},
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Error": {"type": "object", "properties": {"error": {
                "type": "object", "properties": {"message": {"type": "string"},
                                                 "type": {"type": "string"},
                                                 "code": {"type": "string", "nullable": True}}}}}},
        },
    }
