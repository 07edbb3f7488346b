"""Per-sender throttles: a sender whose requests keep being refused is answered 429, with
Retry-After, before the node reads, parses or tokenizes anything more of what it sends.

One class counts refusals per key over the last minute. The node keeps two: failed
authentications per client address (web.auth_middleware), and requests refused as bad input
(`rejected`) per sender: an account for the token routes, and for the public P2P routes both
the client's address and, once its signature checked, the peer's key (keys cost nothing to
make; addresses cost a stranger more to multiply).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from forge_cli.errors import BadIntent, Replay, Throttled, UsageError

AUTH_FAILURES_PER_MINUTE = 20
# Refused requests (bad input) one sender may make in a minute before it is throttled. Each
# costs the node at most reading and parsing one body (web.MAX_BODY) and, for a prompt under
# the model's byte bound, tokenizing it off the scheduler thread.
REJECTS_PER_MINUTE = 30
WINDOW_S = 60.0
MAX_KEYS = 10_000  # senders remembered; the oldest half is forgotten past it (bounded memory)


def rejected(exc: BaseException) -> bool:
    """Whether a request ended as a refusal of what its sender sent (it counts toward the
    sender's throttle): bad input (a body over the size limit too), a bad or replayed intent. A
    spend refused for want of CU, a busy engine or a throttle itself are not the sender's
    input and do not count."""
    return isinstance(exc, UsageError | BadIntent | Replay)


class Throttle:
    """Refusals per key in a sliding window: after `limit` of them within `window_s`, the key
    waits until the oldest leaves the window. Never global: one bad sender locks out only
    itself."""

    def __init__(self, limit: int, *, window_s: float = WINDOW_S,
                 clock: Callable[[], float] = time.monotonic, max_keys: int = MAX_KEYS) -> None:
        self.limit = limit
        self.window_s = window_s
        self.clock = clock
        self.max_keys = max_keys
        self.failures: dict[str, deque[float]] = {}

    def blocked_for(self, key: str) -> int:
        """Seconds `key` must wait (0: it may go on)."""
        recent = self.failures.get(key)
        if recent is None:
            return 0
        now = self.clock()
        while recent and now - recent[0] >= self.window_s:
            recent.popleft()
        if not recent:
            del self.failures[key]
            return 0
        if len(recent) >= self.limit:
            return int(self.window_s - (now - recent[0])) + 1
        return 0

    def check(self, key: str, who: str) -> None:
        """Raise Throttled when `key` must wait; `who` names it in the message."""
        wait = self.blocked_for(key)
        if wait:
            raise Throttled(f"too many refused requests from {who} in the last minute (at most "
                            f"{self.limit}); retry in {wait} s", retry_after_s=wait)

    def failed(self, key: str) -> None:
        """Count one refusal against `key` (only the last `limit` are kept)."""
        recent = self.failures.get(key)
        if recent is None:
            if len(self.failures) >= self.max_keys:
                for old in list(self.failures)[: self.max_keys // 2]:
                    del self.failures[old]
            recent = self.failures[key] = deque(maxlen=self.limit)
        recent.append(self.clock())


class Sender:
    """The keys one request counts against: checked as each is learned (the address or the
    account before the body is read, a peer's key once its signature is checked), and each
    charged one refusal when the request ends `rejected`::

        with Sender(throttle, f"account:{hex}", "account bob") as sender:
            ...  # Throttled already raised if bob must wait
    """

    def __init__(self, throttle: Throttle, key: str, who: str) -> None:
        self.throttle = throttle
        self.keys: list[str] = []
        self.add(key, who)

    def add(self, key: str, who: str) -> None:
        self.throttle.check(key, who)
        self.keys.append(key)

    def __enter__(self) -> Sender:
        return self

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        if exc is not None and rejected(exc):
            for key in self.keys:
                self.throttle.failed(key)


__all__ = ["AUTH_FAILURES_PER_MINUTE", "REJECTS_PER_MINUTE", "Sender", "Throttle", "rejected"]
