"""The one node client, sync and async, against a real node: both stream the same chat, both
raise the same ForgeError for the same error, and a broken stream is a clear error.

The malformed answers come from a small aiohttp server on 127.0.0.1 that misbehaves on
purpose, since a forge node never sends them.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from forge_cli import errors
from forge_cli.client import AsyncClient, Client, error_from
from forge_cli.errors import (
    BadResponse,
    ForgeError,
    InsufficientCU,
    KillSwitchActive,
    NodeUnreachable,
    TokenRefused,
    UsageError,
)
from tests.app_thread import AppThread
from tests.node_harness import NodeProcess

CHAT = "/v1/chat/completions"


def chat(max_tokens: int, **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "tell me a story"}],
            "max_tokens": max_tokens, "temperature": 0, "seed": 7, **extra}


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path) -> Iterator[NodeProcess]:
    with NodeProcess(tmp_path_factory.mktemp("client") / "home", tiny_gguf,
                     env={"FORGE_SAFETY_BREAKER_SPENDS_PER_MINUTE": "1000"}) as running:
        yield running


@pytest.fixture(scope="module")
def bob(node: NodeProcess) -> dict[str, str]:
    return node.agent("bob")


def sync_stream(client: Client, payload: dict[str, Any]) -> list[dict[str, Any]]:
    return list(client.stream_chat(payload))


async def async_stream(client: AsyncClient, payload: dict[str, Any]) -> list[dict[str, Any]]:
    try:
        return [e.data async for e in client.stream(CHAT, {**payload, "stream": True})]
    finally:
        await client.close()


def text_of(chunks: list[dict[str, Any]]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


async def test_sync_and_async_clients_stream_the_same_paid_chat(node, bob):
    sync_chunks = sync_stream(Client(node.url, bob["token"]), chat(12))
    async_chunks = await async_stream(AsyncClient(node.url, bob["token"], timeout=120), chat(12))
    assert text_of(sync_chunks) and text_of(sync_chunks) == text_of(async_chunks)
    first, second = sync_chunks[-1]["x_forge"], async_chunks[-1]["x_forge"]
    assert first["cu_cost"] > 0 and second["cu_cost"] > 0
    assert second["trade_seq"] > first["trade_seq"]  # two trades, each paid
    assert second["balance"] == first["balance"] - second["cu_cost"]


async def both_raise(node: NodeProcess, token: str, method: str, path: str,
                     body: Any = None) -> tuple[ForgeError, ForgeError]:
    """The error the sync client and the async client raise for the same request."""
    sync, async_ = Client(node.url, token), AsyncClient(node.url, token, timeout=120)
    try:
        with pytest.raises(ForgeError) as one:
            if body is not None and body.get("stream"):
                sync_stream(sync, body)
            else:
                sync.call(method, path, body)
        with pytest.raises(ForgeError) as other:
            if body is not None and body.get("stream"):
                await async_stream(async_, body)
            else:
                await async_.call(method, path, body)
    finally:
        await async_.close()
    assert type(one.value) is type(other.value) and str(one.value) == str(other.value)
    return one.value, other.value


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_quote_above_the_balance_is_insufficient_cu_from_both(node, stream):
    carol = node.agent(f"carol-{int(stream)}")
    error, _ = await both_raise(node, carol["token"], "POST", CHAT, chat(4000, stream=stream))
    assert isinstance(error, InsufficientCU) and error.gate == "balance"
    assert error.exit_code == 1 and "below the quote" in error.message
    assert error.status == 402  # type: ignore[attr-defined]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_kill_switch_is_kill_switch_active_from_both(node, bob, stream):
    operator = Client(node.url, node.operator_token)
    operator.post("/v1/forge/kill", {"activate": True, "reason": "client test"})
    try:
        error, _ = await both_raise(node, bob["token"], "POST", CHAT, chat(4, stream=stream))
    finally:
        operator.post("/v1/forge/kill", {"activate": False, "reason": "client test over"})
    assert isinstance(error, KillSwitchActive) and error.gate == "kill_switch"
    assert error.exit_code == 1 and error.status == 423  # type: ignore[attr-defined]


def test_kill_switch_mid_stream_raises_kill_switch_active_from_the_error_event(node, bob):
    operator = Client(node.url, node.operator_token)
    pieces = []
    try:
        with pytest.raises(KillSwitchActive) as raised:
            for chunk in Client(node.url, bob["token"]).stream_chat(chat(900)):
                pieces.append(chunk)
                if len(pieces) == 1:  # generation is under way
                    operator.post("/v1/forge/kill", {"activate": True, "reason": "mid-stream"})
    finally:
        operator.post("/v1/forge/kill", {"activate": False, "reason": "over"})
    assert pieces and not any("x_forge" in p for p in pieces)
    assert raised.value.gate == "kill_switch" and raised.value.status is None  # type: ignore[attr-defined]


async def test_async_kill_switch_mid_stream_raises_the_same_class(node, bob):
    operator = AsyncClient(node.url, node.operator_token, timeout=60)
    client = AsyncClient(node.url, bob["token"], timeout=120)
    pieces = []
    try:
        with pytest.raises(KillSwitchActive):
            async for event in client.stream(CHAT, chat(900, stream=True)):
                pieces.append(event.data)
                if len(pieces) == 1:
                    await operator.post("/v1/forge/kill", {"activate": True, "reason": "mid"})
    finally:
        await operator.post("/v1/forge/kill", {"activate": False, "reason": "over"})
        await operator.close()
        await client.close()
    assert pieces and not any("x_forge" in p for p in pieces)


async def test_a_refused_token_is_token_refused_from_both(node):
    error, _ = await both_raise(node, "not-a-token", "GET", "/v1/forge/balance")
    assert isinstance(error, TokenRefused) and error.exit_code == 2


async def test_a_missing_route_is_a_usage_error_and_optional_reads_give_none(node, bob):
    error, _ = await both_raise(node, bob["token"], "GET", "/v1/forge/nowhere")
    assert type(error) is UsageError and error.status == 404  # type: ignore[attr-defined]
    client = AsyncClient(node.url, bob["token"])
    try:
        assert await client.get_optional("/v1/forge/nowhere") is None
        assert (await client.get_optional("/v1/forge/balance"))["account"] == bob["account"]
    finally:
        await client.close()


async def test_no_node_at_the_url_is_node_unreachable_from_both():
    with socket.socket() as sock:  # a port nobody listens on once this closes
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with pytest.raises(NodeUnreachable, match="no forge node answers at"):
        Client(url).get("/health")
    client = AsyncClient(url)
    try:
        with pytest.raises(NodeUnreachable, match="no forge node answers at"):
            await client.get("/health")
        with pytest.raises(NodeUnreachable, match="no forge node answers at"):
            [e async for e in client.stream("/v1/forge/events", until_done=False)]
    finally:
        await client.close()


def test_a_url_that_is_not_http_is_a_usage_error():
    for url in ("ftp://example.org", "http://", "http://127.0.0.1:port"):
        with pytest.raises(UsageError):
            Client(url)
        with pytest.raises(UsageError):
            AsyncClient(url)


def instance(cls: type[ForgeError]) -> ForgeError:
    if issubclass(cls, errors.ApprovalRequired):
        return cls("needs a person", approval_id="ap_1")  # type: ignore[call-arg]
    if issubclass(cls, errors.LendingDenied):
        return cls("pool rule", gate="reserve")  # type: ignore[call-arg]
    return cls("it went wrong", hint="do this")


@pytest.mark.parametrize("cls", [c for c in vars(errors).values()
                                 if isinstance(c, type) and issubclass(c, ForgeError)],
                         ids=lambda c: c.__name__)
def test_every_error_the_node_sends_comes_back_as_its_own_class(cls):
    from forge_cli.node.web import error_body

    sent = instance(cls)
    body = error_body(sent)
    for status in (sent.http_status, None):  # a JSON answer, and an error event in a stream
        got = error_from(body, status)
        assert type(got) is cls and got.exit_code == sent.exit_code
        assert got.message == f"node: {body['message']}"
        if isinstance(sent, errors.SpendDenied):
            assert got.gate == sent.gate  # type: ignore[attr-defined]


class Misbehaving:
    """An aiohttp server on 127.0.0.1, in a thread, whose routes break the API's promises."""

    def __init__(self) -> None:
        from aiohttp import web

        async def stream(request: web.Request, lines: list[bytes], cut: bool = False
                         ) -> web.StreamResponse:
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            for line in lines:
                await response.write(line)
            if cut:  # the connection dies in the middle of the chunked body
                assert request.transport is not None
                request.transport.close()
                return response
            await response.write_eof()
            return response

        good = b'data: {"choices": [], "n": 1}\n\n'
        routes = {
            "/not-json-data": [good, b"data: {not json\n\n", b"data: [DONE]\n\n"],
            "/garbage-line": [good, b"this is not an event stream\n\n", b"data: [DONE]\n\n"],
            "/no-done": [good],
            "/half-event": [good, b'data: {"choices": []'],
            "/cut": [good],
        }

        async def handle(request: web.Request) -> web.StreamResponse:
            if request.path == "/plain":
                return web.Response(text="<html>not an API</html>")
            if request.path == "/html-error":
                return web.Response(status=502, text="<html>bad gateway</html>")
            return await stream(request, routes[request.path], cut=request.path == "/cut")

        def make() -> web.Application:
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", handle)
            return app

        self.served = AppThread(make)
        self.url = self.served.url

    def close(self) -> None:
        self.served.close()


