"""Tool calls: the tools a request offers (`Tools`), the grammar that makes every call the model
writes a valid one, the prompt that tells the model about them, and the calls read back out of
the text it wrote (`CallReader`, the same reader for a whole reply and for a stream).

The format is one block per call, the model's reply ending with its last block:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Where the model's own chat template speaks this format (it references `tools` and writes
`<tool_call>`: the Hermes format of Qwen 2.5 and its kin), the template renders the tools, the
assistant's earlier calls and the tool results itself. Every other template, smollm2:135m's
and gemma3:270m's included (neither references `tools`; gemma3:270m has no template at all), gets
forge's fallback: a system preamble describing the tools and the block format, earlier calls
written as blocks in the assistant's turn, and tool results handed back in a user turn as
`<tool_response>` blocks. Templates with another native format (Llama 3.1's, Mistral's) also get
the fallback: forge constrains and reads only this one format, so it never guesses at another.

Whichever renders the prompt, the reply is constrained the same way: `required` and a named
function allow only call blocks, `auto` allows prose that never contains `<tool_call>` unless a
valid call starts there, and each call's arguments follow its function's JSON schema.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from forge_cli.inference import grammar

OPEN, CLOSE = "<tool_call>", "</tool_call>"
MAX_TOOLS = 64
MAX_DESCRIPTION = 4096  # characters of one function's description
MAX_CALLS = 8  # calls one reply may make (parallel_tool_calls); a loop of calls ends there
NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # OpenAI's rule for function names

# What a call block's head looks like up to its arguments, the way the grammar writes it (and a
# little looser, for text that no grammar wrote: a peer's reply is read the same way).
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"([a-zA-Z0-9_-]{1,64})"\s*,\s*"arguments"\s*:\s*')
_HEAD_MAX = 200  # a head longer than this is not one


@dataclass(frozen=True)
class Tool:
    """One function the model may call: its JSON schema `parameters` describe an object."""

    name: str
    description: str
    parameters: dict[str, Any]

    def declaration(self) -> dict[str, Any]:
        """OpenAI's shape: what a chat template that speaks tools reads."""
        function: dict[str, Any] = {"name": self.name, "parameters": self.parameters}
        if self.description:
            function["description"] = self.description
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class Tools:
    """The tools a request offers and how it lets the model use them: `choice` is "none",
    "auto", "required" or "function" (then `named` is the one function it must call)."""

    tools: tuple[Tool, ...]
    choice: str = "auto"
    named: str | None = None
    parallel: bool = True

    @property
    def active(self) -> bool:
        """Whether the model may call a tool (with `none` the tools are not even shown)."""
        return bool(self.tools) and self.choice != "none"

    def grammar(self) -> str:
        """The GBNF the reply must match (see the module docstring); each function's
        arguments follow its schema, by llama-cpp-python's converter (bounded, a UsageError
        naming `tools[i].function.parameters` when it cannot take one)."""
        rules: list[str] = []
        calls: list[str] = []
        for i, tool in enumerate(self.tools):
            if self.choice == "function" and tool.name != self.named:
                continue
            args, text = grammar.schema_rules(tool.parameters, f"tools[{i}].function.parameters",
                                              prefix=f"t{i}-")
            rules.append(text)
            head = _literal(f'{OPEN}\n{{"name": "{tool.name}", "arguments": ')
            rules.append(f"call-{i} ::= {head} {args} {_literal('}' + chr(10) + CLOSE)}")
            calls.append(f"call-{i}")
        rules.append(f"call ::= {' | '.join(calls)}")
        many = self.parallel and self.choice != "function"
        rules.append('calls ::= call' + (f' ("\\n" call){{0,{MAX_CALLS - 1}}}' if many else ""))
        if self.choice == "auto":
            rules.append("root ::= prose calls?")
            rules.extend(_prose_rules())
        else:
            rules.append("root ::= calls")
        text = "\n".join(rules) + "\n"
        grammar.check_size(text, "the tools' grammar")
        return text

    def preamble(self) -> str:
        """The system text that tells a model without native tool support what it may call
        and how (forge's fallback format)."""
        lines = ["You can call functions to get information or act. The functions, one per "
                 "line, as JSON:"]
        lines += [json.dumps(t.declaration()["function"], ensure_ascii=False) for t in self.tools]
        lines += ["", "To call a function, write a block like this and nothing after it:",
                  OPEN, '{"name": "<function name>", "arguments": {<arguments as JSON>}}', CLOSE,
                  "Results come back to you inside <tool_response> blocks."]
        if self.choice == "required":
            lines.append("You must call at least one of the functions now.")
        elif self.choice == "function":
            lines.append(f"You must call the function {self.named} now.")
        else:
            lines.append("If no function helps, answer in plain text instead.")
        if self.parallel and self.choice != "function":
            lines.append(f"You may write up to {MAX_CALLS} blocks, one after another.")
        else:
            lines.append("Call one function at most.")
        return "\n".join(lines)


