"""Plans: a JSON DAG of tasks, parsed strictly, checked, and cut into waves.

A plan is `{"tasks": [{"id", "prompt", "deps"?, "model"?, "max_tokens"?, "expect"?}, …]}`
(a bare list of tasks is accepted too). A model's reply may wrap the JSON in prose or a code
fence; the first `{` or `[` to its matching end is what is read. Everything else is rejected
with a message that names the task and the rule: cycles, unknown or duplicate ids, bad types.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from forge_cli.errors import PlanRejected

MAX_TASKS = 32
MAX_PROMPT = 4000
TASK_KEYS = {"id", "prompt", "deps", "model", "max_tokens", "expect"}
_ID = re.compile(r"[A-Za-z0-9_-]{1,32}")

__all__ = ["Plan", "PlanRejected", "Task", "extract_json", "parse"]


@dataclass(frozen=True)
class Task:
    id: str
    prompt: str
    deps: tuple[str, ...] = ()
    model: str | None = None
    max_tokens: int | None = None
    expect: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "prompt": self.prompt, "deps": list(self.deps)}
        for key in ("model", "max_tokens", "expect"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


@dataclass(frozen=True)
class Plan:
    tasks: tuple[Task, ...]
    waves: tuple[tuple[Task, ...], ...]

    def to_json(self) -> dict[str, Any]:
        return {"tasks": [t.to_json() for t in self.tasks]}

    def canonical_text(self) -> str:
        """The plan as it is stored in the ledger's bodies (sorted keys, stable)."""
        return json.dumps(self.to_json(), sort_keys=True, ensure_ascii=False, indent=1)

    def wave_of(self, task_id: str) -> int:
        return next(i for i, wave in enumerate(self.waves) if any(t.id == task_id for t in wave))


def extract_json(text: str) -> Any:
    """The first JSON object or array in `text` (a model may add prose around it)."""
    starts = [i for i in (text.find("{"), text.find("[")) if i >= 0]
    if not starts:
        raise PlanRejected("plan is not JSON: no '{' or '[' in the coordinator's reply")
    try:
        value, _ = json.JSONDecoder().raw_decode(text, min(starts))
    except json.JSONDecodeError as exc:
        raise PlanRejected(f"plan is not valid JSON: {exc.msg} at line {exc.lineno} column "
                           f"{exc.colno}") from None
    return value


def parse(source: str | dict[str, Any] | list[Any], *, models: set[str], max_tokens_limit: int) -> Plan:
    """Check a plan (text or decoded JSON) and return it with its waves, or raise PlanRejected.

    >>> parse('{"tasks":[{"id":"a","prompt":"x"},{"id":"b","prompt":"y","deps":["a"]}]}',
    ...       models=set(), max_tokens_limit=64).waves[1][0].id
    'b'
    """
    value = extract_json(source) if isinstance(source, str) else source
    if isinstance(value, dict):
        extra = set(value) - {"tasks"}
        if "tasks" not in value or extra:
            raise PlanRejected("plan must be an object with exactly one key, 'tasks' "
                               f"(found keys {sorted(value)})")
        value = value["tasks"]
    if not isinstance(value, list) or not value:
        raise PlanRejected("plan.tasks must be a non-empty list of tasks")
    if len(value) > MAX_TASKS:
        raise PlanRejected(f"plan has {len(value)} tasks; at most {MAX_TASKS} are allowed")
    tasks = [_task(i, item, models, max_tokens_limit) for i, item in enumerate(value)]
    seen: set[str] = set()
    for task in tasks:
        if task.id in seen:
            raise PlanRejected(f"task id {task.id!r} appears twice")
        seen.add(task.id)
    for task in tasks:
        for dep in task.deps:
            if dep not in seen:
                raise PlanRejected(f"task {task.id!r} depends on unknown task {dep!r}")
    return Plan(tuple(tasks), _waves(tasks))


def _task(i: int, item: Any, models: set[str], limit: int) -> Task:
    where = f"tasks[{i}]"
    if not isinstance(item, dict):
        raise PlanRejected(f"{where} must be an object, found {type(item).__name__}")
    extra = set(item) - TASK_KEYS
    if extra:
        raise PlanRejected(f"{where} has unknown keys {sorted(extra)}; allowed: "
                           f"{', '.join(sorted(TASK_KEYS))}")
    task_id = item.get("id")
    if not isinstance(task_id, str) or not _ID.fullmatch(task_id):
        raise PlanRejected(f"{where}.id must be 1 to 32 letters, digits, '_' or '-', "
                           f"found {task_id!r}")
    where = f"task {task_id!r}"
    prompt = item.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip() or len(prompt) > MAX_PROMPT:
        raise PlanRejected(f"{where}: prompt must be non-empty text of at most {MAX_PROMPT} "
                           "characters")
    deps = item.get("deps", [])
    if not isinstance(deps, list) or not all(isinstance(d, str) for d in deps):
        raise PlanRejected(f"{where}: deps must be a list of task ids")
    if len(set(deps)) != len(deps):
        raise PlanRejected(f"{where}: deps lists a task twice")
    if task_id in deps:
        raise PlanRejected(f"{where} depends on itself (a cycle)")
    model = item.get("model")
    if model is not None and (not isinstance(model, str) or model not in models):
        raise PlanRejected(f"{where}: model {model!r} is not served by this node or offered by "
                           f"a mesh peer (known: {', '.join(sorted(models)) or 'nothing'})")
    max_tokens = item.get("max_tokens")
    if max_tokens is not None and (type(max_tokens) is not int or not 1 <= max_tokens <= limit):
        raise PlanRejected(f"{where}: max_tokens must be an integer between 1 and {limit}, "
                           f"found {max_tokens!r}")
    expect = item.get("expect")
    if expect is not None and (not isinstance(expect, str) or not expect or len(expect) > 200):
        raise PlanRejected(f"{where}: expect must be non-empty text of at most 200 characters")
    return Task(task_id, prompt, tuple(deps), model, max_tokens, expect)


def _waves(tasks: list[Task]) -> tuple[tuple[Task, ...], ...]:
    """Topological levels (Kahn): a task runs in the wave after its last dependency."""
    level: dict[str, int] = {}
    pending = list(tasks)
    while pending:
        ready = [t for t in pending if all(d in level for d in t.deps)]
        if not ready:
            cycle = _cycle({t.id: t.deps for t in pending})
            raise PlanRejected("plan has a cycle: " + " → ".join(cycle))
        for task in ready:
            level[task.id] = 1 + max((level[d] for d in task.deps), default=-1)
        pending = [t for t in pending if t.id not in level]
    count = max(level.values()) + 1
    return tuple(tuple(t for t in tasks if level[t.id] == n) for n in range(count))


def _cycle(deps: dict[str, tuple[str, ...]]) -> list[str]:
    """One cycle among tasks that never became ready, as ids (first repeated at the end)."""
    path: list[str] = []
    node = next(iter(deps))
    while node not in path:
        path.append(node)
        node = next(d for d in deps[node] if d in deps)
    return path[path.index(node):] + [node]
