"""THE client of a node's API, used by the CLI, the TUI, the buyer, MCP and the tests.

`Client` is synchronous over the standard library, so commands start fast; `AsyncClient` is
the same over aiohttp (the TUI, a buyer's purchases from peers). Both read server-sent events
with one `SSEReader` and turn every failure into a ForgeError: the node's error envelope
becomes the class the node raised (`error_from`, one table), a node that does not answer
becomes NodeUnreachable, and an answer that is not what the API promises becomes BadResponse.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import sys
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from forge_cli import config, errors, wire
from forge_cli.errors import (
    ApprovalRequired,
    BadResponse,
    CheckFailed,
    ForgeError,
    InsufficientCU,
    KillSwitchActive,
    LendingDenied,
    NodeError,
    NodeRefused,
    NodeUnreachable,
    SpendDenied,
    TokenRefused,
    UsageError,
)

if TYPE_CHECKING:
    import aiohttp

DONE = "[DONE]"
OFF_LOOP_BYTES = 64 * 1024  # an AsyncClient answer larger than this is parsed on a thread
UNREACHABLE_HINT = "start one with `forge node`, or check --node"

# The class for an envelope whose `code` names no ForgeError (aiohttp's own 404/405/413, the
# auth middleware's "invalid_token", an older node), by HTTP status; any other status is a
# NodeError, or a NodeRefused when the envelope names a safety gate.
BY_STATUS: dict[int, type[ForgeError]] = {
    400: UsageError, 401: TokenRefused, 402: InsufficientCU, 403: NodeRefused, 404: UsageError,
    405: UsageError, 409: CheckFailed, 413: UsageError, 422: UsageError, 423: KillSwitchActive,
}
# Every ForgeError by name: the node's envelope carries the class it raised as `code`.
BY_CODE: dict[str, type[ForgeError]] = {
    name: cls for name, cls in vars(errors).items()
    if isinstance(cls, type) and issubclass(cls, ForgeError)
}


def error_from(envelope: dict[str, Any], status: int | None) -> ForgeError:
    """The ForgeError for the node's error envelope `{"code", "message", "type", "gate"?,
    "approval_id"?}`: the class `code` names, else the one for `status` (None for an error event
    inside a stream). The error keeps `status` and `envelope` as attributes, so a caller can
    quote the node's own words (`envelope["message"]`)."""
    message = f"node: {envelope.get('message') or 'error'}"
    code, gate = envelope.get("code"), envelope.get("gate")
    cls = BY_CODE.get(code) if isinstance(code, str) else None
    if cls is None:
        cls = BY_STATUS.get(status or 0) or (NodeRefused if gate else NodeError)
    error: ForgeError
    if issubclass(cls, ApprovalRequired):
        error = cls(message, approval_id=str(envelope.get("approval_id") or ""))
    elif issubclass(cls, LendingDenied):
        error = (cls(message, gate=gate) if gate in errors.LENDING_GATES
                 else NodeRefused(message, gate=str(gate)))
    elif issubclass(cls, SpendDenied):
        error = cls(message, gate=gate if isinstance(gate, str) else None)
    else:
        error = cls(message)
    error.status = status  # type: ignore[attr-defined]
    error.envelope = envelope  # type: ignore[attr-defined]
    return error


def answer(status: int, reason: str, raw: bytes, source: str) -> Any:
    """A JSON route's answer, or its error as a ForgeError (any status from 400, and the 202
    that asks for an approval)."""
    parsed = True
    try:
        payload: Any = wire.parse(raw) if raw.strip() else None
    except wire.BadJSON:
        payload, parsed = None, False
    envelope = payload.get("error") if isinstance(payload, dict) else None
    if status >= 400 or (status == 202 and isinstance(envelope, dict)):
        if not isinstance(envelope, dict):
            envelope = {"message": f"HTTP {status} {reason}".strip()}
        raise error_from(envelope, status)
    if not parsed:
        raise BadResponse(f"{source} answered HTTP {status} with something that is not JSON: "
                          f"{raw[:80]!r}")
    return payload


@dataclass(frozen=True)
class Event:
    """One server-sent event: its `name` ("message" unless the stream named one) and its
    data, parsed as JSON."""

    name: str
    data: Any


class SSEReader:
    """Server-sent events from the lines of one stream, the only SSE parser forge has.

    `feed(line)` returns the event a blank line completes, else None. A malformed line or data
    that is not JSON raises BadResponse; the node's error event `{"error": {...}}` raises the
    error it carries (`error_from`); `data: [DONE]` sets `done`. Call `end()` when the stream
    ends: a stream that must close with [DONE] and did not is a BadResponse.
    """

    def __init__(self, source: str) -> None:
        self.source = source
        self.name = "message"
        self.data: list[str] = []
        self.done = False

    def feed(self, raw: bytes) -> Event | None:
        try:
            line = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as exc:
            raise BadResponse(f"{self.source} sent an event-stream line that is not UTF-8: "
                              f"{raw[:80]!r}") from exc
        if not line:
            return self._dispatch()
        if line.startswith(":"):  # a comment: the node's keepalive
            return None
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            self.data.append(value)
        elif name == "event":
            self.name = value
        elif name not in ("id", "retry"):
            raise BadResponse(f"{self.source} sent a malformed event-stream line: {line[:80]!r}",
                              hint="is the URL a forge node?")
        return None

    def _dispatch(self) -> Event | None:
        name, text = self.name, "\n".join(self.data)
        self.name, self.data = "message", []
        if not text:
            return None
        if text == DONE:
            self.done = True
            return None
        try:
            data = wire.parse(text, what="event data")
        except wire.BadJSON as exc:
            raise BadResponse(f"{self.source} sent an event whose data is not JSON forge reads "
                              f"({exc}): {text[:80]!r}") from exc
        if name == "message" and isinstance(data, dict) and isinstance(data.get("error"), dict):
            raise error_from(data["error"], None)
        return Event(name, data)

    def end(self, until_done: bool) -> None:
        """The stream ended; with `until_done`, it should have said [DONE] first."""
        if until_done and not self.done:
            middle = " in the middle of an event" if self.data else ""
            raise BadResponse(f"{self.source} ended its stream{middle} before [DONE]; the "
                              "answer is incomplete")


def _transport(exc: BaseException) -> type[ForgeError] | None:
    """The ForgeError class for a third-party failure of the connection, None for any other
    exception. aiohttp's classes are checked only once something imported aiohttp."""
    if isinstance(exc, http.client.HTTPException):
        return BadResponse  # not HTTP, or a body cut short (IncompleteRead)
    aiohttp = sys.modules.get("aiohttp")
    if aiohttp is not None and isinstance(exc, aiohttp.ClientPayloadError):
        return BadResponse  # a body cut short or garbled
    if isinstance(exc, OSError):  # TimeoutError and the socket errors
        return NodeUnreachable
    if aiohttp is not None and isinstance(exc, aiohttp.ClientError):
        return NodeUnreachable
    return None


@contextmanager
def translated(url: str, *, answering: bool = False) -> Iterator[None]:
    """The one boundary where transport exceptions (OSError, http.client's, aiohttp's) become
    ForgeErrors, chained. `answering`: the node already began its answer, so a connection that
    fails now broke off mid-answer (BadResponse), whatever the socket says."""
    try:
        yield
    except ForgeError:
        raise
    except Exception as exc:
        kind = _transport(exc)
        if kind is None:
            raise
        detail = str(exc) or type(exc).__name__
        if kind is BadResponse or answering:
            raise BadResponse(f"the answer from {url} broke off or is not HTTP: {detail}") from exc
        raise NodeUnreachable(f"no forge node answers at {url}: {detail}",
                              hint=UNREACHABLE_HINT) from exc


def _split(url: str) -> urllib.parse.SplitResult:
    parsed = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise UsageError(f"node URL {url!r} is not an http(s) URL")
    try:
        parsed.port  # noqa: B018 - raises on a port that is not a number
    except ValueError as exc:
        raise UsageError(f"node URL {url!r} has a bad port: {exc}") from None
    return parsed


def base_url(url: str) -> str:
    """`url` with a scheme and without a trailing slash: `127.0.0.1:3001` → `http://127.0.0.1:3001`."""
    return urllib.parse.urlunsplit(_split(url)[:3] + ("", "")).rstrip("/")


