"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models.

Each request is quoted and reserved before generation, and settled as a dual-signed trade
after it (for the tokens actually produced); the response carries `x_forge`. A chat that
offers tools has its reply read for calls (forge_cli.inference.tools.CallReader) and told as
`message.tool_calls`, or streamed as OpenAI's tool-call deltas.
"""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Any

from aiohttp import web

from forge_cli.errors import ForgeError
from forge_cli.inference.tools import Call, CallReader, read_reply
from forge_cli.node.sale import Sale, open_sale
from forge_cli.node.throttle import Sender
from forge_cli.node.web import NODE, REJECTS, STREAMING, WHO, Route, error_body, read_json, sse

if TYPE_CHECKING:
    from forge_cli.economy.accounts import Resolved as Who

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
    sale = await open_sale(request, who, await read_json(request), chat=chat)
    if sale.order.stream:
        return await _stream(request, sale)
    session = sale.session
    async with session:
        async for _ in sale.run(await sale.start()):
            pass
        settled = await sale.settle()
    sale.record(request)
    return web.json_response(_full_response(sale, session.completion, session.text,
                                            sale.x_forge(settled)))


def _usage(completion: Any) -> dict[str, int]:
    prompt = completion.prompt_tokens if completion else 0
    done = completion.completion_tokens if completion else 0
    return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}


def _finish(completion: Any, calls: bool = False) -> str:
    """OpenAI's finish_reason: "tool_calls" when the reply made calls and ended by itself."""
    reason = completion.finish_reason if completion else "stop"
    if reason == "length":
        return "length"
    return "tool_calls" if calls else "stop"


def _full_response(sale: Sale, completion: Any, text: str,
                   x_forge: dict[str, Any]) -> dict[str, Any]:
    created, model = int(time.time()), sale.name
    if sale.order.chat:
        message: dict[str, Any] = {"role": "assistant", "content": text}
        calls = []
        if sale.order.calls:
            reply = read_reply(text)
            calls = reply.calls
            if calls:
                message = {"role": "assistant", "content": reply.text or None,
                           "tool_calls": [_call(call) for call in calls]}
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
                "created": created, "model": model,
                "choices": [{"index": 0, "message": message,
                             "finish_reason": _finish(completion, bool(calls)),
                             "logprobs": None}],
                "usage": _usage(completion), "x_forge": x_forge}
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": created,
            "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": _finish(completion),
                         "logprobs": None}],
            "usage": _usage(completion), "x_forge": x_forge}


def _call(call: Call) -> dict[str, Any]:
    return {"id": call.id, "type": "function",
            "function": {"name": call.name, "arguments": call.arguments}}


def _deltas(events: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
    """OpenAI's chunk deltas for what a CallReader read: prose as content; a call's first
    delta with its index, id, type, name and empty arguments, then its arguments in pieces."""
    out: list[dict[str, Any]] = []
    for event in events:
        if event[0] == "text":
            out.append({"content": event[1]})
        elif event[0] == "call":
            call = event[1]
            out.append({"tool_calls": [{"index": call.index, "id": call.id, "type": "function",
                                        "function": {"name": call.name, "arguments": ""}}]})
        else:
            out.append({"tool_calls": [{"index": event[1].index,
                                        "function": {"arguments": event[2]}}]})
    return out


async def _stream(request: web.Request, sale: Sale) -> web.StreamResponse:
    """Server-sent events in OpenAI's chunk format; x_forge rides on the last chunk.

    Once the stream has begun, an error is told as an SSE error event: a streamed response
    never carries a second HTTP response in its body."""
    chat, name, session = sale.order.chat, sale.name, sale.session
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
    ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())
    reader = CallReader() if sale.order.calls else None  # the reply read for tool calls

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
            source = await sale.start()
            request[STREAMING] = response
            await response.prepare(request)
            if chat:
                await response.write(chunk({"role": "assistant", "content": ""}, None))
            async for piece in sale.run(source):
                if reader is None:
                    await response.write(chunk({"content": piece} if chat else piece, None))
                    continue
                for delta in _deltas(reader.feed(piece)):
                    await response.write(chunk(delta, None))
            if reader is not None:  # what was held back (text that might have begun a call)
                for delta in _deltas(reader.end()):
                    await response.write(chunk(delta, None))
            settled = await sale.settle(streaming=True)
            completion = session.completion
            calls = reader is not None and bool(reader.calls)
            await response.write(chunk({} if chat else "", _finish(completion, calls),
                                       usage=_usage(completion),
                                       x_forge=sale.x_forge(settled)))
    except ForgeError as exc:
        if not response.prepared:
            raise
        await response.write(sse({"error": error_body(exc)}))
    finally:
        sale.record(request)
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
