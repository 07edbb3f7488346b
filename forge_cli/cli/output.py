"""Printing for the CLI: JSON for scripts, rich for people, errors on stderr."""

from __future__ import annotations

import json
import sys
from typing import Any

from forge_cli.errors import ForgeError


def print_error(exc: ForgeError) -> None:
    sys.stderr.write(f"forge: error: {exc.message}\n")
    if exc.hint:
        sys.stderr.write(f"hint: {exc.hint}\n")


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def print_jsonl(value: Any) -> None:
    sys.stdout.write(json.dumps(value, sort_keys=True, separators=(",", ":")) + "\n")
