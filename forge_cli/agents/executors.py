"""Executors beyond forge's engine: a command (`subprocess`), any OpenAI-compatible endpoint
(`openai`: Ollama, llama-server, vLLM, another forge node) and Anthropic's Messages API
(`anthropic`). Each call gives back what a run witnesses of forge's own calls: the text, the
model, tokens, the cost where the provider states it, and the seconds it took.

Nothing here spends forge CU; the run counts each call against its call limit and its seconds
against --max-seconds. Replies are read with a size cap through the one JSON parser.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from dataclasses import dataclass, field
from typing import Any

from forge_cli import wire
from forge_cli.agents.roster import Lane

MAX_OUTPUT = 1024 * 1024  # bytes of a command's output or an API's reply that are read
ANTHROPIC_URL = "https://api.anthropic.com"
ANTHROPIC_VERSION = "2023-06-01"


@dataclass
class External:
    """One call to an executor outside forge."""

    ok: bool  # the call worked (exit 0, HTTP 200 with a reply); the judge decides the rest
    text: str
    model: str
    finish_reason: str  # stop, length, error, timeout
    seconds_ms: int
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cost: dict[str, Any] | None = None  # as the provider states it ({"cu": 12, "trade": 7})
    detail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    # Another forge node's dual-signed trade for this call (canonical JSON of the entry's data:
    # terms and both signatures, checked here), kept as a body of the run's result entry, so
    # the trade is in this node's ledger as well as the seller's.
    trade_record: bytes | None = None

    def witness(self) -> dict[str, Any]:
        """What the run's `result` entry records of the call (integers and text only)."""
        held = ({"external_trade_sha256": hashlib.sha256(self.trade_record).hexdigest()}
                if self.trade_record is not None else {})
        return {"executor_model": self.model, "finish_reason": self.finish_reason,
                "seconds_ms": self.seconds_ms, "prompt_tokens": self.prompt_tokens,
                "external_cost": self.cost, "call_ok": self.ok, "detail": self.detail[:300],
                **held}


async def call(lane: Lane, system: str, instruction: str, max_tokens: int,
               timeout_s: float) -> External:
    """Run `instruction` on the lane's executor within `timeout_s` (the lane's own timeout or
    what is left of the run's seconds, whichever is less)."""
    limit = max(0.1, min(float(lane.timeout_s), timeout_s))
    started = time.monotonic()
    try:
        if lane.executor == "subprocess":
            out = await _subprocess(lane, instruction, limit)
        elif lane.executor == "openai":
            out = await asyncio.wait_for(_openai(lane, system, instruction, max_tokens), limit)
        else:
            out = await asyncio.wait_for(_anthropic(lane, system, instruction, max_tokens), limit)
    except TimeoutError:
        out = External(False, "", label(lane), "timeout", 0,
                       detail=f"no reply within {limit:.0f} s")
    except (OSError, ValueError, wire.BadJSON) as exc:  # aiohttp's errors are OSErrors
        out = External(False, "", label(lane), "error", 0,
                       detail=f"{type(exc).__name__}: {exc}"[:300])
    out.seconds_ms = int((time.monotonic() - started) * 1000)
    return out


def label(lane: Lane) -> str:
    """How results name a lane's executor: `subprocess:NAME`, `openai:MODEL`, `anthropic:MODEL`."""
    if lane.executor == "subprocess":
        return "subprocess:" + os.path.basename(lane.argv[0])
    return f"{lane.executor}:{lane.model or 'default'}"


async def _subprocess(lane: Lane, instruction: str, limit: float) -> External:
    """argv + the instruction as its last argument, no shell; ok iff the exit status is 0."""
    proc = await asyncio.create_subprocess_exec(
        *lane.argv, instruction, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), limit)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return External(False, "", label(lane), "timeout", 0,
                        detail=f"killed after {limit:.0f} s")
    code = proc.returncode
    text = (stdout if code == 0 else stderr or stdout)[:MAX_OUTPUT].decode("utf-8", "replace")
    return External(code == 0, text, label(lane), "stop" if code == 0 else "error", 0,
                    detail=f"exit status {code}", extra={"exit_status": code})


async def _post(url: str, body: dict[str, Any], headers: dict[str, str]) -> tuple[int, Any]:
    import aiohttp

    async with aiohttp.ClientSession() as session, session.post(url, json=body,
                                                                 headers=headers) as reply:
        raw = await reply.content.read(MAX_OUTPUT + 1)
        if len(raw) > MAX_OUTPUT:
            raise ValueError(f"reply from {url} is larger than {MAX_OUTPUT:,} bytes")
        return reply.status, wire.parse(raw, limit=MAX_OUTPUT, what=f"reply from {url}")