@pytest.fixture(scope="module")
def bad_server() -> Iterator[Misbehaving]:
    server = Misbehaving()
    yield server
    server.close()


BROKEN = [("/not-json-data", "data is not JSON"), ("/garbage-line", "malformed event-stream line"),
          ("/no-done", r"before \[DONE\]"), ("/half-event", "in the middle of an event"),
          # http.client reads a chunked body cut short as its end; aiohttp says it broke off
          ("/cut", r"broke off|before \[DONE\]")]


@pytest.mark.parametrize(("path", "says"), BROKEN, ids=[p for p, _ in BROKEN])
async def test_a_broken_stream_is_bad_response_from_both_after_the_good_events(bad_server,
                                                                             path, says):
    seen = []
    with pytest.raises(BadResponse, match=says):
        for event in Client(bad_server.url).stream(path, {"stream": True}):
            seen.append(event.data)
    assert seen == [{"choices": [], "n": 1}]
    client = AsyncClient(bad_server.url)
    seen = []
    try:
        with pytest.raises(BadResponse, match=says):
            async for event in client.stream(path, {"stream": True}):
                seen.append(event.data)
    finally:
        await client.close()
    assert seen == [{"choices": [], "n": 1}]
    assert BadResponse("x").exit_code == 2


async def test_an_answer_that_is_not_json_is_bad_response_and_an_html_error_keeps_its_status(
        bad_server):
    client = AsyncClient(bad_server.url)
    try:
        for call in (lambda: Client(bad_server.url).get("/plain"), lambda: client.get("/plain")):
            with pytest.raises(BadResponse, match="not JSON"):
                result = call()
                if asyncio.iscoroutine(result):
                    await result
        error, _ = await both_raise_at(bad_server.url, client, "/html-error")
    finally:
        await client.close()
    assert type(error) is errors.NodeError and "HTTP 502" in error.message


