"""The node's live feed: ledger entries and safety changes, fanned out to SSE subscribers.

Publishing is thread-safe (appends happen on the ledger thread); each subscriber has a
bounded queue, and a subscriber too slow to keep up is told so and dropped rather than
letting the node's memory grow. At most MAX_SUBSCRIBERS are served at once: each holds a
connection (a file descriptor) for as long as it likes, so one more is refused (FeedFull).
"""

from __future__ import annotations

import asyncio
from typing import Any

from forge_cli.errors import FeedFull

QUEUE = 1024
# Dashboards and scripts watching one node: a few. Each costs a descriptor and up to QUEUE
# queued events; 64 of them stay far below the node's descriptor limit.
MAX_SUBSCRIBERS = 64


class EventBus:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._subscribers: set[asyncio.Queue[dict[str, Any] | None]] = set()

    def publish(self, event: str, data: dict[str, Any]) -> None:
        """Send an event to every subscriber; callable from any thread."""
        self.loop.call_soon_threadsafe(self._fan_out, {"event": event, "data": data})

    def _fan_out(self, message: dict[str, Any]) -> None:
        for queue in list(self._subscribers):
            try:
                queue.put_nowait(message)
            except asyncio.QueueFull:  # fell behind: drop it, telling it why
                self._subscribers.discard(queue)
                while not queue.empty():
                    queue.get_nowait()
                queue.put_nowait(None)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def subscribe(self) -> Subscription:
        """A subscription to every event from now on (use it in a `with` block, which
        unsubscribes); FeedFull when MAX_SUBSCRIBERS are subscribed already."""
        if len(self._subscribers) >= MAX_SUBSCRIBERS:
            raise FeedFull(f"the event feed already serves {len(self._subscribers)} "
                           f"subscribers, the most it holds at once ({MAX_SUBSCRIBERS})",
                           hint="close another dashboard or watcher, or retry shortly")
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(QUEUE)
        self._subscribers.add(queue)
        return Subscription(self, queue)

    def close(self) -> None:
        for queue in list(self._subscribers):
            while not queue.empty():
                queue.get_nowait()
            queue.put_nowait(None)
        self._subscribers.clear()


class Subscription:
    """One subscriber's place in the feed: `await get()` for the next event (None: it fell
    behind and was dropped, or the node is stopping)."""

    def __init__(self, bus: EventBus, queue: asyncio.Queue[dict[str, Any] | None]) -> None:
        self.bus = bus
        self.queue = queue

    async def get(self) -> dict[str, Any] | None:
        return await self.queue.get()

    def close(self) -> None:
        self.bus._subscribers.discard(self.queue)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
