"""A conversation with a local model: the messages kept across turns, how a one-shot prompt is
assembled from arguments and stdin, and what the REPL's slash commands mean.

The terminal side (reading lines, printing pieces) lives in `forge_cli.cli.chat_cmd`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from forge_cli.errors import UsageError
from forge_cli.inference.engine import Engine, Sampling, Stream


def join_prompt(arguments: list[str] | None, stdin_text: str | None) -> str:
    """stdin first, then the prompt words, as `git diff | forge chat "describe"` reads.

    >>> join_prompt(["describe", "this"], "diff --git a/x b/x\\n")
    'diff --git a/x b/x\\n\\ndescribe this'
    """
    prompt = " ".join(arguments or []).strip()
    piped = (stdin_text or "").strip("\n")
    if piped.strip() and prompt:
        return f"{piped}\n\n{prompt}"
    if piped.strip():
        return piped
    if prompt:
        return prompt
    raise UsageError("no prompt: give one as an argument or on stdin",
                     hint='forge chat "why is the sky blue?"  or  echo hi | forge chat')


@dataclass
class Conversation:
    """System prompt plus alternating user/assistant turns, replayed to the model each turn."""

    system: str | None = None
    turns: list[dict[str, str]] = field(default_factory=list)

    def messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns

    def ask(self, engine: Engine, text: str, sampling: Sampling) -> Stream:
        """Start the reply to `text`; call `answered` with what was shown once it ends."""
        self.turns.append({"role": "user", "content": text})
        try:
            return engine.chat(self.messages(), sampling)
        except BaseException:
            self.turns.pop()
            raise

    def answered(self, text: str) -> None:
        self.turns.append({"role": "assistant", "content": text})

    def forget_last_question(self) -> None:
        if self.turns and self.turns[-1]["role"] == "user":
            self.turns.pop()

    def reset(self) -> None:
        self.turns.clear()


REPL_HELP = """\
/exit, /bye      leave (Ctrl-D too; Ctrl-C twice at the prompt)
/system TEXT     set the system prompt (no TEXT: clear it)
/reset           forget the conversation (keeps the system prompt)
/help            this help
\"\"\"               start or end a multi-line message; a line ending in \\ continues too
Ctrl-C           stop the reply being generated"""


@dataclass(frozen=True)
class Command:
    name: str  # "exit" | "system" | "reset" | "help" | "say"
    text: str = ""


def parse_line(line: str) -> Command:
    """What a complete REPL input means: a slash command or a message to send."""
    stripped = line.strip()
    if stripped.startswith("/") and not stripped.startswith("//"):
        word, _, rest = stripped[1:].partition(" ")
        word = word.lower()
        if word in ("exit", "bye", "quit"):
            return Command("exit")
        if word == "system":
            return Command("system", rest.strip())
        if word in ("reset", "clear"):
            return Command("reset")
        if word in ("help", "?"):
            return Command("help")
        raise UsageError(f"unknown command /{word}; /help lists them")
    return Command("say", line.removeprefix("/") if stripped.startswith("//") else line)


class MultiLine:
    """Collects a message over several lines: between \"\"\" fences, or after a trailing \\."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.fenced = False

    @property
    def pending(self) -> bool:
        return bool(self.lines) or self.fenced

    def feed(self, line: str) -> str | None:
        """Add one typed line; the whole message when it is complete, else None."""
        if self.fenced:
            if line.rstrip().endswith('"""'):
                self.lines.append(line.rstrip()[:-3])
                return self._done()
            self.lines.append(line)
            return None
        if not self.lines and line.lstrip().startswith('"""'):
            rest = line.lstrip()[3:]
            if rest.rstrip().endswith('"""') and len(rest.rstrip()) >= 3:
                return rest.rstrip()[:-3]
            self.fenced = True
            if rest:
                self.lines.append(rest)
            return None
        if line.endswith("\\"):
            self.lines.append(line[:-1])
            return None
        self.lines.append(line)
        return self._done()

    def _done(self) -> str:
        text = "\n".join(self.lines).strip("\n")
        self.lines, self.fenced = [], False
        return text
