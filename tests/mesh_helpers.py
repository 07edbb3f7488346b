"""Helpers for peer-to-peer tests: run `forge worker`, read a ledger's trades, and a real
aiohttp proxy in front of a real provider that can tamper with what it relays."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from forge_cli.ledger.store import Ledger
from tests.conftest import REPO, forge_env

MESH_ENV = {"FORGE_MESH_INTERFACES": "127.0.0.1", "FORGE_MESH_PROBE_S": "1"}
WAIT_S = 20


def wait_for(what: str, check: Callable[[], Any], timeout: float = WAIT_S) -> Any:
    """Poll `check` until it returns something truthy; fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout} s")
        time.sleep(0.2)


def worker(home: Path, *args: str, env: dict[str, str] | None = None,
           timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "forge_cli", "worker", *args],
                          capture_output=True, text=True, cwd=REPO, timeout=timeout,
                          env=forge_env(home, **{**MESH_ENV, **(env or {})}))


def entries_of(home: Path, kind: str) -> list[Any]:
    """Entries of `kind` in the ledger of `home`, oldest first (read beside a running node)."""
    path = home / "ledger.db"
    if not path.exists():
        return []
    ledger = Ledger.open_reader(path)
    try:
        return sorted(ledger.iter_newest(kind), key=lambda e: e.seq)
    finally:
        ledger.close()


class TamperingProxy:
    """A loopback HTTP server relaying everything to `upstream`; `edit_terms` may rewrite the
    provider's final terms event of /v1/forge/p2p/chat. Bodies of chat requests are kept."""

    def __init__(self, upstream: str,
                 edit_terms: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                 after_first_piece: Callable[[], None] | None = None) -> None:
        """`after_first_piece`: called once the first piece of a reply was relayed; the
        connection to the consumer is then cut where the provider's stream broke off."""
        self.upstream = upstream
        self.edit_terms = edit_terms
        self.after_first_piece = after_first_piece
        self.chat_bodies: list[bytes] = []
        self.settle_bodies: list[bytes] = []
        self.url = ""
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> TamperingProxy:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("proxy did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main())

    async def _main(self) -> None:
        import aiohttp
        from aiohttp import web

        self._stop = asyncio.Event()
        session = aiohttp.ClientSession()

        async def relay(request: web.Request) -> web.StreamResponse:
            body = await request.read()
            if request.path == "/v1/forge/p2p/chat":
                self.chat_bodies.append(body)
            if request.path == "/v1/forge/p2p/settle":
                self.settle_bodies.append(body)
            async with session.request(request.method, self.upstream + request.path_qs,
                                       data=body or None, headers={
                                           k: v for k, v in request.headers.items()
                                           if k.lower() in ("content-type", "authorization")}
                                       ) as upstream:
                if upstream.content_type != "text/event-stream":
                    return web.Response(status=upstream.status, body=await upstream.read(),
                                        content_type=upstream.content_type)
                response = web.StreamResponse(status=upstream.status,
                                              headers={"Content-Type": "text/event-stream"})
                await response.prepare(request)
                async for raw in upstream.content:
                    line = raw.decode()
                    if line.startswith("data: {") and '"terms"' in line and self.edit_terms:
                        event = self.edit_terms(json.loads(line[6:]))
                        raw = f"data: {json.dumps(event)}\n".encode()
                    await response.write(raw)
                    if self.after_first_piece and line.startswith('data: {"text"'):
                        self.after_first_piece()
                        assert request.transport is not None
                        request.transport.close()  # what a dead provider leaves: a cut stream
                        return response
                await response.write_eof()
                return response

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", relay)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self._ready.set()
        await self._stop.wait()
        await session.close()
        await runner.cleanup()
