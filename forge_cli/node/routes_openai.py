"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models.

Each request is quoted and reserved before generation, and settled as a dual-signed trade
after it (for the tokens actually produced); the response carries `x_forge`.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

from aiohttp import web

from forge_cli.errors import EngineBusy, KillSwitchActive
from forge_cli.node.service import Node, request_bytes
from forge_cli.node.web import NODE, Route, bad_request, field, read_json

ROLES = ("system", "user", "assistant")
FORWARD_MAX_TOKENS = 32_768  # a peer checks against its own context


def _sampling(body: dict[str, Any], node_ctx: int) -> Any:
    from forge_cli.inference.engine import Sampling

    max_tokens = field(body, "max_tokens", int, default=None)
    if max_tokens is None:
        max_tokens = field(body, "max_completion_tokens", int, default=256)
    if not 1 <= max_tokens <= node_ctx:
        raise bad_request(f"max_tokens must be between 1 and {node_ctx}, found {max_tokens}")
    temperature = field(body, "temperature", (int, float), default=0.7)
    if not 0 <= temperature <= 2:
        raise bad_request(f"temperature must be between 0 and 2, found {temperature}")
    top_p = field(body, "top_p", (int, float), default=0.95)
    if not 0 < top_p <= 1:
        raise bad_request(f"top_p must be in (0, 1], found {top_p}")
    seed = field(body, "seed", int, default=None)
    if seed is not None and not 0 <= seed < 2**32:
        raise bad_request(f"seed must be between 0 and 2**32 - 1, found {seed}")
    stop = field(body, "stop", (str, list), default=())
    if isinstance(stop, str):
        stop = (stop,)
    if len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise bad_request("stop must be a non-empty string or a list of up to 4 of them")
    return Sampling(max_tokens=max_tokens, temperature=float(temperature), top_p=float(top_p),
                    seed=seed, stop=tuple(stop))


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    messages = field(body, "messages", list, required=True)
    if not messages:
        raise bad_request("messages must not be empty")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad_request(f"messages[{i}] must be an object")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise bad_request(f"messages[{i}].role must be one of {', '.join(ROLES)}, "
                              f"found {role!r}")
        if isinstance(content, list):  # the content-parts form: text parts only
            try:
                content = "".join(p["text"] for p in content if p.get("type") == "text")
            except (TypeError, KeyError, AttributeError):
                raise bad_request(f"messages[{i}].content parts must be text parts") from None
        if not isinstance(content, str):
            raise bad_request(f"messages[{i}].content must be a string")
        out.append({"role": role, "content": content})
    return out


async def models(request: web.Request) -> web.Response:
    node: Node = request.app[NODE]
    return web.json_response({"object": "list",
                              "data": [m.describe() for m in node.models.values()]})


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, chat=True)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, chat=False)


async def _complete(request: web.Request, *, chat: bool) -> web.StreamResponse:
    node: Node = request.app[NODE]
    body = await read_json(request)
    name = field(body, "model", str, default=None)
    if chat and name and name not in node.models and node.mesh is not None:
        return await _forward(request, node, body, name)
    model = node.model(name)
    if chat:
        messages = _messages(body)
    else:
        prompt = field(body, "prompt", str, required=True)
    sampling = _sampling(body, model.engine.n_ctx)
    reservation = await node.open(request["who"], model, sampling.max_tokens)
    return await _serve(request, node, body, chat, reservation, lambda: node.pump(
        model.engine.chat(messages, sampling, block=False) if chat
        else model.engine.generate(prompt, sampling, block=False)))


async def _forward(request: web.Request, node: Node, body: dict[str, Any],
                   name: str) -> web.StreamResponse:
    """A model this node lacks, bought from a mesh peer (see forge_cli.node.forwarding)."""
    from forge_cli.node import forwarding

    messages = _messages(body)
    sampling = _sampling(body, FORWARD_MAX_TOKENS)
    payload = {"messages": messages, "temperature": sampling.temperature, "top_p": sampling.top_p,
               **({"seed": sampling.seed} if sampling.seed is not None else {}),
               **({"stop": list(sampling.stop)} if sampling.stop else {})}
    reservation, pump, served_by = await forwarding.start(node, request["who"], name, payload,
                                                          sampling.max_tokens)
    request["served_by"] = served_by
    request["remote_pump"] = pump
    return await _serve(request, node, body, True, reservation, lambda: pump)


