"""An aiohttp application served on 127.0.0.1 by an event loop on a thread of the test process,
for tests that need a real server and direct access to what it holds (a node, a broken API)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

START_S = 60


class AppThread:
    """Serve `make()`'s application (built on the server's own loop) until `close`.

    Example::

        served = AppThread(lambda: make_app(node))
        http.client.HTTPConnection("127.0.0.1", served.port) ...
        served.close()
    """

    def __init__(self, make: Callable[[], Any]) -> None:
        from aiohttp import web

        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        async def start() -> None:
            self.runner = web.AppRunner(make(), access_log=None)
            await self.runner.setup()
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            await site.start()
            self.port = self.runner.addresses[0][1]
            self.url = f"http://127.0.0.1:{self.port}"

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(start())
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert ready.wait(START_S), "the server did not start"

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(START_S)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(START_S)
