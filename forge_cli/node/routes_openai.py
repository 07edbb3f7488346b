"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models.

Each request is quoted and reserved before generation, and settled as a dual-signed trade
after it (for the tokens actually produced); the response carries `x_forge`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from forge_cli.errors import ForgeError, KillSwitchActive
from forge_cli.inference.requests import parse_messages, parse_sampling, valid_text
from forge_cli.node.throttle import Sender
from forge_cli.node.web import (
    NODE,
    REJECTS,
    STREAMING,
    TRADE_LOG,
    WHO,
    Route,
    bad_request,
    error_body,
    field,
    read_json,
    sse,
)
from forge_cli.trade import forwarding
from forge_cli.trade.session import Settled, Source, Starter, TradeSession, request_bytes

if TYPE_CHECKING:
    from forge_cli.economy.accounts import Resolved as Who
    from forge_cli.root.node import Node

FORWARD_MAX_TOKENS = 32_768  # a peer checks against its own context


@dataclass
class Order:
    """A request, fully checked before anything is quoted or reserved."""

    body: dict[str, Any]
    chat: bool
    model: str | None
    stream: bool
    sampling: Any
    messages: list[dict[str, str]] | None
    prompt: str | None
    request: bytes

    @property
    def prompt_bytes(self) -> int:
        """The UTF-8 size of the text the prompt is made of (messages' contents, or the raw
        prompt): every template writes each content into the prompt, so past the model's
        bound the prompt cannot fit, and it is refused before any rendering or tokenizing."""
        if self.messages is not None:
            return sum(len(m["content"].encode("utf-8")) for m in self.messages)
        return len((self.prompt or "").encode("utf-8"))

    @property
    def what(self) -> str:
        return "the conversation" if self.chat else "the prompt"


def _order(body: dict[str, Any], *, chat: bool, n_ctx: int) -> Order:
    """Every field checked, so bad input is a 400 before the market or a balance moves."""
    name = field(body, "model", str, default=None)
    stream = field(body, "stream", bool, default=False)
    messages = parse_messages(body) if chat else None
    prompt = None if chat else valid_text(field(body, "prompt", str, required=True), "prompt")
    sampling = parse_sampling(body, n_ctx)
    for stop in sampling.stop:
        valid_text(stop, "stop")
    try:
        raw = request_bytes(body)
    except UnicodeEncodeError as exc:
        raise bad_request(f"the request is not valid Unicode text: {exc.reason}") from None
    return Order(body, chat, name, stream, sampling, messages, prompt, raw)


async def models(request: web.Request) -> web.Response:
    node = request.app[NODE]
    return web.json_response({"object": "list",
                              "data": [m.describe() for m in node.models.values()]})


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, chat=True)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, chat=False)


async def _complete(request: web.Request, *, chat: bool) -> web.StreamResponse:
    """A purchase; refused ones count toward the account's throttle, which is checked before
    the body is read."""
    who = request[WHO]
    with Sender(request.app[REJECTS], f"account:{who.account_hex}", f"account {who.name}"):
        return await _purchase(request, who, chat=chat)


async def _purchase(request: web.Request, who: Who, *, chat: bool) -> web.StreamResponse:
    node = request.app[NODE]
    body = await read_json(request)
    name = field(body, "model", str, default=None)
    if chat and name and name not in node.models and node.mesh is not None:
        order = _order(body, chat=True, n_ctx=FORWARD_MAX_TOKENS)
        forward = await forwarding.forward(node, who, name, order.sampling.max_tokens,
                                           order.request)
        s = order.sampling
        payload = {"messages": order.messages, "temperature": s.temperature, "top_p": s.top_p,
                   **({"seed": s.seed} if s.seed is not None else {}),
                   **({"stop": list(s.stop)} if s.stop else {})}
        async def forwarded() -> Source:
            return forward.start(node, payload)

        return await _serve(request, node, order, forward.session, forwarded, name,
                            forward.served_by)
    model = node.model(name)
    order = _order(body, chat=chat, n_ctx=model.engine.n_ctx)
    model.engine.check_prompt_bytes(order.prompt_bytes, order.what)
    if order.sampling.grammar is not None:
        model.engine.check_grammar(order.sampling.grammar)
    session = node.buyer_session(who, model=model, max_tokens=order.sampling.max_tokens,
                                 request=order.request)

    async def start() -> Source:
        if chat:
            return await node.pump(
                lambda: model.engine.chat(order.messages, order.sampling, block=False))
        return await node.pump(
            lambda: model.engine.generate(order.prompt, order.sampling, block=False))

    return await _serve(request, node, order, session, start, model.name, None)


