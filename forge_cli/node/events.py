"""The node's live feed: ledger entries and safety changes, fanned out to SSE subscribers.

Publishing is thread-safe (appends happen on the ledger thread); each subscriber has a
bounded queue, and a subscriber too slow to keep up is told so and dropped rather than
letting the node's memory grow.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

QUEUE = 1024


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

    async def subscribe(self) -> AsyncIterator[dict[str, Any] | None]:
        """Events as they come; None means this subscriber fell behind and was dropped."""
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(QUEUE)
        self._subscribers.add(queue)
        try:
            while True:
                message = await queue.get()
                yield message
                if message is None:
                    return
        finally:
            self._subscribers.discard(queue)

    def close(self) -> None:
        for queue in list(self._subscribers):
            while not queue.empty():
                queue.get_nowait()
            queue.put_nowait(None)
        self._subscribers.clear()
