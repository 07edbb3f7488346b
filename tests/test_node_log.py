"""The node log keeps the README's promise: one line per request, even when the client hangs up
in the middle of a stream (no aiohttp traceback), against a real node process."""

from __future__ import annotations

import json
import socket
import struct
import time
import urllib.parse
from pathlib import Path

import pytest

from tests.node_harness import NodeProcess

CHAT = "/v1/chat/completions"
WAIT_S = 60


@pytest.fixture
def node(tmp_path: Path, tiny_gguf: Path):
    with NodeProcess(tmp_path / "home", tiny_gguf, log=tmp_path / "node.log") as running:
        running.log = tmp_path / "node.log"
        yield running


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8", errors="replace").splitlines()


def _wait_for_line(path: Path, needle: str, after: int) -> list[str]:
    """The log's lines after line `after`, once one of them contains `needle`."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        new = _lines(path)[after:]
        if any(needle in line for line in new):
            return new
        time.sleep(0.1)
    raise AssertionError(f"no log line with {needle!r} in {WAIT_S} s:\n" + "\n".join(new))


def test_client_hanging_up_mid_stream_logs_one_line_and_no_traceback(node):
    consumer = node.agent("hana")["token"]
    status, _, body = node.request("POST", CHAT, token=consumer, body={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})  # the free tier
    assert status == 200, body
    before = len(_lines(node.log))

    url = urllib.parse.urlsplit(node.url)
    payload = json.dumps({"messages": [{"role": "user", "content": "a very long story"}],
                          "max_tokens": 900, "temperature": 0, "stream": True}).encode()
    with socket.create_connection((url.hostname, url.port), timeout=WAIT_S) as sock:
        sock.sendall(f"POST {CHAT} HTTP/1.1\r\nHost: {url.netloc}\r\n"
                     f"Authorization: Bearer {consumer}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        received = b""
        while b"data: {" not in received:  # the stream began: read a little, then hang up
            chunk = sock.recv(256)
            assert chunk, received
            received += chunk
        assert received.startswith(b"HTTP/1.1 200"), received
        # SO_LINGER 0: close with a reset, as a client that is killed or loses its network.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    _wait_for_line(node.log, f"POST {CHAT}", before)
    # A later request's line: anything the hang-up logs comes before it.
    assert node.request("GET", "/v1/forge/balance", token=consumer)[0] == 200
    new = _wait_for_line(node.log, "GET /v1/forge/balance", before)
    text = "\n".join(new)
    assert "Traceback" not in text and "Error handling request" not in text, text
    hung = [line for line in new if "/v1/forge/balance" not in line]
    assert len(hung) == 1, text
    assert f"POST {CHAT}" in hung[0] and "status=499" in hung[0], text
    status, _, held = node.request("GET", "/v1/forge/balance", token=consumer)
    assert status == 200 and held["reserved"] == 0, held  # the reservation did not outlive it
