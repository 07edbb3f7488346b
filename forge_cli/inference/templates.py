"""Chat templates: render a conversation with the GGUF's own Jinja template; when the file has
none, Gemma's turn format for Gemma models (their vocabulary has its tokens) and ChatML for
the rest (what llama.cpp itself falls back to).

Templates run in Jinja's sandbox: a model file is data, and its template must not reach Python.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

from forge_cli.errors import ModelError
from forge_cli.inference import tools

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_STOPS = ("<|im_end|>", "<|im_start|>")
# Gemma has no system role: the system text opens the first user turn.
GEMMA = (
    "{{ bos_token }}{% set pending = namespace(system='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set pending.system = message['content'] + '\n\n' %}"
    "{% else %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else 'user') + '\n' }}"
    "{% if message['role'] != 'assistant' %}{{ pending.system }}"
    "{% set pending.system = '' %}{% endif %}"
    "{{ message['content'] + '<end_of_turn>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
GEMMA_STOPS = ("<end_of_turn>", "<start_of_turn>")


@dataclass(frozen=True)
class ChatTemplate:
    """A template plus what it needs: the special-token texts and extra stop strings."""

    source: str
    origin: str  # "gguf", "fallback (ChatML)" or "fallback (Gemma)"
    bos_token: str = ""
    eos_token: str = ""

    @property
    def stops(self) -> tuple[str, ...]:
        return {CHATML: CHATML_STOPS, GEMMA: GEMMA_STOPS}.get(self.source, ())

    @property
    def speaks_tools(self) -> bool:
        """Whether the template renders tools itself, in the format forge reads
        (forge_cli.inference.tools)."""
        return tools.speaks_tools(self.source)

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
               offered: tools.Tools | None = None) -> str:
        """The prompt text for `messages` ([{"role": "user", "content": "hi"}, …]), with the
        tools `offered` shown (natively, or by forge's fallback: see forge_cli.inference.tools)."""
        shown, declared = tools.template_input(messages, offered, native=self.speaks_tools)
        return render(self.source, shown, bos_token=self.bos_token, eos_token=self.eos_token,
                      add_generation_prompt=add_generation_prompt, tools=declared)


def _raise(message: str) -> None:
    raise ModelError(f"the model's chat template refused the conversation: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=8)
def _compile(source: str) -> Any:
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals.update(raise_exception=_raise, strftime_now=_strftime_now)
    try:
        return env.from_string(source)
    except TemplateError as exc:
        raise ModelError(f"the model's chat template does not compile: {exc}") from exc


def render(source: str, messages: list[dict[str, Any]], *, bos_token: str = "",
           eos_token: str = "", add_generation_prompt: bool = True,
           tools: list[dict[str, Any]] | None = None) -> str:
    from jinja2 import TemplateError

    try:
        return _compile(source).render(
            messages=messages, bos_token=bos_token, eos_token=eos_token,
            add_generation_prompt=add_generation_prompt, tools=tools,
        )
    except TemplateError as exc:
        raise ModelError(f"the model's chat template failed: {exc}") from exc


def for_model(metadata: dict[str, str], bos_token: str, eos_token: str) -> ChatTemplate:
    """The GGUF's template (tokenizer.chat_template), or a fallback when it has none."""
    source = (metadata.get("tokenizer.chat_template") or "").strip()
    if source:
        return ChatTemplate(source, "gguf", bos_token, eos_token)
    if metadata.get("general.architecture", "").startswith("gemma"):
        return ChatTemplate(GEMMA, "fallback (Gemma)", bos_token, eos_token)
    return ChatTemplate(CHATML, "fallback (ChatML)", bos_token, eos_token)