def default_token() -> str | None:
    """FORGE_TOKEN, else the operator token file if there is one."""
    token = os.environ.get("FORGE_TOKEN")
    if token:
        return token.strip()
    path = config.home() / "api_token"
    try:
        return path.read_text(encoding="ascii").strip()
    except OSError:
        return None


def _headers(token: str | None, json_body: bool) -> dict[str, str]:
    headers = {"Accept": "application/json, text/event-stream"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if json_body:
        headers["Content-Type"] = "application/json"
    return headers


def _is_stream(content_type: str) -> bool:
    return content_type.split(";")[0].strip().lower() == "text/event-stream"


@dataclass
class Client:
    """The node API over http.client: `get`/`post` JSON, `stream` events, `stream_chat`."""

    url: str
    token: str | None = None
    timeout: float = 600
    _parsed: urllib.parse.SplitResult = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._parsed = _split(self.url)

    def _open(self, method: str, path: str, body: Any
              ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        cls = http.client.HTTPSConnection if self._parsed.scheme == "https" else \
            http.client.HTTPConnection
        conn = cls(self._parsed.hostname or "", self._parsed.port, timeout=self.timeout)
        data = None if body is None else json.dumps(body).encode()
        try:
            with translated(self.url):
                conn.request(method, self._parsed.path.rstrip("/") + path, body=data,
                             headers=_headers(self.token, data is not None))
                return conn, conn.getresponse()
        except BaseException:
            conn.close()
            raise

    def call(self, method: str, path: str, body: Any = None) -> Any:
        """The route's JSON answer; raises its error as a ForgeError."""
        conn, response = self._open(method, path, body)
        try:
            with translated(self.url):
                raw = response.read()
        finally:
            conn.close()
        return answer(response.status, response.reason, raw, self.url + path)

    def get(self, path: str) -> Any:
        return self.call("GET", path)

    def post(self, path: str, body: Any) -> Any:
        return self.call("POST", path, body)

    def text(self, path: str) -> str:
        """A route that answers plain text (`/metrics`)."""
        conn, response = self._open("GET", path, None)
        try:
            with translated(self.url):
                raw = response.read()
        finally:
            conn.close()
        if response.status >= 400:
            answer(response.status, response.reason, raw, self.url + path)
        return raw.decode("utf-8", "replace")

    def stream(self, path: str, body: Any = None, *, until_done: bool = True) -> Iterator[Event]:
        """The events of a streamed route (POST with a body, else GET) until [DONE], or until
        the stream ends when not `until_done`."""
        conn, response = self._open("POST" if body is not None else "GET", path, body)
        source = self.url + path
        try:
            if response.status != 200 or not _is_stream(response.getheader("Content-Type", "")):
                with translated(self.url):
                    raw = response.read()
                answer(response.status, response.reason, raw, source)
                raise BadResponse(f"{source} answered HTTP {response.status} without an event "
                                  "stream")
            reader = SSEReader(source)
            with translated(self.url, answering=True):
                for raw in response:
                    event = reader.feed(raw)
                    if reader.done:
                        return
                    if event is not None:
                        yield event
            reader.end(until_done)
        finally:
            conn.close()

    def stream_chat(self, payload: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """The chunks of a streamed chat completion, as dicts; raises on an error event."""
        for event in self.stream("/v1/chat/completions", {**payload, "stream": True}):
            yield event.data


class AsyncClient:
    """The node API over aiohttp: the same routes, events and errors as `Client`.

    Give it a `session` to share one (the buyer's, across sellers); otherwise it opens its own
    and `close()` closes it. `timeout` bounds each JSON call, and connecting for a stream.
    """

    def __init__(self, url: str, token: str | None = None, *, timeout: float = 10,
                 session: aiohttp.ClientSession | None = None,
                 max_bytes: int | None = None) -> None:
        self.url = base_url(url)
        self.token = token
        self.timeout = timeout
        self.max_bytes = max_bytes  # a peer's answer is read no further than this
        self._session = session
        self._owned = session is None

    @property
    def session(self) -> aiohttp.ClientSession:
        import aiohttp

        if self._session is None or (self._owned and self._session.closed):
            self._session = aiohttp.ClientSession()
        return self._session

    async def close(self) -> None:
        if self._owned and self._session is not None:
            await self._session.close()

    async def call(self, method: str, path: str, body: Any = None, *,
                   encoded: bytes | None = None) -> Any:
        """The route's JSON answer; raises its error as a ForgeError. `encoded` is a JSON body
        already encoded (gossip sends signed trades as they were stored)."""
        import aiohttp

        with translated(self.url):
            async with self.session.request(
                    method, self.url + path, json=body, data=encoded,
                    headers=_headers(self.token, body is not None or encoded is not None),
                    timeout=aiohttp.ClientTimeout(total=self.timeout)) as response:
                raw = await self._read(response, self.url + path)
        if len(raw) > OFF_LOOP_BYTES:  # parsing megabytes would stall every other task
            return await asyncio.to_thread(answer, response.status, response.reason or "", raw,
                                           self.url + path)
        return answer(response.status, response.reason or "", raw, self.url + path)

    async def _read(self, response: aiohttp.ClientResponse, source: str) -> bytes:
        """The whole body, or BadResponse once it passes `max_bytes` (read no further)."""
        if self.max_bytes is None:
            return await response.read()
        chunks: list[bytes] = []
        size = 0
        while chunk := await response.content.read(65536):
            size += len(chunk)
            if size > self.max_bytes:
                raise BadResponse(f"{source} answered more than {self.max_bytes:,} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def get(self, path: str) -> Any:
        return await self.call("GET", path)

    async def get_optional(self, path: str) -> Any:
        """The route's JSON, or None when the node answers 404 (no such route or object: a
        node without a lending pool or a mesh)."""
        try:
            return await self.call("GET", path)
        except ForgeError as exc:
            if getattr(exc, "status", None) == 404:
                return None
            raise

    async def post(self, path: str, body: Any) -> Any:
        return await self.call("POST", path, body)

    async def stream(self, path: str, body: Any = None, *, until_done: bool = True,
                     read_timeout: float | None = None) -> AsyncIterator[Event]:
        """The events of a streamed route (POST with a body, else GET) until [DONE], or until
        the stream ends when not `until_done`; `read_timeout` bounds the wait for each line."""
        import aiohttp

        source = self.url + path
        reader = SSEReader(source)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.timeout,
                                        sock_read=read_timeout)
        with translated(self.url):
            async with self.session.request(
                    "POST" if body is not None else "GET", source, json=body,
                    headers=_headers(self.token, body is not None), timeout=timeout) as response:
                if response.status != 200 or not _is_stream(response.content_type):
                    answer(response.status, response.reason or "", await response.read(), source)
                    raise BadResponse(f"{source} answered HTTP {response.status} without an "
                                      "event stream")
                while not reader.done:
                    try:
                        with translated(self.url, answering=True):
                            raw = await response.content.readline()
                    except ValueError as exc:  # aiohttp: a line longer than its buffer
                        raise BadResponse(f"{source} sent an event-stream line that is too "
                                          f"long ({exc})") from exc
                    if not raw:
                        break
                    event = reader.feed(raw)
                    if event is not None:
                        yield event
        reader.end(until_done)


def announced_node_url() -> str | None:
    """The URL a running node on this machine wrote to FORGE_HOME/node.url, if any."""
    try:
        return (config.home() / "node.url").read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def node_url(explicit: str | None = None) -> str | None:
    """--node URL, else FORGE_NODE, else the node that announced itself in FORGE_HOME."""
    return explicit or os.environ.get("FORGE_NODE", "").strip() or announced_node_url()


def running_node(node: str | None, token: str | None, needed_for: str) -> Client:
    """A client of `node_url(node)`, authenticated with --token, FORGE_TOKEN or the operator
    token."""
    url = node_url(node)
    if not url:
        raise UsageError(f"no running node: {needed_for}",
                         hint="start one with `forge node`, or pass --node URL")
    return Client(url, token or default_token())


def token_file_hint(home: Path) -> str:
    return f"pass --token, set FORGE_TOKEN, or read the operator token from {home / 'api_token'}"
