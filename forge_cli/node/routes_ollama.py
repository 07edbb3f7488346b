"""Ollama's dialect on the node's port (and, with `forge node --ollama-port`, on a second one):
/api/chat and /api/generate (NDJSON streams), /api/tags, /api/show, /api/ps, /api/version,
/api/embed, /api/pull.

A generation is translated into the OpenAI-shaped body the shared sale checks (node/sale.py),
so it is quoted, reserved, generated and settled as a trade exactly as /v1/chat/completions
is; only the shapes written back are Ollama's. Errors leave as `{"error": "message", "type",
"code"}`: Ollama's clients read the message from `error`.
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from forge_cli.errors import Forbidden, ForgeError, UnknownModel
from forge_cli.inference.requests import role_of
from forge_cli.node.sale import FORWARD_MAX_TOKENS, Sale, open_sale
from forge_cli.node.throttle import Sender
from forge_cli.node.web import NODE, REJECTS, STREAMING, WHO, Route, bad_request, error_body, field, read_json
from forge_cli.trade.session import Completion

if TYPE_CHECKING:
    from forge_cli.economy.accounts import Resolved as Who
    from forge_cli.inference.gguf_meta import GGUFInfo
    from forge_cli.root.node import LoadedModel, Node

# The Ollama release whose API this dialect follows (structured outputs, tools); clients
# compare it to decide what they may send.
OLLAMA_VERSION = "0.5.0"
NDJSON = "application/x-ndjson"
# Models stay loaded while the node runs: Ollama writes a far-future expiry for that.
NEVER = "2318-01-01T00:00:00Z"

Kinds = type | tuple[type, ...]
NUMBER = (int, float)
# Ollama's options, by what the node does with each. Sampling: passed to the shared parse,
# which range-checks them (num_predict and num_ctx are checked here, against the model).
SAMPLING: dict[str, Kinds] = {
    "num_predict": int, "temperature": NUMBER, "top_p": NUMBER, "top_k": int, "min_p": NUMBER,
    "repeat_penalty": NUMBER, "seed": int, "stop": (str, list)}
# Options that would change the answer and that this node does not have: accepted at the
# value that asks for nothing (Ollama's default), refused otherwise, as the OpenAI routes do.
INERT: dict[str, tuple[Kinds, float]] = {
    "presence_penalty": (NUMBER, 0), "frequency_penalty": (NUMBER, 0), "mirostat": (int, 0),
    "typical_p": (NUMBER, 1), "tfs_z": (NUMBER, 1), "repeat_last_n": (int, 64)}
# How a model is loaded and run: the node settled that when it started, so these are read
# (their types checked) and ignored.
RUNTIME: dict[str, Kinds] = {
    "num_ctx": int, "num_batch": int, "num_gpu": int, "main_gpu": int, "num_thread": int,
    "num_keep": int, "numa": bool, "low_vram": bool, "f16_kv": bool, "logits_all": bool,
    "vocab_only": bool, "use_mmap": bool, "use_mlock": bool, "embedding_only": bool,
    "penalize_newline": bool, "mirostat_tau": NUMBER, "mirostat_eta": NUMBER}
# A Go duration ("5m", "1h30m", "-1s") or a bare number of seconds, as keep_alive takes.
DURATION = re.compile(r"-?(?:\d+(?:\.\d+)?(?:ns|us|µs|ms|s|m|h))+|-?\d+(?:\.\d+)?")
# llama.cpp's file types (general.file_type) by the names Ollama reports them with.
FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
              10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M",
              16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 32: "BF16"}


# -- errors in Ollama's shape ----------------------------------------------------------------

@web.middleware
async def ollama_errors(request: web.Request,
                        handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                        ) -> web.StreamResponse:
    """Under /api/, the node's error envelope with its message in `error` itself: Ollama's
    clients show `error` as the reason (a nested object would read as its repr). Outermost,
    so the refusals of auth and of aiohttp's routing are reshaped too."""
    response = await handler(request)
    if (not request.path.startswith("/api/") or response.status < 400
            or not isinstance(response, web.Response) or not isinstance(response.body, bytes)
            or response.content_type != "application/json"):
        return response
    inner = json.loads(response.body).get("error")
    if not isinstance(inner, dict):
        return response
    flat = {"error": inner.get("message", ""), **{k: v for k, v in inner.items() if k != "message"}}
    headers = {k: v for k, v in response.headers.items() if k in ("Allow", "Retry-After")}
    return web.json_response(flat, status=response.status, headers=headers)


