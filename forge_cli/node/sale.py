"""A generation sold over HTTP, whichever dialect asked for it (OpenAI's routes, Ollama's): the
request checked into an `Order`, then a `Sale` that holds its `TradeSession` and knows how to
start the text (the node's own engine, or a peer's through forwarding). The dialect's route
writes the pieces and the settled trade in its own shape.

Everything that can refuse a request (its fields, the prompt's size, the grammar) is checked
before the session reserves anything.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from forge_cli.errors import KillSwitchActive
from forge_cli.inference.jobs import Sampling
from forge_cli.inference.requests import (
    bad_request,
    field,
    parse_messages,
    parse_sampling,
    parse_tools,
    valid_text,
)
from forge_cli.inference.tools import Tools
from forge_cli.node.web import NODE, TRADE_LOG
from forge_cli.trade import forwarding
from forge_cli.trade.session import Settled, Source, Starter, TradeSession, request_bytes

if TYPE_CHECKING:
    from forge_cli.economy.accounts import Resolved as Who
    from forge_cli.root.node import Node

FORWARD_MAX_TOKENS = 32_768  # a peer checks against its own context
# What constrains a reply travels to the peer as the consumer wrote it: the peer derives the
# same grammar (and prompt) from it, and its terms commit to that.
TOOL_FIELDS = ("tools", "tool_choice", "parallel_tool_calls")
CONSTRAINTS = ("response_format", *TOOL_FIELDS)
# Sampling beyond OpenAI's own fields, forwarded only when the consumer set them.
TUNING = ("top_k", "min_p", "repeat_penalty")


@dataclass
class Order:
    """A request, fully checked before anything is quoted or reserved."""

    body: dict[str, Any]
    chat: bool
    model: str | None
    stream: bool
    sampling: Sampling
    messages: list[dict[str, Any]] | None
    prompt: str | None
    request: bytes
    tools: Tools | None = None  # what the model may call (a chat's `tools`, `tool_choice`)

    @property
    def calls(self) -> bool:
        """Whether the reply is read for tool calls (the model may make one)."""
        return self.tools is not None and self.tools.active

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


def order(body: dict[str, Any], *, chat: bool, n_ctx: int) -> Order:
    """Every field checked, so bad input is a 400 before the market or a balance moves."""
    name = field(body, "model", str, default=None)
    stream = field(body, "stream", bool, default=False)
    messages = parse_messages(body) if chat else None
    prompt = None if chat else valid_text(field(body, "prompt", str, required=True), "prompt")
    if not chat and any(body.get(key) is not None for key in TOOL_FIELDS):
        raise bad_request("tools are offered on /v1/chat/completions; a text completion "
                          "takes none")
    tools = parse_tools(body) if chat else None
    sampling = parse_sampling(body, n_ctx)
    for stop in sampling.stop:
        valid_text(stop, "stop")
    try:
        raw = request_bytes(body)
    except UnicodeEncodeError as exc:
        raise bad_request(f"the request is not valid Unicode text: {exc.reason}") from None
    return Order(body, chat, name, stream, sampling, messages, prompt, raw, tools)


@dataclass
class Sale:
    """One checked, not yet reserved generation: `session` reserves when entered, `start`
    begins the text once it has."""

    node: Node
    order: Order
    session: TradeSession
    start: Starter
    name: str  # the model, as the reply names it
    served_by: Callable[[], dict[str, Any]] | None  # the peer that generated it, if forwarded

    async def run(self, source: Source) -> AsyncIterator[str]:
        """The text's pieces as the session lets them through (the kill switch checked on
        each); `source` is what `start` returned."""
        async for piece in self.session.run(source):
            yield piece

    async def settle(self, *, streaming: bool = False) -> Settled:
        """The trade, once the text has ended; none when the kill switch came on meanwhile
        (also between the last piece and now)."""
        if self.session.killed:
            if streaming:
                raise KillSwitchActive("kill switch: activated while this stream was running; "
                                       "the stream stops and nothing is charged")
            raise KillSwitchActive("kill switch: activated while this request was generating; "
                                   "it stops and nothing is charged", gate="kill_switch")
        return await self.session.settle()

    def x_forge(self, settled: Settled) -> dict[str, Any]:
        x_forge = settled.x_forge()
        if self.served_by is not None:
            x_forge["served_by"] = self.served_by()
        return x_forge

    def record(self, request: web.Request) -> None:
        """What the request log and the node's counters keep of it, however it ended."""
        completion = self.session.completion
        self.node.observe(completion)
        settled = self.session.settled
        request[TRADE_LOG] = {"model": self.name, "cu": settled.cu if settled else 0,
                              "tokens": completion.completion_tokens if completion else 0}


async def open_sale(request: web.Request, who: Who, body: dict[str, Any], *,
                    chat: bool) -> Sale:
    """The sale `body` asks for: a chat naming a model this node lacks goes to a peer that
    serves it (when the node is on a mesh), anything else to the node's own engine."""
    node = request.app[NODE]
    name = field(body, "model", str, default=None)
    if chat and name and name not in node.models and node.mesh is not None:
        checked = order(body, chat=True, n_ctx=FORWARD_MAX_TOKENS)
        forward = await forwarding.forward(node, who, name, checked.sampling.max_tokens,
                                           checked.request)
        s = checked.sampling
        payload = {"messages": checked.messages, "temperature": s.temperature, "top_p": s.top_p,
                   **({"seed": s.seed} if s.seed is not None else {}),
                   **({"stop": list(s.stop)} if s.stop else {}),
                   **{key: getattr(s, key) for key in TUNING if body.get(key) is not None},
                   **{key: body[key] for key in CONSTRAINTS if body.get(key) is not None}}

        async def forwarded() -> Source:
            return forward.start(node, payload)

        return Sale(node, checked, forward.session, forwarded, name, forward.served_by)
    model = node.model(name)
    checked = order(body, chat=chat, n_ctx=model.engine.n_ctx)
    model.engine.check_prompt_bytes(checked.prompt_bytes, checked.what)
    if checked.sampling.grammar is not None:
        model.engine.check_grammar(checked.sampling.grammar)
    session = node.buyer_session(who, model=model, max_tokens=checked.sampling.max_tokens,
                                 request=checked.request)

    messages, prompt = checked.messages, checked.prompt or ""

    async def start() -> Source:
        if messages is not None:
            return await node.pump(
                lambda: model.engine.chat(messages, checked.sampling, tools=checked.tools,
                                          block=False))
        return await node.pump(
            lambda: model.engine.generate(prompt, checked.sampling, block=False))

    return Sale(node, checked, session, start, model.name, None)


__all__ = ["FORWARD_MAX_TOKENS", "Order", "Sale", "open_sale", "order"]
