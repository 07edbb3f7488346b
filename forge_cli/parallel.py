"""Work spread over every core: how many there are, many signatures checked at once on
threads, and worker processes for work that holds the GIL.

libsodium releases the GIL while it verifies, so threads are enough for signatures alone;
work that is mostly Python (parsing, hashing small entries) needs processes.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any

from forge_cli import identity

# Below this many signatures one thread verifies them all: handing work to others costs more.
SPLIT_AT = 64

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _forget_threads() -> None:
    # A forked child has none of its parent's threads: it starts its own pool if it needs one.
    global _pool
    _pool = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_threads)


def cores() -> int:
    """The CPU cores this process may run on (its affinity mask, where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:
        return os.cpu_count() or 1


def _threads() -> ThreadPoolExecutor:
    """The shared verifying threads: one per core but the caller's own (started on first use)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max(1, cores() - 1), thread_name_prefix="forge-verify")
        return _pool


def _verify_part(checks: Sequence[tuple[bytes, bytes, bytes]]) -> list[bool]:
    return identity.verify_many(checks)


def verify_all(checks: Sequence[tuple[bytes, bytes, bytes]], *,
               workers: int | None = None) -> list[bool]:
    """`identity.verify` of each (public key, message, signature), outcomes at their index.

    A large batch is cut into one part per worker (default: every core); the caller verifies
    the first part itself while the shared threads verify the others. `workers=1` is the
    plain sequential loop.

        verify_all([(key, b"hello", good_sig), (key, b"hello", bad_sig)])  # [True, False]
    """
    workers = cores() if workers is None else workers
    if workers <= 1 or len(checks) < SPLIT_AT:
        return _verify_part(checks)
    step = -(-len(checks) // workers)
    pool = _threads()
    later = [pool.submit(_verify_part, checks[i:i + step]) for i in range(step, len(checks), step)]
    out = _verify_part(checks[:step])
    for future in later:
        out.extend(future.result())
    return out


def process_pool(workers: int, initializer: Callable[..., object] | None = None,
                 initargs: tuple[Any, ...] = ()) -> ProcessPoolExecutor:
    """Worker processes, started in the cheapest way that is safe here.

    Forking copies this process in milliseconds, but is safe only while it runs no other
    thread (a lock held by one would stay locked in the child forever): the command line
    forks; a node, with its threads, spawns fresh interpreters. OSError if neither can start.
    """
    fork = sys.platform == "linux" and threading.active_count() == 1
    context = multiprocessing.get_context("fork" if fork else "spawn")
    return ProcessPoolExecutor(workers, mp_context=context, initializer=initializer,
                               initargs=initargs)