def _line(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, ensure_ascii=False) + "\n").encode()


def _stream_error(exc: ForgeError) -> bytes:
    """A failure once an NDJSON stream has begun: one line Ollama's clients raise from."""
    body = error_body(exc)
    return _line({"error": body.pop("message"), **body})


# -- reading Ollama's requests ---------------------------------------------------------------

def _kind_name(kinds: Kinds) -> str:
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    words = {int: "an integer", float: "a number", str: "a string", bool: "a boolean",
             list: "an array", dict: "an object"}
    return " or ".join(words[k] for k in kinds if not (k is int and float in kinds))


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    return {int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object"}.get(type(value), type(value).__name__)


def _option(options: dict[str, Any], name: str, kinds: Kinds) -> Any:
    value = options[name]
    kinds_ = kinds if isinstance(kinds, tuple) else (kinds,)
    if isinstance(value, bool) != (bool in kinds_) or not isinstance(value, kinds_):
        raise bad_request(f"options.{name} must be {_kind_name(kinds)}, found "
                          f"{_json_type(value)}")
    return value


def _options(body: dict[str, Any], n_ctx: int, model: str) -> dict[str, Any]:
    """The OpenAI-shaped sampling fields `options` asks for; every option's type checked."""
    options = field(body, "options", dict, default={})
    out: dict[str, Any] = {}
    for name, value in options.items():
        if value is None:
            continue
        if name in SAMPLING:
            out[name] = _option(options, name, SAMPLING[name])
        elif name in INERT:
            kinds, harmless = INERT[name]
            if _option(options, name, kinds) != harmless:
                raise bad_request(f"options.{name} is not supported by this node (found "
                                  f"{json.dumps(value)}); leave it out or send {harmless}")
        elif name in RUNTIME:
            _option(options, name, RUNTIME[name])
        else:
            raise bad_request(f"options.{name} is not an option this node knows; its options "
                              f"are {', '.join(sorted([*SAMPLING, *INERT, *RUNTIME]))}")
    num_ctx = options.get("num_ctx")
    if num_ctx is not None and not 1 <= num_ctx <= n_ctx:
        raise bad_request(f"options.num_ctx is {num_ctx:,} tokens, but this node runs {model} "
                          f"with a context of {n_ctx:,}; ask for at most that, or leave it out")
    predict = out.pop("num_predict", None)
    if predict is not None:
        if predict in (-1, -2):  # Ollama's "until the context is full"
            predict = n_ctx
        if not 1 <= predict <= n_ctx:
            raise bad_request(f"options.num_predict must be -1, -2 (up to the context) or "
                              f"between 1 and {n_ctx:,}, found {predict}")
        out["max_tokens"] = predict
    if out.get("seed") == -1:  # Ollama's "a random seed"
        del out["seed"]
    return out


def _response_format(body: dict[str, Any]) -> dict[str, Any] | None:
    """`format`: "json" is any JSON object, an object is a JSON schema the reply must match."""
    fmt = body.get("format")
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return {"type": "json_object"}
    if isinstance(fmt, dict):
        from forge_cli.inference import grammar

        # Converted here too, so a schema it cannot take is refused under the name sent.
        grammar.from_schema(fmt, "format")
        return {"type": "json_schema", "json_schema": {"name": "format", "schema": fmt}}
    raise bad_request(f'format must be "json" or a JSON schema object, found '
                      f"{json.dumps(fmt)[:40]}")


def _keep_alive(body: dict[str, Any]) -> bool:
    """Whether `keep_alive` asks to unload now (0). The node keeps its models loaded while it
    runs, so the value changes nothing; it must still be a duration or a number."""
    value = body.get("keep_alive")
    if value is None:
        return False
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value == 0
    if isinstance(value, str) and DURATION.fullmatch(value.strip()):
        return re.search(r"[1-9]", value) is None
    raise bad_request(f'keep_alive must be a duration such as "5m" or a number of seconds, '
                      f"found {json.dumps(value)[:40]}")


def _refuse_unfit(body: dict[str, Any], model: str) -> None:
    """Fields asking for what a text model on this node cannot give: a 400 rather than an
    answer that silently ignores them."""
    if body.get("think") not in (None, False, "", "none"):
        raise bad_request(f"{json.dumps(model)} does not support thinking")
    for name in ("images", "context"):
        if body.get(name):
            what = ("this node's models read text only" if name == "images" else
                    "this node keeps no token state between replies; send the conversation "
                    "to /api/chat instead")
            raise bad_request(f"{name} is not supported: {what}")
    for name in ("suffix", "template"):
        if body.get(name):
            raise bad_request(f"{name} is not supported by this node; leave it out")


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """Ollama's messages as OpenAI's: a call's `arguments` object becomes a JSON string with a
    `call_…` id, and a tool's result names the call it answers (the earliest unanswered one of
    its `tool_name`, or the earliest unanswered)."""
    messages = field(body, "messages", list, default=[])
    out: list[dict[str, Any]] = []
    waiting: list[tuple[str, str]] = []  # (id, name) of calls not yet answered
    for i, message in enumerate(messages):
        role, content = role_of(message, f"messages[{i}]"), message.get("content")
        if message.get("images"):
            raise bad_request(f"messages[{i}].images is not supported: this node's models read "
                              "text only")
        if content is not None and not isinstance(content, str):
            raise bad_request(f"messages[{i}].content must be a string, found "
                              f"{_json_type(content)}")
        item: dict[str, Any] = {"role": role, "content": content or ""}
        calls = message.get("tool_calls")
        if calls:
            item["tool_calls"] = _openai_calls(calls, f"messages[{i}].tool_calls", i)
            waiting += [(c["id"], c["function"]["name"]) for c in item["tool_calls"]]
        if role == "tool":
            named = message.get("tool_name")
            answered = next((w for w in waiting if named in (None, w[1])), None)
            if answered is not None:
                waiting.remove(answered)
                item["tool_call_id"] = answered[0]
        out.append(item)
    return out


def _openai_calls(calls: Any, where: str, turn: int) -> list[dict[str, Any]]:
    if not isinstance(calls, list):
        raise bad_request(f"{where} must be an array")
    out = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise bad_request(f"{where}[{j}] must be {{\"function\": {{\"name\", \"arguments\"}}}}")
        arguments = function.get("arguments", {})
        if not isinstance(arguments, dict):
            raise bad_request(f"{where}[{j}].function.arguments must be an object")
        out.append({"id": f"call_{turn}_{j}", "type": "function",
                    "function": {"name": function["name"],
                                 "arguments": json.dumps(arguments, ensure_ascii=False)}})
    return out


def ollama_tool_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI-shaped tool calls (`arguments` a JSON string) as Ollama writes them in
    `message.tool_calls` (`arguments` an object)."""
    out = []
    for call in calls:
        function = call["function"]
        arguments = function.get("arguments") or "{}"
        if isinstance(arguments, str):
            arguments = json.loads(arguments)
        out.append({"function": {"name": function["name"], "arguments": arguments}})
    return out


def translate(body: dict[str, Any], *, chat: bool, n_ctx: int, model: str
              ) -> tuple[dict[str, Any], bool]:
    """The OpenAI-shaped body an Ollama request asks for, and whether it is a chat (a
    /api/generate prompt is one, in the model's template, unless `raw`)."""
    _refuse_unfit(body, model)
    out: dict[str, Any] = {"model": body.get("model"), **_options(body, n_ctx, model)}
    fmt = _response_format(body)
    if fmt is not None:
        out["response_format"] = fmt
    # tool_choice is not Ollama's; forge takes it as OpenAI's, for a call that must happen.
    # The ollama client sends `tools: []` when it offers none: that is no tools, as in Ollama.
    for name in ("tools", "tool_choice", "logprobs", "top_logprobs"):
        if body.get(name) is not None and body.get(name) != []:
            out[name] = body[name]
    if chat:
        out["messages"] = _messages(body)
        return out, True
    prompt = field(body, "prompt", str, default="")
    if field(body, "raw", bool, default=False):
        out["prompt"] = prompt
        return out, False
    system = field(body, "system", str, default=None)
    out["messages"] = [*([{"role": "system", "content": system}] if system else []),
                       {"role": "user", "content": prompt}]
    return out, True


# -- model facts -----------------------------------------------------------------------------

@functools.lru_cache(maxsize=16)
def _header(path: Path, mtime_ns: int) -> GGUFInfo:
    from forge_cli.inference import gguf_meta

    return gguf_meta.read_info(path)


def _facts(model: LoadedModel) -> GGUFInfo | None:
    if model.path is None or not model.path.is_file():
        return None
    return _header(model.path, model.path.stat().st_mtime_ns)


def _parameter_size(params: int) -> str:
    return f"{params / 1e9:.1f}B" if params >= 1e9 else f"{params / 1e6:.0f}M"


def _details(model: LoadedModel) -> dict[str, Any]:
    info = _facts(model)
    arch = info.architecture if info is not None else ""
    file_type = info.metadata.get("general.file_type") if info is not None else None
    return {"parent_model": "", "format": "gguf", "family": arch,
            "families": [arch] if arch else None,
            "parameter_size": _parameter_size(model.params),
            "quantization_level": FILE_TYPES.get(file_type, "unknown")
            if isinstance(file_type, int) else "unknown"}


def _modified(model: LoadedModel) -> str:
    stamp = model.path.stat().st_mtime if model.path is not None and model.path.exists() else 0
    return datetime.fromtimestamp(stamp, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _listed(model: LoadedModel) -> dict[str, Any]:
    size = model.path.stat().st_size if model.path is not None and model.path.exists() else 0
    return {"name": model.name, "model": model.name, "modified_at": _modified(model),
            "size": size, "digest": model.sha256, "details": _details(model)}


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _served(node: Node, name: str | None) -> LoadedModel:
    """The node's model of that name, or Ollama's 404 for a model it does not have."""
    try:
        return node.model(name)
    except UnknownModel:
        if not name:
            raise
        raise UnknownModel(f"model {json.dumps(name)} not found: this node serves "
                           f"{', '.join(sorted(node.models))}") from None


async def version(request: web.Request) -> web.Response:
    from forge_cli import version as forge_version

    return web.json_response({"version": OLLAMA_VERSION, "forge": forge_version()})


async def tags(request: web.Request) -> web.Response:
    node = request.app[NODE]
    return web.json_response({"models": [_listed(m) for m in node.models.values()]})


async def ps(request: web.Request) -> web.Response:
    node = request.app[NODE]
    running = []
    for model in node.models.values():
        listed = _listed(model)
        offloaded = model.engine.gpu_offload and model.engine.n_gpu_layers != 0
        running.append({**listed, "expires_at": NEVER,
                        "size_vram": listed["size"] if offloaded else 0,
                        "context_length": model.engine.n_ctx})
    return web.json_response({"models": running})


async def show(request: web.Request) -> web.Response:
    """`model` (or the older `name`): its details, GGUF metadata, chat template and the
    parameters a request gets when it sets none."""
    node = request.app[NODE]
    body = await read_json(request)
    name = field(body, "model", str, default=None) or field(body, "name", str, default=None)
    if not name:
        raise bad_request("missing required field 'model'")
    model = _served(node, name)
    info = _facts(model)
    metadata = info.metadata if info is not None else {}
    model_info = {key: value for key, value in metadata.items()
                  if key != "tokenizer.chat_template" and not isinstance(value, list)}
    model_info["general.parameter_count"] = model.params
    from forge_cli.inference.jobs import Sampling

    default = Sampling()
    parameters = "\n".join([f"num_ctx {model.engine.n_ctx}", "num_predict 256",
                            f"temperature {default.temperature}", f"top_p {default.top_p}",
                            f"top_k {default.top_k}", f"min_p {default.min_p}",
                            f"repeat_penalty {default.repeat_penalty}"])
    template = metadata.get("tokenizer.chat_template")
    return web.json_response({
        "license": str(metadata.get("general.license", "")), "modelfile": "",
        "parameters": parameters, "template": template if isinstance(template, str) else "",
        "details": _details(model), "model_info": model_info,
        "capabilities": ["completion", "tools"], "modified_at": _modified(model)})


# -- generations -----------------------------------------------------------------------------

async def chat(request: web.Request) -> web.StreamResponse:
    return await _generation(request, chat=True)


async def generate(request: web.Request) -> web.StreamResponse:
    return await _generation(request, chat=False)


async def _generation(request: web.Request, *, chat: bool) -> web.StreamResponse:
    """A purchase; refused ones count toward the account's throttle, as on /v1."""
    who = request[WHO]
    with Sender(request.app[REJECTS], f"account:{who.account_hex}", f"account {who.name}"):
        return await _purchase(request, who, chat=chat)


async def _purchase(request: web.Request, who: Who, *, chat: bool) -> web.StreamResponse:
    started = time.perf_counter()
    node = request.app[NODE]
    body = await read_json(request)
    name = field(body, "model", str, default=None)
    stream = field(body, "stream", bool, default=True)
    unload = _keep_alive(body)
    forwarded = chat and bool(name) and name not in node.models and node.mesh is not None
    served = None if forwarded else _served(node, name)
    n_ctx = FORWARD_MAX_TOKENS if served is None else served.engine.n_ctx
    shown = name or (served.name if served is not None else "")
    openai_body, as_chat = translate(body, chat=chat, n_ctx=n_ctx, model=shown)
    if _nothing_asked(body, chat=chat):
        # Ollama's load (or, with keep_alive 0, unload) request: the node's models stay
        # loaded, so nothing is loaded, unloaded, generated or charged.
        return web.json_response({"model": shown, "created_at": _now(),
                                  **({"message": {"role": "assistant", "content": ""}} if chat
                                     else {"response": ""}),
                                  "done": True, "done_reason": "unload" if unload else "load"})
    sale = await open_sale(request, who, openai_body, chat=as_chat)
    if stream:
        return await _stream(request, sale, chat=chat, started=started)
    async with sale.session:
        async for _ in sale.run(await sale.start()):
            pass
        settled = await sale.settle()
    sale.record(request)
    text, calls = _extracted(sale, sale.session.text)
    return web.json_response({**_reply(sale, chat, text, calls), "done": True,
                              **_final(sale.session.completion, started),
                              "x_forge": sale.x_forge(settled)})


def _nothing_asked(body: dict[str, Any], *, chat: bool) -> bool:
    if chat:
        return not body.get("messages")
    return not body.get("prompt")


def _reply(sale: Sale, chat: bool, text: str, calls: list[dict[str, Any]] | None = None
           ) -> dict[str, Any]:
    head = {"model": sale.name, "created_at": _now()}
    if not chat:
        return {**head, "response": text}
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if calls:
        message["tool_calls"] = ollama_tool_calls(calls)
    return {**head, "message": message}


def _ns(seconds: float) -> int:
    return int(seconds * 1_000_000_000)


def _final(completion: Completion | None, started: float) -> dict[str, Any]:
    """What the last object carries, in nanoseconds: `load_duration` is the wait for a free
    slot (the model itself is always loaded), `prompt_eval_duration` the prompt's evaluation
    (a peer's reply tells only the two together), `eval_duration` the reply's tokens from the
    first to the last."""
    total = _ns(time.perf_counter() - started)
    if completion is None:
        return {"done_reason": "stop", "total_duration": total, "load_duration": 0,
                "prompt_eval_count": 0, "prompt_eval_duration": 0, "eval_count": 0,
                "eval_duration": 0}
    waited = getattr(completion, "queued_s", 0.0)
    return {"done_reason": "length" if completion.finish_reason == "length" else "stop",
            "total_duration": total, "load_duration": _ns(waited),
            "prompt_eval_count": completion.prompt_tokens,
            "prompt_eval_duration": _ns(max(0.0, completion.time_to_first_token_s - waited)),
            "eval_count": completion.completion_tokens,
            "eval_duration": _ns(completion.generation_s)}


def _reads_calls(sale: Sale) -> bool:
    """Whether the reply is read for tool calls: the order says so once OpenAI's tools (the
    shared `Order.calls`) are in; an order without that reading has none."""
    return bool(getattr(sale.order, "calls", False))


def _extracted(sale: Sale, text: str) -> tuple[str, list[dict[str, Any]]]:
    """The reply's prose and the tool calls in it, in OpenAI's shape (`arguments` a JSON
    string), read by the one reader every dialect shares (forge_cli.inference.tools)."""
    if not _reads_calls(sale):
        return text, []
    from forge_cli.inference.tools import read_reply

    reply = read_reply(text)
    return reply.text, [{"id": call.id, "type": "function",
                         "function": {"name": call.name, "arguments": call.arguments}}
                        for call in reply.calls]


async def _stream(request: web.Request, sale: Sale, *, chat: bool,
                  started: float) -> web.StreamResponse:
    """NDJSON, one object a piece, `done` and the timings on the last (with `x_forge`). With
    tools offered, the text is held until it ends, so a tool call is never streamed as text.

    Once the stream has begun, an error is one `{"error": …}` line: a streamed response never
    carries a second HTTP response in its body."""
    session = sale.session
    holding = _reads_calls(sale)
    response = web.StreamResponse(headers={"Content-Type": NDJSON, "Cache-Control": "no-cache"})
    try:
        async with session:
            # Started before the stream begins: a prompt refused (too long, a full queue) is
            # an HTTP error, not a line inside a 200.
            source = await sale.start()
            request[STREAMING] = response
            await response.prepare(request)
            async for piece in sale.run(source):
                if not holding:
                    await response.write(_line({**_reply(sale, chat, piece), "done": False}))
            settled = await sale.settle(streaming=True)
            text, calls = _extracted(sale, session.text) if holding else ("", [])
            await response.write(_line({**_reply(sale, chat, text, calls), "done": True,
                                        **_final(session.completion, started),
                                        "x_forge": sale.x_forge(settled)}))
    except ForgeError as exc:
        if not response.prepared:
            raise
        await response.write(_stream_error(exc))
    finally:
        sale.record(request)
    await response.write_eof()
    return response


# -- embeddings ------------------------------------------------------------------------------

async def embed(request: web.Request) -> web.Response:
    """`input` (a string or a list of them): one paid trade, vectors as Ollama writes them."""
    started = time.perf_counter()
    body = await read_json(request)
    inputs = body.get("input")
    if isinstance(inputs, str):
        inputs = [inputs]
    if not isinstance(inputs, list) or not inputs or not all(isinstance(s, str) for s in inputs):
        raise bad_request("input must be a string or a non-empty array of strings")
    done = await _embedded(request, body, inputs)
    return web.json_response({"model": done.model, "embeddings": done.vectors,
                              "total_duration": _ns(time.perf_counter() - started),
                              "load_duration": 0, "prompt_eval_count": done.prompt_tokens,
                              "x_forge": done.x_forge})


async def embeddings(request: web.Request) -> web.Response:
    """The older single-prompt form: `prompt` in, `embedding` out."""
    body = await read_json(request)
    prompt = field(body, "prompt", str, required=True)
    done = await _embedded(request, body, [prompt])
    return web.json_response({"embedding": done.vectors[0], "x_forge": done.x_forge})


async def _embedded(request: web.Request, body: dict[str, Any], inputs: list[str]) -> Any:
    from forge_cli.node.routes_embeddings import embed as embed_inputs

    name = field(body, "model", str, default=None)
    field(body, "truncate", bool, default=True)
    if body.get("dimensions") is not None:
        raise bad_request("dimensions is not supported: this node returns each model's own "
                          "vector size; leave it out")
    _keep_alive(body)
    _options(body, FORWARD_MAX_TOKENS, name or "")
    who = request[WHO]
    with Sender(request.app[REJECTS], f"account:{who.account_hex}", f"account {who.name}"):
        if name and name not in request.app[NODE].models:
            _served(request.app[NODE], name)
        return await embed_inputs(request, who, inputs, name)


# -- pulling ---------------------------------------------------------------------------------

async def pull(request: web.Request) -> web.StreamResponse:
    """The operator's download of a catalog or hf.co model (the node serves it once restarted
    with it): `{"status"}` lines ending in `success`, or one object with `stream: false`. A
    download already begun finishes even when the client goes away."""
    if not request[WHO].is_operator:
        raise Forbidden("only the node operator may pull models")
    body = await read_json(request)
    name = field(body, "model", str, default=None) or field(body, "name", str, default=None)
    if not name:
        raise bad_request("missing required field 'model'")
    stream = field(body, "stream", bool, default=True)
    field(body, "insecure", bool, default=False)
    from forge_cli.inference import catalog, download

    ref = catalog.resolve(name)  # an unknown name is UnknownModel (404) here
    if ref.kind == "path":
        raise bad_request(f"{ref.name} is a local file; there is nothing to pull")
    loop = asyncio.get_running_loop()
    said: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    def announce(found: Any) -> None:
        total = {"total": found.entry.size} if found.entry and found.entry.size else {}
        loop.call_soon_threadsafe(said.put_nowait, {"status": f"pulling {found.file or found.name}",
                                                    **total})

    def fetch() -> None:
        _, _, fresh = download.pull(name, progress=False, announce=announce)
        if fresh and ref.entry is not None and ref.entry.sha256:
            loop.call_soon_threadsafe(said.put_nowait, {"status": "verifying sha256 digest"})

    work = asyncio.ensure_future(asyncio.to_thread(fetch))
    if not stream:
        await asyncio.shield(work)
        return web.json_response({"status": "success"})
    response = web.StreamResponse(headers={"Content-Type": NDJSON, "Cache-Control": "no-cache"})
    request[STREAMING] = response
    await response.prepare(request)
    await response.write(_line({"status": "pulling manifest"}))
    try:
        while not (work.done() and said.empty()):
            getter = asyncio.ensure_future(said.get())
            await asyncio.wait({getter, work}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                await response.write(_line(getter.result()))
            else:
                getter.cancel()
        work.result()
        await response.write(_line({"status": "success"}))
    except ForgeError as exc:
        await response.write(_stream_error(exc))
    await response.write_eof()
    return response


ROUTES = [
    Route("GET", "/api/version", version, "Ollama: the API version this node follows"),
    Route("GET", "/api/tags", tags, "Ollama: models this node serves"),
    Route("POST", "/api/show", show, "Ollama: a model's details, metadata and template"),
    Route("GET", "/api/ps", ps, "Ollama: models loaded now"),
    Route("POST", "/api/chat", chat,
          "Ollama: chat (NDJSON stream by default); every call is a trade"),
    Route("POST", "/api/generate", generate,
          "Ollama: generate from a prompt (NDJSON stream by default); every call is a trade"),
    Route("POST", "/api/embed", embed, "Ollama: embeddings of `input`; every call is a trade"),
    Route("POST", "/api/embeddings", embeddings,
          "Ollama (older form): the embedding of `prompt`; every call is a trade"),
    Route("POST", "/api/pull", pull, "Ollama: download a model (operator)"),
]
