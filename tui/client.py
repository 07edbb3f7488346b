"""The TUI's async view of a node: JSON routes and the SSE feed over aiohttp.

Failures become three exceptions the app can show: the node is unreachable, the token was
refused, or the node answered with another error. A route that answers 404 is `None`, which
is how the panels tell "this node has no lending pool / mesh" from an error.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp


class NodeDown(Exception):
    """No node answered (refused, reset, timed out)."""


class TokenRefused(Exception):
    """The node answered 401: the token is wrong or revoked."""


class NodeAnswered(Exception):
    """The node answered with an error status other than 401 and 404."""


class NodeClient:
    def __init__(self, url: str, token: str | None, timeout: float = 10) -> None:
        self.url = url.rstrip("/") if "://" in url else f"http://{url.rstrip('/')}"
        self.token = token
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
            self._session = aiohttp.ClientSession(headers=headers)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _call(self, method: str, path: str, body: Any = None) -> Any:
        try:
            async with self.session.request(
                method, self.url + path, json=body, timeout=aiohttp.ClientTimeout(total=self.timeout)
            ) as response:
                text = await response.text()
                status = response.status
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise NodeDown(f"no node answers at {self.url} ({type(exc).__name__})") from exc
        payload: Any
        try:
            payload = json.loads(text)
        except ValueError:
            payload = {"error": {"message": text.strip() or f"HTTP {status}"}}
        if status == 401:
            raise TokenRefused(_message(payload, status))
        if status == 404 and method == "GET":
            return None
        if status >= 400:
            raise NodeAnswered(_message(payload, status))
        return payload

    async def get(self, path: str) -> Any:
        """The route's JSON, or None when the node has no such route (404)."""
        return await self._call("GET", path)

    async def post(self, path: str, body: Any) -> Any:
        return await self._call("POST", path, body)

    async def events(self) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """(event, data) from /v1/forge/events until the stream ends; raises like get()."""
        try:
            async with self.session.get(self.url + "/v1/forge/events",
                                        timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.timeout)
                                        ) as response:
                if response.status == 401:
                    raise TokenRefused(_message(await _json(response), 401))
                if response.status >= 400:
                    raise NodeAnswered(_message(await _json(response), response.status))
                event, data = "message", []
                async for raw in response.content:
                    line = raw.decode("utf-8").rstrip("\r\n")
                    if not line:
                        if data:
                            yield event, json.loads("\n".join(data))
                        event, data = "message", []
                    elif line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:"):
                        data.append(line[5:].strip())
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise NodeDown(f"the event stream from {self.url} ended ({type(exc).__name__})") from exc


async def _json(response: aiohttp.ClientResponse) -> Any:
    try:
        return json.loads(await response.text())
    except ValueError:
        return {}


def _message(payload: Any, status: int) -> str:
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        return f"HTTP {status}: {payload['error'].get('message', 'error')}"
    return f"HTTP {status}"