async def _serve(request: web.Request, node: Node, order: Order, session: TradeSession,
                 start: Starter, name: str,
                 served_by: Callable[[], dict[str, Any]] | None) -> web.StreamResponse:
    """Generate and settle through the session: a local engine or a peer's reply."""
    if order.stream:
        return await _stream(request, node, order, session, start, name, served_by)
    async with session:
        async for _ in session.run(await start()):
            pass
        if session.killed:  # also when it came between the last token and the trade
            raise KillSwitchActive("kill switch: activated while this request was "
                                   "generating; it stops and nothing is charged",
                                   gate="kill_switch")
        settled = await session.settle()
    completion = session.completion
    node.observe(completion)
    request[TRADE_LOG] = {"model": name, "cu": settled.cu,
                          "tokens": completion.completion_tokens if completion else 0}
    return web.json_response(_full_response(order.body, name, completion, session.text,
                                            _x_forge(settled, served_by), order.chat))


def _x_forge(settled: Settled, served_by: Callable[[], dict[str, Any]] | None) -> dict[str, Any]:
    x_forge = settled.x_forge()
    if served_by is not None:
        x_forge["served_by"] = served_by()
    return x_forge


def _usage(completion: Any) -> dict[str, int]:
    prompt = completion.prompt_tokens if completion else 0
    done = completion.completion_tokens if completion else 0
    return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}


def _finish(completion: Any) -> str:
    reason = completion.finish_reason if completion else "stop"
    return "length" if reason == "length" else "stop"


def _full_response(body: dict[str, Any], model: str, completion: Any, text: str,
                   x_forge: dict[str, Any], chat: bool) -> dict[str, Any]:
    created = int(time.time())
    if chat:
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
                "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": _finish(completion), "logprobs": None}],
                "usage": _usage(completion), "x_forge": x_forge}
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": created,
            "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": _finish(completion),
                         "logprobs": None}],
            "usage": _usage(completion), "x_forge": x_forge}


async def _stream(request: web.Request, node: Node, order: Order, session: TradeSession,
                  start: Starter, name: str,
                  served_by: Callable[[], dict[str, Any]] | None) -> web.StreamResponse:
    """Server-sent events in OpenAI's chunk format; x_forge rides on the last chunk.

    Once the stream has begun, an error is told as an SSE error event: a streamed response
    never carries a second HTTP response in its body."""
    chat = order.chat
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
    ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())

    def chunk(delta: dict[str, Any] | str, finish: str | None, **extra: Any) -> bytes:
        if chat:
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": delta, "finish_reason": finish, "logprobs": None}
            obj = "text_completion"
        data = {"id": ident, "object": obj, "created": created, "model": name,
                "choices": [choice], **extra}
        return sse(data)

    try:
        async with session:
            # Started before the stream begins: a prompt refused (too long, a full queue) is
            # an HTTP error, not an event inside a 200.
            source = await start()
            request[STREAMING] = response
            await response.prepare(request)
            if chat:
                await response.write(chunk({"role": "assistant", "content": ""}, None))
            async for piece in session.run(source):
                await response.write(chunk({"content": piece} if chat else piece, None))
            if session.killed:
                raise KillSwitchActive("kill switch: activated while this stream was running; "
                                       "the stream stops and nothing is charged")
            settled = await session.settle()
            completion = session.completion
            await response.write(chunk({} if chat else "", _finish(completion),
                                       usage=_usage(completion),
                                       x_forge=_x_forge(settled, served_by)))
    except ForgeError as exc:
        if not response.prepared:
            raise
        await response.write(sse({"error": error_body(exc)}))
    finally:
        completion = session.completion
        node.observe(completion)
        request[TRADE_LOG] = {"model": name,
                              "cu": session.settled.cu if session.settled else 0,
                              "tokens": completion.completion_tokens if completion else 0}
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


ROUTES = [
    Route("GET", "/v1/models", models, "Models this node serves"),
    Route("POST", "/v1/chat/completions", chat_completions,
          "Chat completion (OpenAI-compatible; stream with SSE); every call is a trade"),
    Route("POST", "/v1/completions", completions,
          "Text completion (OpenAI-compatible; stream with SSE); every call is a trade"),
]
