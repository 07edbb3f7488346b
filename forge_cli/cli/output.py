"""Printing for the CLI: JSON for scripts, rich for people, errors on stderr.

Whatever is printed may quote a peer or a stranger, so it goes out through `forge_cli.display`:
no control character reaches the terminal, whether stdout is one or a pipe.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from forge_cli import display
from forge_cli.errors import ForgeError


def print_error(exc: ForgeError) -> None:
    sys.stderr.write(f"forge: error: {display.plain(exc.message, lines=True)}\n")
    if exc.hint:
        sys.stderr.write(f"hint: {display.plain(exc.hint, lines=True)}\n")


def print_json(value: Any) -> None:
    sys.stdout.write(display.json_text(json.dumps(value, indent=2, sort_keys=True,
                                                  ensure_ascii=False)) + "\n")


def print_jsonl(value: Any) -> None:
    sys.stdout.write(json.dumps(value, sort_keys=True, separators=(",", ":")) + "\n")