async def both_raise_at(url: str, client: AsyncClient, path: str) -> tuple[ForgeError, ForgeError]:
    with pytest.raises(ForgeError) as one:
        Client(url).get(path)
    with pytest.raises(ForgeError) as other:
        await client.get(path)
    assert type(one.value) is type(other.value) and str(one.value) == str(other.value)
    return one.value, other.value


# -- structure: one SSE reader, one error map, no private helper used across modules ---------

SOURCES = ("forge_cli", "tui")


def python_files(*roots: str) -> list[Path]:
    from tests.conftest import REPO

    return sorted(p for root in roots for p in (REPO / root).rglob("*.py"))


READERS = ("[DONE]", '"data:', "'data:", 'get("error", {})', "get('error', {})",
           'get("error"), dict)', "get('error'), dict)", '["error"].get("message"',
           "['error'].get('message'", '["error"]["message"]')


def stream_or_envelope_readers(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    return [f"{path.name}: {needle}" for needle in READERS if needle in text]


def test_only_the_client_reads_event_streams_and_error_envelopes(tmp_path: Path):
    # The node writes both (node/); all that reads them goes through forge_cli/client.py.
    from tests.conftest import REPO

    client = REPO / "forge_cli" / "client.py"
    found = [hit for p in python_files(*SOURCES) if p.parent != REPO / "forge_cli" / "node"
             and p != client for hit in stream_or_envelope_readers(p)]
    assert found == []
    planted = tmp_path / "planted.py"  # the old buyer's and gossip's shapes are found
    planted.write_text('if body == "[DONE]": pass\nif isinstance(d.get("error"), dict): pass\n'
                       "msg = answer.get('error', {}).get('message')\n", encoding="utf-8")
    assert len(stream_or_envelope_readers(planted)) == 3


def private_imports(path: Path) -> list[str]:
    """`from m import _x` and `m._x` where m is an imported module of this repo."""
    import ast

    tree = ast.parse(path.read_text(encoding="utf-8"))
    modules: set[str] = set()
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module != "__future__":
            ours = node.module.split(".")[0] in ("forge_cli", "tui", "tests", "bench")
            for alias in node.names:
                if ours:
                    modules.add(alias.asname or alias.name)
                if ours and alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{path.name}:{node.lineno} from {node.module} import {alias.name}")
        elif isinstance(node, ast.Import):
            modules.update((a.asname or a.name).split(".")[0] for a in node.names
                           if a.name.split(".")[0] in ("forge_cli", "tui", "tests", "bench"))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in modules and node.attr.startswith("_")
                and not node.attr.startswith("__")):
            found.append(f"{path.name}:{node.lineno} {node.value.id}.{node.attr}")
    return found


def test_no_private_helper_is_imported_across_modules(tmp_path: Path):
    found = [hit for p in python_files(*SOURCES, "tests", "bench") for hit in private_imports(p)]
    assert found == []
    planted = tmp_path / "planted.py"  # the check finds both shapes
    planted.write_text("from forge_cli.node.web import _kind\nfrom forge_cli.cli import docs\n"
                       "docs._roff_paragraphs('x')\n", encoding="utf-8")
    assert len(private_imports(planted)) == 2
