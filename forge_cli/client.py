"""A small client of the node API for the CLI (standard library only, so commands start fast).

Errors come back as ForgeError subclasses carrying the node's message: an HTTP 402 becomes
InsufficientCU, 423 KillSwitchActive, and so on, so the CLI maps them to exit codes as usual.
"""

from __future__ import annotations

import http.client
import json
import os
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forge_cli import config
from forge_cli.errors import CheckFailed, ForgeError, SpendDenied, StorageError, UsageError


class NodeError(ForgeError):
    """The node answered with an error."""


class NodeRefused(SpendDenied):
    """The node refused a spend (balance, a safety gate)."""


class NodeUnreachable(StorageError):
    """No node answered at the URL."""


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


@dataclass
class Client:
    url: str
    token: str | None = None
    timeout: float = 600

    def __post_init__(self) -> None:
        parsed = urllib.parse.urlsplit(self.url if "://" in self.url else f"http://{self.url}")
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise UsageError(f"node URL {self.url!r} is not an http(s) URL")
        self._parsed = parsed

    def _connection(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self._parsed.scheme == "https" else \
            http.client.HTTPConnection
        return cls(self._parsed.hostname, self._parsed.port, timeout=self.timeout)

    def _send(self, method: str, path: str, body: Any = None) -> http.client.HTTPResponse:
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        conn = self._connection()
        try:
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
        except OSError as exc:
            raise NodeUnreachable(f"no forge node answers at {self.url}: {exc}",
                                  hint="start one with `forge node`, or check --node") from exc
        if response.status >= 400:
            raise _error(response)
        return response

    def get(self, path: str) -> Any:
        return json.loads(self._send("GET", path).read())

    def post(self, path: str, body: Any) -> Any:
        return json.loads(self._send("POST", path, body).read())

    def stream_chat(self, payload: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """The chunks of a streamed chat completion, as dicts; raises on an error chunk."""
        response = self._send("POST", "/v1/chat/completions", {**payload, "stream": True})
        for raw in response:
            line = raw.decode("utf-8").strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                return
            chunk = json.loads(data)
            if "error" in chunk:
                raise _from_envelope(chunk["error"], 423 if chunk["error"].get("gate") ==
                                     "kill_switch" else 500)
            yield chunk


def _error(response: http.client.HTTPResponse) -> ForgeError:
    try:
        envelope = json.loads(response.read())["error"]
    except (ValueError, KeyError, TypeError):
        envelope = {"message": f"HTTP {response.status} {response.reason}"}
    return _from_envelope(envelope, response.status)


def _from_envelope(envelope: dict[str, Any], status: int) -> ForgeError:
    message = f"node: {envelope.get('message', 'error')}"
    if status in (402, 403, 423) or envelope.get("gate"):
        error: ForgeError = NodeRefused(message)
    elif status in (400, 401, 404, 413, 422):
        error = UsageError(message)
    elif status == 409:
        error = CheckFailed(message)
    else:
        error = NodeError(message)
    error.status = status  # type: ignore[attr-defined]
    error.envelope = envelope  # type: ignore[attr-defined]
    return error


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
