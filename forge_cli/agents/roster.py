"""The roster: agent lanes a task can be routed to, read from TOML `[[agent]]` tables, and the
lexical router that picks a lane by keyword hits (a model classifier decides when it cannot).

A lane is `name`, `category`, `domain`, `keywords` (a non-empty list of words), `model_tier`
(cheap, capable or frontier), `executor` (forge, subprocess, openai or anthropic) and
`max_turns` (attempts a task of the lane may take, escalation included). The executors other
than forge take their own keys: `argv` and `timeout_s` (subprocess); `base_url`, `model` and
`api_key_env` (openai); `model` (anthropic). Scores are integers in permille (no floats in what
the ledger hashes): a lane's score is its keyword hits × 1000 / its keyword count.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forge_cli.errors import UsageError

TIERS = ("cheap", "capable", "frontier")
EXECUTORS = ("forge", "subprocess", "openai", "anthropic")
LANE_KEYS = {"name", "category", "domain", "keywords", "model_tier", "executor", "max_turns",
             "argv", "timeout_s", "base_url", "model", "api_key_env"}
MAX_LANES = 64
MAX_KEYWORDS = 32
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,39}")
_WORD = re.compile(r"[a-z0-9]+")
DEFAULT_THRESHOLD_PM = 500
DEFAULT_MARGIN_PM = 150

# Shipped with forge: lanes the built-in coordinator can hand tasks to, all on forge's engine.
DEFAULT_ROSTER = """\
[[agent]]
name = "technical-writing"
category = "support"
domain = "docs"
keywords = ["readme", "docs", "guide", "intro", "write"]
model_tier = "cheap"
executor = "forge"
max_turns = 2

[[agent]]
name = "code-review"
category = "support"
domain = "quality"
keywords = ["review", "risks", "bugs", "security", "list"]
model_tier = "cheap"
executor = "forge"
max_turns = 2

[[agent]]
name = "cli-tools"
category = "engineering"
domain = "terminal"
keywords = ["cli", "command", "shell", "terminal", "tool"]
model_tier = "cheap"
executor = "forge"
max_turns = 2

[[agent]]
name = "backend"
category = "engineering"
domain = "services"
keywords = ["api", "database", "server", "endpoint", "schema"]
model_tier = "capable"
executor = "forge"
max_turns = 2

[[agent]]
name = "frontend"
category = "engineering"
domain = "web"
keywords = ["react", "css", "html", "component", "page"]
model_tier = "capable"
executor = "forge"
max_turns = 2

[[agent]]
name = "sre-ops"
category = "engineering"
domain = "operations"
keywords = ["deploy", "monitor", "incident", "latency", "uptime"]
model_tier = "capable"
executor = "forge"
max_turns = 2

[[agent]]
name = "research"
category = "research"
domain = "facts"
keywords = ["research", "compare", "facts", "sources", "find"]
model_tier = "cheap"
executor = "forge"
max_turns = 2

[[agent]]
name = "teaching"
category = "research"
domain = "explain"
keywords = ["explain", "teach", "lesson", "example", "beginner"]
model_tier = "cheap"
executor = "forge"
max_turns = 2

[[agent]]
name = "synthesis"
category = "research"
domain = "summary"
keywords = ["summarise", "summarize", "summary", "combine", "conclude"]
model_tier = "cheap"
executor = "forge"
max_turns = 2
"""


@dataclass(frozen=True)
class Lane:
    name: str
    category: str
    domain: str
    keywords: tuple[str, ...]
    model_tier: str = "cheap"
    executor: str = "forge"
    max_turns: int = 2
    argv: tuple[str, ...] = ()
    timeout_s: int = 60
    base_url: str | None = None
    model: str | None = None
    api_key_env: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "category": self.category,
                               "domain": self.domain, "keywords": list(self.keywords),
                               "model_tier": self.model_tier, "executor": self.executor,
                               "max_turns": self.max_turns}
        if self.executor != "forge":
            out["timeout_s"] = self.timeout_s
        if self.argv:
            out["argv"] = list(self.argv)
        for key in ("base_url", "model", "api_key_env"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


@dataclass(frozen=True)
class Roster:
    lanes: tuple[Lane, ...]
    source: str  # "built-in", or the file it came from

    def lane(self, name: str) -> Lane:
        found = next((lane for lane in self.lanes if lane.name == name), None)
        if found is None:
            raise UsageError(f"no lane {name!r} in the roster ({self.source}); lanes: "
                             f"{', '.join(self.names())}")
        return found

    def names(self) -> list[str]:
        return [lane.name for lane in self.lanes]

    @property
    def external(self) -> bool:
        """Whether any lane runs outside forge's engine (a command, or another API)."""
        return any(lane.executor != "forge" for lane in self.lanes)