async def _serve(request: web.Request, node: Node, body: dict[str, Any], chat: bool,
                 reservation: Any, make_pump: Any) -> web.StreamResponse:
    """Generate and settle: local engine or a peer's reply behind the same pump interface."""
    name = reservation.model.name if reservation is not None else request["served_by"]["model"]
    stream_wanted = field(body, "stream", bool, default=False)
    # From here on the reservation is settled exactly once, whatever happens: the consumer
    # pays for the tokens produced (none when the kill switch stopped the request).
    pump = None
    pieces: list[str] = []
    state = {"killed": False, "failed": False}
    try:
        pump = make_pump()
        if stream_wanted:
            return await _stream(request, node, reservation, pump, pieces, body, chat, state)
        async for piece in pump:
            if node.safety_killed():
                break
            pieces.append(piece)
        if node.safety_killed():  # also when it came between the last token and the trade
            state["killed"] = True
            raise KillSwitchActive("kill switch: activated while this request was "
                                   "generating; it stops and nothing is charged",
                                   gate="kill_switch")
    except BaseException as exc:
        # The breaker counts the node's own failures, not a busy queue, a kill switch or a
        # client that went away.
        state["failed"] = not isinstance(exc, (EngineBusy, KillSwitchActive, ConnectionError,
                                               asyncio.CancelledError))
        raise
    finally:
        completion = await pump.close() if pump is not None else None
        if "settled" not in request:
            request["settled"] = await _settle(request, node, reservation,
                                               None if state["killed"] else completion, body,
                                               pieces, failed=state["failed"])
        _observe(node, completion)
        request["trade_log"] = {"model": name, "cu": request["settled"].cu,
                                "tokens": completion.completion_tokens if completion else 0}
    return web.json_response(_full_response(body, name, completion, "".join(pieces),
                                            _x_forge(request), chat))


async def _settle(request: web.Request, node: Node, reservation: Any, completion: Any,
                  body: dict[str, Any], pieces: list[str], *, failed: bool = False) -> Any:
    if reservation is not None:
        return await node.settle(reservation, completion, request_bytes(body),
                                 "".join(pieces).encode(), failed=failed)
    # The operator bought from a peer with the node's own account: the peer-to-peer trade
    # is the only trade.
    from forge_cli.node.service import Settled

    purchase = request["remote_pump"].purchase
    return Settled(purchase.cu if purchase else 0, request["served_by"]["price_ucu_per_token"],
                   node.balance(node.node_id), None)


def _x_forge(request: web.Request) -> dict[str, Any]:
    x_forge = request["settled"].x_forge()
    if "served_by" in request:
        from forge_cli.node import forwarding

        x_forge["served_by"] = {**request["served_by"],
                                **forwarding.peer_trade(request["remote_pump"])}
    return x_forge


def _observe(node: Node, completion: Any) -> None:
    if completion is not None and completion.completion_tokens:
        node.metrics.ttft.observe(completion.time_to_first_token_s)
        node.metrics.generation.observe(completion.generation_s)


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


async def _stream(request: web.Request, node: Node, reservation: Any, pump: Any,
                  pieces: list[str], body: dict[str, Any], chat: bool,
                  state: dict[str, bool]) -> web.StreamResponse:
    """Server-sent events in OpenAI's chunk format; x_forge rides on the last chunk."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
    await response.prepare(request)
    ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())
    name = reservation.model.name if reservation is not None else request["served_by"]["model"]

    def chunk(delta: dict[str, Any] | str, finish: str | None, **extra: Any) -> bytes:
        if chat:
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": delta, "finish_reason": finish, "logprobs": None}
            obj = "text_completion"
        data = {"id": ident, "object": obj, "created": created, "model": name,
                "choices": [choice], **extra}
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()

    if chat:
        await response.write(chunk({"role": "assistant", "content": ""}, None))
    async for piece in pump:
        if node.safety_killed():
            state["killed"] = True
            break
        pieces.append(piece)
        await response.write(chunk({"content": piece} if chat else piece, None))
    completion = await pump.close()
    state["killed"] = state["killed"] or node.safety_killed()
    settled = await _settle(request, node, reservation, None if state["killed"] else completion,
                            body, pieces)
    request["settled"] = settled
    if state["killed"]:
        error = {"message": "kill switch: activated while this stream was running; the stream "
                 "stops and nothing is charged", "type": "kill_switch",
                 "code": "KillSwitchActive", "gate": "kill_switch"}
        await response.write(f"data: {json.dumps({'error': error})}\n\n".encode())
    else:
        await response.write(chunk({} if chat else "", _finish(completion),
                                   usage=_usage(completion), x_forge=_x_forge(request)))
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
