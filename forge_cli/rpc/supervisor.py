"""The split engine's child process: `python -m forge_cli.rpc.child` running the model with the
layer peers as ggml RPC devices, spoken to over a socket pair (requests in; start, text, done
and error messages out). A child is started, read until its socket closes, and killed here;
what its death means (which peer was lost, which requests fail) is the split engine's."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from forge_cli import errors
from forge_cli.errors import ForgeError, ModelError

LOAD_TIMEOUT_S = 600


class ChildProcess:
    """One engine child and its connection (see the module docstring)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None
        self.conn: Connection | None = None

    def start(self, config: dict[str, Any], *, death_reason: Callable[[], str],
              refusal: Callable[[], ForgeError | None]) -> dict[str, Any]:
        """Start a child loading `config` and wait for it: what it reports of the loaded model
        (n_ctx, slots, the layers' placement, …). When it fails to load, the error is a
        peer's `refusal` if one said no, else the child's own (its `death_reason` if it died)."""
        ours, theirs = socket.socketpair()
        env = {**os.environ, "GGML_NO_BACKTRACE": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "forge_cli.rpc.child", str(theirs.fileno())],
            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            env=env)
        theirs.close()
        conn = Connection(ours.detach())
        conn.send(("load", config))
        if not conn.poll(LOAD_TIMEOUT_S):
            self.kill()
            raise ModelError(f"the engine for {self.name} did not load within {LOAD_TIMEOUT_S} s")
        try:
            reply = conn.recv()
        except (EOFError, OSError):
            reply = ("failed", "ModelError", death_reason())
        if reply[0] != "ready":
            self.kill()
            refused = refusal()
            if refused is not None:  # a peer said no: that is the reason, not a broken model
                raise errors.TunnelRefused(f"the split engine for {self.name} could not load: "
                                           f"{refused.message}")
            raise error_class(reply[1])(f"the split engine for {self.name} could not load: "
                                        f"{reply[2]}")
        self.conn = conn
        return dict(reply[1])

    def pid(self) -> int | None:
        """The running child's pid (the one process the tunnels' loopback ports serve)."""
        proc = self.proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def send(self, msg: tuple[Any, ...]) -> None:
        """A message to the child; lost when it is gone (its reader then tells of its death)."""
        try:
            if self.conn is not None:
                self.conn.send(msg)
        except (OSError, ValueError):
            pass

    def end_now(self) -> None:
        """Kill the child without waiting (safe on an event loop)."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.kill()

    def kill(self) -> None:
        """Kill the child and wait for it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def close(self, timeout: float = 30) -> None:
        """Ask the child to close, and kill it if it has not within `timeout` seconds."""
        self.send(("close",))
        if self.proc is not None:
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def read(self, on_message: Callable[[tuple[Any, ...]], None],
             on_end: Callable[[subprocess.Popen[bytes]], None]) -> None:
        """Read the current child's messages on a thread of their own until its socket
        closes, then `on_end(proc)`."""
        conn, proc = self.conn, self.proc
        assert conn is not None and proc is not None, "read() follows a start() that loaded"

        def run() -> None:
            while True:
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    break
                on_message(msg)
            conn.close()
            on_end(proc)

        threading.Thread(target=run, name="forge-rpc-child", daemon=True).start()


def reap(proc: subprocess.Popen[bytes], timeout: float = 10) -> int:
    """The exit code of a child that is ending (killed if it has not within `timeout`)."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def error_class(name: str) -> type[ForgeError]:
    """The ForgeError the child named (ModelError for a name that is not one)."""
    cls = getattr(errors, name, ModelError)
    return cls if isinstance(cls, type) and issubclass(cls, ForgeError) else ModelError


def exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


__all__ = ["LOAD_TIMEOUT_S", "ChildProcess", "error_class", "exit_text", "reap"]