def _literal(text: str) -> str:
    """A GBNF string literal of `text` (JSON's escapes are GBNF's for these characters)."""
    return json.dumps(text, ensure_ascii=False)


def _prose_rules() -> list[str]:
    """Text in which `<tool_call>` never appears: a right-linear grammar over how much of
    `<tool_call>` the text has just written (prose-i: its first i characters)."""
    rules = ['prose ::= "" | [^<] prose | "<" prose-1']
    for i in range(1, len(OPEN)):
        want = OPEN[i]
        step = f" | {_literal(want)} prose-{i + 1}" if i + 1 < len(OPEN) else ""
        rules.append(f'prose-{i} ::= "" | "<" prose-1{step} | [^<{want}] prose')
    return rules


# -- the prompt ----------------------------------------------------------------------------------

def template_input(messages: list[dict[str, Any]], tools: Tools | None, *, native: bool
                   ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The messages and tools a chat template is given for this conversation: as they are
    when the template speaks the `<tool_call>` format (`native`), else in forge's fallback
    (the preamble, calls as blocks, results as a user turn); `tools` None or inactive shows no
    tools."""
    shown = tools if tools is not None and tools.active else None
    if native:
        declared = [t.declaration() for t in shown.tools] if shown else None
        return [_native(m) for m in messages], declared
    out: list[dict[str, Any]] = []
    for message in messages:
        role, content = message["role"], message.get("content") or ""
        if role == "assistant" and message.get("tool_calls"):
            blocks = [f'{OPEN}\n{{"name": "{c["function"]["name"]}", "arguments": '
                      f'{c["function"]["arguments"]}}}\n{CLOSE}' for c in message["tool_calls"]]
            out.append({"role": "assistant", "content": "\n".join(([content] if content else [])
                                                                   + blocks)})
        elif role == "tool":
            block = f"<tool_response>\n{content}\n</tool_response>"
            if out and out[-1].get("results"):  # results of one turn's calls: one user turn
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "results": True})
        else:
            out.append({"role": role, "content": content})
    out = [{"role": m["role"], "content": m["content"]} for m in out]
    if shown is not None:
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + shown.preamble()}
        else:
            out.insert(0, {"role": "system", "content": shown.preamble()})
    return out, None


def _native(message: dict[str, Any]) -> dict[str, Any]:
    """A message as templates that speak tools read it: content never null, and a call's
    arguments an object when they are one (those templates write them with `tojson`)."""
    out = {**message, "content": message.get("content") or ""}
    if message.get("tool_calls"):
        calls = []
        for call in message["tool_calls"]:
            arguments: Any = call["function"]["arguments"]
            try:
                parsed = json.loads(arguments)
            except ValueError:
                parsed = None
            if isinstance(parsed, dict):
                arguments = parsed
            calls.append({**call, "function": {**call["function"], "arguments": arguments}})
        out["tool_calls"] = calls
    return out


def speaks_tools(template_source: str) -> bool:
    """Whether a chat template renders tools itself in the `<tool_call>` format."""
    return "tools" in template_source and OPEN in template_source


# -- the reply -----------------------------------------------------------------------------------

@dataclass
class Call:
    """A call read from the reply: `arguments` is the JSON text the model wrote."""

    index: int
    id: str
    name: str
    arguments: str = ""


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class CallReader:
    """Reads a reply's text, piece by piece, into prose and calls. `feed` and `end` return
    events: ("text", str), ("call", Call) when a call's name is known, ("arguments", Call,
    str) for each further piece of its arguments. Text that might begin a block is held back
    until it is known not to; a block whose head is not a call is prose. After the first call
    the reply is calls only: anything between blocks is not text (the grammar allows only a
    newline there).

    >>> reader = CallReader()
    >>> events = reader.feed('<tool_call>\\n{"name": "f", "arguments": {"a": 1}}\\n</tool_call>')
    >>> [e[0] for e in events + reader.end()], reader.calls[0].arguments
    (['call', 'arguments'], '{"a": 1}')
    """

    def __init__(self, new_id: Callable[[], str] = call_id) -> None:
        self._new_id = new_id
        self._buffer = ""
        self._state = "text"  # "text", "head" (after <tool_call>), "arguments"
        self.text = ""  # the prose, as told
        self.calls: list[Call] = []

    def feed(self, piece: str) -> list[tuple[Any, ...]]:
        self._buffer += piece
        events: list[tuple[Any, ...]] = []
        steps = {"text": self._text, "head": self._head, "arguments": self._arguments}
        while True:  # until a step neither moves on nor consumes anything
            before = (self._state, len(self._buffer))
            events += steps[self._state](final=False)
            if (self._state, len(self._buffer)) == before:
                return events

    def end(self) -> list[tuple[Any, ...]]:
        """The text has ended (possibly cut by max_tokens): tell what was held back."""
        events = self.feed("")
        if self._state == "head":  # a block that never became a call is prose
            self._state, self._buffer = "text", OPEN + self._buffer
            events += self._say(self._buffer, len(self._buffer))
        if self._state == "arguments":
            events += self._arguments(final=True)
        elif self._buffer and not self.calls:
            events += self._say(self._buffer, len(self._buffer))
        self._buffer = ""
        return events

    def _say(self, text: str, upto: int) -> list[tuple[Any, ...]]:
        said, self._buffer = text[:upto], text[upto:]
        if self.calls:  # between and after blocks: not prose
            return []
        self.text += said
        return [("text", said)] if said else []

    def _text(self, *, final: bool) -> list[tuple[Any, ...]]:
        at = self._buffer.find(OPEN)
        if at >= 0:
            events = self._say(self._buffer, at)
            self._buffer = self._buffer[len(OPEN):]
            self._state = "head"
            return events
        keep = next((n for n in range(min(len(OPEN) - 1, len(self._buffer)), 0, -1)
                     if OPEN.startswith(self._buffer[-n:])), 0)
        return self._say(self._buffer, len(self._buffer) - keep)

    def _head(self, *, final: bool) -> list[tuple[Any, ...]]:
        found = _HEAD.match(self._buffer)
        if found and found.end() < len(self._buffer):  # the arguments have begun
            call = Call(len(self.calls), self._new_id(), found.group(1))
            self.calls.append(call)
            self._buffer = self._buffer[found.end():]
            self._state = "arguments"
            return [("call", call)]
        if CLOSE in self._buffer or len(self._buffer) > _HEAD_MAX or self._no_head():
            self._state = "text"  # not a call: "<tool_call>" was prose, and so is what follows
            if self.calls:  # after a call nothing is prose
                return []
            self.text += OPEN
            return [("text", OPEN)]
        return []

    def _no_head(self) -> bool:
        """Whether the buffer can no longer grow into a block head: a partial head matches
        the pattern as a prefix, which a regex cannot say; a non-JSON start is enough."""
        stripped = self._buffer.lstrip()
        return bool(stripped) and not stripped.startswith("{")

    def _arguments(self, *, final: bool) -> list[tuple[Any, ...]]:
        call = self.calls[-1]
        at = self._buffer.find(CLOSE)
        if at >= 0 or final:
            body = self._buffer[:at] if at >= 0 else self._buffer
            tail = body.rstrip()
            if at >= 0 and tail.endswith("}"):  # the block's own closing brace
                tail = tail[:-1].rstrip()
            self._buffer = self._buffer[at + len(CLOSE):] if at >= 0 else ""
            self._state = "text"
            return self._grow(call, tail)
        # Held back: a last "}" that may be the block's, whitespace, a beginning of </tool_call>.
        held = re.search(r"\}?\s*(<(/(t(o(o(l(_(c(a(l(l)?)?)?)?)?)?)?)?)?)?)?$", self._buffer)
        upto = held.start() if held else len(self._buffer)
        events = self._grow(call, self._buffer[:upto])
        self._buffer = self._buffer[upto:]
        return events

    def _grow(self, call: Call, more: str) -> list[tuple[Any, ...]]:
        if not more:
            return []
        call.arguments += more
        return [("arguments", call, more)]


def read_reply(text: str, new_id: Callable[[], str] = call_id) -> CallReader:
    """A whole reply read at once (what a non-streamed response tells)."""
    reader = CallReader(new_id)
    reader.feed(text)
    reader.end()
    return reader


__all__ = ["CLOSE", "MAX_CALLS", "MAX_DESCRIPTION", "MAX_TOOLS", "NAME", "OPEN", "Call",
           "CallReader", "Tool", "Tools", "call_id", "read_reply", "speaks_tools",
           "template_input"]
