"""A real `forge node` in a subprocess on 127.0.0.1 (ephemeral port), and helpers to use it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.conftest import REPO, forge_env

START_TIMEOUT = 60


class NodeProcess:
    ANNOUNCE = "forge node listening on "  # the line that names the URL once it listens

    def __init__(self, home: Path, model: Path | None, *extra: str,
                 env: dict[str, str] | None = None, log: Path | None = None,
                 prefix: tuple[str, ...] = ()) -> None:
        """`log`: a file that receives the node's stderr (its log lines); discarded without.
        `prefix` runs the command under another (`ip netns exec NS`)."""
        self.home = home
        self._log = log.open("w") if log is not None else None
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "forge_cli", *self.command(model), *extra],
            stdout=subprocess.PIPE, stderr=self._log or subprocess.DEVNULL, text=True, cwd=REPO,
            env=forge_env(home, **(env or {})),
        )
        self.lines: list[str] = []  # what it printed up to the URL
        self.url = self._wait_for_url()
        self.operator_token = (home / "api_token").read_text().strip()

    def command(self, model: Path | None) -> list[str]:
        return ["node", "-m", str(model), "--port", "0"]

    def _wait_for_url(self) -> str:
        assert self.proc.stdout is not None
        # readline blocks: a process that neither announces nor exits is killed at the
        # deadline, so its pipe closes and the wait ends (never a test hung for good).
        watchdog = threading.Timer(START_TIMEOUT, self.proc.kill)
        watchdog.daemon = True
        watchdog.start()
        try:
            while True:
                line = self.proc.stdout.readline()
                if not line:
                    code = self.proc.wait()
                    if not watchdog.is_alive():
                        raise RuntimeError(f"{self.command(None)[0]} did not start within "
                                           f"{START_TIMEOUT} s; it said: {''.join(self.lines)}")
                    raise RuntimeError(f"{self.command(None)[0]} exited with {code} before "
                                       "listening")
                self.lines.append(line)
                # `in`, not startswith: a layer peer's ggml server writes to the same stdout
                # through C's own buffer, and its text may land in front of the announcement.
                if self.ANNOUNCE in line:
                    return line.split()[-1]
        finally:
            watchdog.cancel()

    def request(self, method: str, path: str, body: Any = None, token: str | None = None,
                raw: bytes | None = None, headers: dict[str, str] | None = None
                ) -> tuple[int, dict[str, str], Any]:
        """(status, headers, parsed JSON or text) — never raises on HTTP errors."""
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None
                                            else None)
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        for key, value in (headers or {}).items():
            req.add_header(key, value)
        try:
            with urllib.request.urlopen(req, timeout=120) as response:
                status, head, payload = response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as err:
            status, head, payload = err.code, dict(err.headers), err.read()
        text = payload.decode("utf-8", errors="replace")
        try:
            return status, head, json.loads(text)
        except ValueError:
            return status, head, text

    def agent(self, name: str) -> dict[str, str]:
        """Create a consumer account with `forge wallet agent create` (works while running)."""
        done = subprocess.run([sys.executable, "-m", "forge_cli", "wallet", "agent", "create", name,
                               "--json"], capture_output=True, text=True, cwd=REPO,
                              env=forge_env(self.home), timeout=60)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
        try:
            return self.proc.wait(timeout=60)
        finally:
            for stream in (self.proc.stdout, self.proc.stderr, self._log):
                if stream:
                    stream.close()

    def __enter__(self) -> NodeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