def _error(status: int, value: Any) -> str:
    error = value.get("error") if isinstance(value, dict) else None
    message = error.get("message") if isinstance(error, dict) else error
    return f"HTTP {status}: {str(message or value)[:200]}"


async def _openai(lane: Lane, system: str, instruction: str, max_tokens: int) -> External:
    assert lane.base_url is not None and lane.model is not None
    headers = {}
    if lane.api_key_env:
        key = os.environ.get(lane.api_key_env)
        if not key:
            return External(False, "", label(lane), "error", 0,
                            detail=f"environment variable {lane.api_key_env} is not set")
        headers["Authorization"] = f"Bearer {key}"
    url = lane.base_url.rstrip("/") + "/chat/completions"
    status, value = await _post(url, {
        "model": lane.model, "max_tokens": max_tokens, "temperature": 0,
        "messages": [{"role": "system", "content": system},
                     {"role": "user", "content": instruction}]}, headers)
    try:
        choice = value["choices"][0]
        text = choice["message"]["content"]
        assert isinstance(text, str)
    except (KeyError, IndexError, TypeError, AssertionError):
        return External(False, "", label(lane), "error", 0, detail=_error(status, value))
    usage = value.get("usage") if isinstance(value.get("usage"), dict) else {}
    forge = value.get("x_forge") if isinstance(value.get("x_forge"), dict) else {}
    cost = None
    if forge:  # another forge node states the cost and the trade it recorded
        cost = {"cu": wire.finite_int(forge.get("cu_cost")),
                "trade": wire.finite_int(forge.get("trade_seq"))}
    finish = "length" if choice.get("finish_reason") == "length" else "stop"
    out = External(status == 200, text, f"openai:{value.get('model') or lane.model}"[:120],
                   finish, 0, wire.finite_int(usage.get("prompt_tokens")),
                   wire.finite_int(usage.get("completion_tokens")), cost)
    if cost is not None and cost["trade"] is not None and cost["cu"] is not None:
        out.trade_record, why = await _forge_trade(lane.base_url, headers, cost["trade"],
                                                   cost["cu"])
        if why:
            out.detail = f"the seller's trade is not held here: {why}"
    return out


async def _forge_trade(base_url: str, headers: dict[str, str], seq: int, cu: int
                       ) -> tuple[bytes | None, str]:
    """The trade entry a forge seller says it recorded for this call (GET its ledger entry),
    held only when both signatures check over its terms and it bills what `x_forge` stated:
    its canonical JSON, or None and why not."""
    import aiohttp

    from forge_cli import canonical, identity
    from forge_cli.ledger import entries

    url = f"{base_url.rstrip('/')}/forge/ledger/entry/{seq}"
    try:
        async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as reply:
            raw = await reply.content.read(MAX_OUTPUT + 1)
        value = wire.parse(raw, limit=MAX_OUTPUT, what=f"entry {seq} from {url}")
        data = value["entry"]["data"]
        terms = data["terms"]
        message = entries.trade_message(terms)
        signed = (value["entry"]["kind"] == "trade" and terms["cu"] == cu
                  and identity.verify_hex(terms["provider"], message, data["provider_sig"])
                  and identity.verify_hex(terms["consumer"], message, data["consumer_sig"]))
    except (OSError, ValueError, KeyError, TypeError, wire.BadJSON) as exc:
        return None, f"entry {seq} could not be read ({type(exc).__name__}: {exc})"[:200]
    if not signed:
        return None, f"entry {seq} is not a trade of {cu} CU signed by both sides"
    return canonical.encode(data), ""


async def _anthropic(lane: Lane, system: str, instruction: str, max_tokens: int) -> External:
    key = os.environ.get("ANTHROPIC_API_KEY")
    if not key:
        return External(False, "", label(lane), "error", 0,
                        detail="environment variable ANTHROPIC_API_KEY is not set")
    url = (lane.base_url or ANTHROPIC_URL).rstrip("/") + "/v1/messages"
    status, value = await _post(url, {
        "model": lane.model or "claude-sonnet-4-5", "max_tokens": max_tokens, "system": system,
        "messages": [{"role": "user", "content": instruction}]},
        {"x-api-key": key, "anthropic-version": ANTHROPIC_VERSION})
    try:
        text = "".join(part["text"] for part in value["content"] if part.get("type") == "text")
    except (KeyError, TypeError):
        return External(False, "", label(lane), "error", 0, detail=_error(status, value))
    usage = value.get("usage") if isinstance(value.get("usage"), dict) else {}
    finish = "length" if value.get("stop_reason") == "max_tokens" else "stop"
    return External(status == 200, text, f"anthropic:{value.get('model') or lane.model}"[:120],
                    finish, 0, wire.finite_int(usage.get("input_tokens")),
                    wire.finite_int(usage.get("output_tokens")))