def parse(text: str, where: str = "the roster") -> Roster:
    """A roster from TOML text, or UsageError naming the lane and the rule it breaks.

    >>> parse('[[agent]]\\nname="a"\\ncategory="c"\\ndomain="d"\\nkeywords=["x"]').names()
    ['a']
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{where} is not valid TOML: {exc}") from None
    extra = set(data) - {"agent"}
    if extra:
        raise UsageError(f"{where}: only [[agent]] tables are allowed, found {sorted(extra)}")
    rows = data.get("agent")
    if not isinstance(rows, list) or not rows:
        raise UsageError(f"{where} has no [[agent]] lanes")
    if len(rows) > MAX_LANES:
        raise UsageError(f"{where} has {len(rows)} lanes; at most {MAX_LANES} are allowed")
    lanes = [_lane(f"{where}: agent[{i}]", row) for i, row in enumerate(rows)]
    names = [lane.name for lane in lanes]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UsageError(f"{where}: lane names must be unique; {', '.join(twice)} repeat")
    return Roster(tuple(lanes), where)


def _lane(where: str, row: Any) -> Lane:
    if not isinstance(row, dict):
        raise UsageError(f"{where} must be a table")
    extra = set(row) - LANE_KEYS
    if extra:
        raise UsageError(f"{where} has unknown keys {sorted(extra)}; allowed: "
                         f"{', '.join(sorted(LANE_KEYS))}")
    name = row.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise UsageError(f"{where}: name must be 1 to 40 lower-case letters, digits, '-' or "
                         f"'_', found {name!r}")
    where = f"{where} ({name})"
    for key in ("category", "domain"):
        value = row.get(key)
        if not isinstance(value, str) or not value.strip() or len(value) > 80:
            raise UsageError(f"{where}: {key} must be non-empty text, found {value!r}")
    keywords = row.get("keywords")
    if (not isinstance(keywords, list) or not keywords or len(keywords) > MAX_KEYWORDS
            or not all(isinstance(k, str) and _WORD.fullmatch(k) for k in keywords)):
        raise UsageError(f"{where}: keywords must be a non-empty list of at most {MAX_KEYWORDS} "
                         f"lower-case words (letters and digits), found {keywords!r}")
    tier = row.get("model_tier", "cheap")
    if tier not in TIERS:
        raise UsageError(f"{where}: model_tier must be one of {', '.join(TIERS)}, found {tier!r}")
    executor = row.get("executor", "forge")
    if executor not in EXECUTORS:
        raise UsageError(f"{where}: executor must be one of {', '.join(EXECUTORS)}, "
                         f"found {executor!r}")
    max_turns = _int(where, row, "max_turns", 2, 1, 10)
    timeout_s = _int(where, row, "timeout_s", 60, 1, 3600)
    argv = row.get("argv", [])
    if not isinstance(argv, list) or not all(isinstance(a, str) and a for a in argv):
        raise UsageError(f"{where}: argv must be a list of non-empty strings")
    if (executor == "subprocess") != bool(argv):
        raise UsageError(f"{where}: argv is required by the subprocess executor, and only by it")
    text = {key: row.get(key) for key in ("base_url", "model", "api_key_env")}
    for key, value in text.items():
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise UsageError(f"{where}: {key} must be non-empty text")
    if executor == "openai" and (text["base_url"] is None or text["model"] is None):
        raise UsageError(f"{where}: the openai executor needs base_url and model")
    if text["base_url"] is not None and not re.match(r"https?://", text["base_url"]):
        raise UsageError(f"{where}: base_url must start with http:// or https://")
    if executor in ("forge", "subprocess") and any(text.values()):
        raise UsageError(f"{where}: base_url, model and api_key_env belong to the openai and "
                         "anthropic executors")
    return Lane(name, row["category"], row["domain"], tuple(keywords), tier, executor, max_turns,
                tuple(argv), timeout_s, text["base_url"], text["model"], text["api_key_env"])


def _int(where: str, row: dict[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = row.get(key, default)
    if type(value) is not int or not low <= value <= high:
        raise UsageError(f"{where}: {key} must be an integer from {low} to {high}, "
                         f"found {value!r}")
    return value


def default() -> Roster:
    return parse(DEFAULT_ROSTER, "built-in")


def load(path: str | Path | None) -> Roster:
    """The roster in `path`, or the built-in one when `path` is None or empty."""
    if not path:
        return default()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read roster {path}: {exc}") from None
    return parse(text, str(path))


# -- routing -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """How text was routed: `lane` (None when the keywords could not decide), by `method`
    (lexical, classifier or plan), with the top candidates' scores in permille."""

    lane: str | None
    method: str
    confidence_pm: int
    candidates: tuple[tuple[str, int], ...] = ()
    threshold_pm: int = DEFAULT_THRESHOLD_PM
    margin_pm: int = DEFAULT_MARGIN_PM
    detail: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"lane": self.lane, "method": self.method, "decided": self.lane is not None,
                "confidence_pm": self.confidence_pm, "threshold_pm": self.threshold_pm,
                "margin_pm": self.margin_pm,
                "candidates": [{"lane": n, "score_pm": s} for n, s in self.candidates],
                **self.detail}


def words(text: str) -> set[str]:
    return set(_WORD.findall(text.lower()))


def route(text: str, roster: Roster, *, threshold_pm: int = DEFAULT_THRESHOLD_PM,
          margin_pm: int = DEFAULT_MARGIN_PM) -> Decision:
    """The lexical router: the lane with the most keyword hits (as a share of its keywords)
    decides when its score reaches the threshold and leads the next by the margin.

    >>> r = parse('[[agent]]\\nname="docs"\\ncategory="c"\\ndomain="d"\\nkeywords=["readme","guide"]'
    ...           '\\n[[agent]]\\nname="api"\\ncategory="c"\\ndomain="d"\\nkeywords=["api","schema"]')
    >>> route("write the readme guide", r).lane
    'docs'
    """
    seen = words(text)
    scored = sorted(((lane.name, sum(k in seen for k in lane.keywords) * 1000
                      // len(lane.keywords)) for lane in roster.lanes),
                    key=lambda pair: (-pair[1], pair[0]))
    top = scored[0][1]
    second = scored[1][1] if len(scored) > 1 else 0
    decided = top >= threshold_pm and top - second >= margin_pm
    return Decision(scored[0][0] if decided else None, "lexical",
                    top if decided else top - second, tuple(scored[:5]), threshold_pm, margin_pm)
