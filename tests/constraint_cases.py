"""What constrained-decoding tests share: a JSON schema whose replies finish within a few dozen
tokens even on the tiny GGUF, the check that a reply matches it, and the hostile constraints
every channel must refuse before anything is reserved."""

from __future__ import annotations

import json
from typing import Any

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "n", "ok"],
          "properties": {"name": {"type": "string", "maxLength": 6},
                         "n": {"type": "integer", "minimum": 0, "maximum": 999},
                         "ok": {"type": "boolean"}}}


def schema_of(schema: Any, name: str = "thing") -> dict[str, Any]:
    """OpenAI's response_format for a JSON schema."""
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}


AS_SCHEMA = schema_of(SCHEMA)
AS_OBJECT = {"type": "json_object"}


def matches_schema(text: str) -> bool:
    """Whether `text` is JSON matching SCHEMA, its keys in the schema's order."""
    value = json.loads(text)
    return (list(value) == ["name", "n", "ok"] and isinstance(value["name"], str)
            and len(value["name"]) <= 6 and type(value["n"]) is int and 0 <= value["n"] <= 999
            and isinstance(value["ok"], bool))


def deep(levels: int) -> dict[str, Any]:
    """A response_format whose schema nests `levels` objects (twice as many JSON levels)."""
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema_of(schema, "deep")


HUGE = {"type": "object", "properties": {f"k{i}": {"type": "string", "description": "x" * 200}
                                         for i in range(400)}}
SELF = {"type": "object", "properties": {"a": {"$ref": "#/$defs/a"}},
        "$defs": {"a": {"$ref": "#/$defs/a"}}}
# (id, response_format, what the 400 says). A 100-deep schema is 200 JSON levels: a body that
# deep is refused unread by the one parser (HTTP: 400; P2P: the signed request, 422 BadIntent).
HOSTILE = [
    ("converter", schema_of({"type": "frobnicate"}),
     "response_format.json_schema.schema cannot be turned into a grammar: Unrecognized schema"),
    ("huge", schema_of(HUGE), "response_format.json_schema.schema is larger than 64 KiB"),
    ("deep-20", deep(20), "response_format.json_schema.schema nests deeper than 32 levels"),
    ("deep-100", deep(100), "is nested more than 64 levels deep"),
    ("string", "json", "'response_format' must be an object, found str"),
    ("type", {"type": "yaml"}, "response_format.type must be 'text', 'json_object' or"),
    ("llama-cpp", schema_of(SELF), "the grammar does not parse (llama.cpp refused it)"),
]
