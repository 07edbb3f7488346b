"""Text from outside (a peer's node id, model names, a stranger's error) made safe to show.

A peer chooses its strings. Written raw, `\\x1b]0;…\\x07` retitles the operator's terminal and
`[link=…]` or `[/]` is markup to rich and Textual (a crash, or a forged link). Every place that
shows such a string goes through here: `plain` for terminals and logs, `markup` where rich or
Textual markup is parsed, `text` for a widget cell, `json_text` for JSON written to a terminal.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.text import Text

# C0 and C1 controls, DEL, and the Unicode format characters that reorder or break a line as
# shown (bidi embeddings, overrides and isolates; the line and paragraph separators).
_FORMAT = "\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069"
_UNSAFE_CHARS = re.compile(f"[\x00-\x1f\x7f-\x9f{_FORMAT}]")
_UNSAFE_IN_LINES = re.compile(f"[\x00-\x08\x0b-\x1f\x7f-\x9f{_FORMAT}]")  # keeps \t and \n
# What json.dumps(ensure_ascii=False) leaves raw inside strings: it escapes only C0 controls.
_UNSAFE_IN_JSON = re.compile(f"[\x7f-\x9f{_FORMAT}]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def plain(text: object, *, lines: bool = False) -> str:
    """`text` as a string with every control character written as a visible escape, so it
    shows as one line of what was sent, never as a terminal command (`lines`: keep newlines
    and tabs, for a message of several lines).

    >>> plain("tiny\\x1b]0;PWNED\\x07")
    'tiny\\\\x1b]0;PWNED\\\\x07'
    """
    return (_UNSAFE_IN_LINES if lines else _UNSAFE_CHARS).sub(_escape, str(text))


def markup(text: object) -> str:
    """`plain(text)` with rich markup escaped, for a string placed inside markup."""
    from rich.markup import escape

    return escape(plain(text))


def json_text(encoded: str) -> str:
    """JSON text (from `json.dumps(..., ensure_ascii=False)`) with the characters it leaves raw
    (DEL, C1 controls, bidi and line-separator characters) written as `\\u` escapes: the same
    JSON value, and nothing in it a terminal acts on."""
    return _UNSAFE_IN_JSON.sub(lambda m: f"\\u{ord(m.group()):04x}", encoded)


def text(value: object) -> Text:
    """`plain(value)` as a rich Text, which Textual and rich show as it is, never as markup
    (what a DataTable cell or a Static holding only outside text gets)."""
    from rich.text import Text

    return Text(plain(value))
