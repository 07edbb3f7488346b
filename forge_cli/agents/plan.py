"""Plans: a JSON DAG of tasks, parsed strictly, checked, and cut into waves.

A plan is `{"tasks": [{"id", "prompt", "agent"?, "deps"?, "model"?, "max_tokens"?, "expect"?}, …]}`
(a bare list of tasks is accepted too). `agent` names a roster lane; a dependency is a data
edge (its result is shown to the task) unless it is written `{"id": "T1", "type": "order"}`,
which only orders the two. A model's reply may wrap the JSON in prose or a code
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
TASK_KEYS = {"id", "prompt", "agent", "deps", "model", "max_tokens", "expect"}
COORDINATOR_TASKS = (2, 3, 4)  # how many tasks the coordinator may plan
_ID = re.compile(r"[A-Za-z0-9_-]{1,32}")

__all__ = ["Plan", "PlanRejected", "Task", "coordinator_schema", "extract_json", "parse"]


@dataclass(frozen=True)
class Task:
    id: str
    prompt: str
    deps: tuple[str, ...] = ()
    model: str | None = None
    max_tokens: int | None = None
    expect: str | None = None
    agent: str | None = None
    order: frozenset[str] = frozenset()  # deps that only order (their result is not shown)

    @property
    def data_deps(self) -> tuple[str, ...]:
        return tuple(d for d in self.deps if d not in self.order)

    def to_json(self) -> dict[str, Any]:
        deps: list[Any] = [{"id": d, "type": "order"} if d in self.order else d
                           for d in self.deps]
        out: dict[str, Any] = {"id": self.id, "prompt": self.prompt, "deps": deps}
        for key in ("agent", "model", "max_tokens", "expect"):
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


def parse(source: str | dict[str, Any] | list[Any], *, models: set[str], max_tokens_limit: int,
          lanes: set[str] | None = None) -> Plan:
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
    tasks = [_task(i, item, models, max_tokens_limit, lanes) for i, item in enumerate(value)]
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


def _task(i: int, item: Any, models: set[str], limit: int, lanes: set[str] | None) -> Task:
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
    deps, order = _deps(where, item.get("deps", []))
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
    agent = item.get("agent")
    if agent is not None and (not isinstance(agent, str) or (lanes is not None
                                                            and agent not in lanes)):
        raise PlanRejected(f"{where}: agent {agent!r} is not a lane of the roster (lanes: "
                           f"{', '.join(sorted(lanes or ())) or 'none'})")
    return Task(task_id, prompt, tuple(deps), model, max_tokens, expect, agent, frozenset(order))


def _deps(where: str, deps: Any) -> tuple[list[str], set[str]]:
    """Dependency ids, and those that are order-only edges (`{"id", "type": "order"}`)."""
    if not isinstance(deps, list):
        raise PlanRejected(f"{where}: deps must be a list of task ids")
    ids: list[str] = []
    order: set[str] = set()
    for dep in deps:
        if isinstance(dep, dict):
            if set(dep) - {"id", "type"} or not isinstance(dep.get("id"), str) \
                    or dep.get("type", "data") not in ("data", "order"):
                raise PlanRejected(f"{where}: a dependency is a task id or "
                                   '{"id": ID, "type": "data"|"order"}, found ' + repr(dep))
            ids.append(dep["id"])
            if dep.get("type") == "order":
                order.add(dep["id"])
        elif isinstance(dep, str):
            ids.append(dep)
        else:
            raise PlanRejected(f"{where}: deps must be a list of task ids")
    return ids, order


def parts(request: str) -> list[str]:
    """The request's own parts, as instructions: its sentences and clauses (split at ';', '.',
    ', then' and 'and'), each with a capital letter; the whole request comes first.

    >>> parts("Write a short README intro for a CLI tool and list three risks")
    ['Write a short README intro for a CLI tool and list three risks', \
'Write a short README intro for a CLI tool', 'List three risks']
    """
    whole = " ".join(request.split())[:MAX_PROMPT]
    out = [whole]
    for sentence in re.split(r"[.;!?]+\s+|,\s*then\s+", whole):
        clauses = re.split(r",?\s+and\s+(?:then\s+)?", sentence)
        if any(len(c.split()) < 2 for c in clauses):  # "SQLite and LMDB" is one part
            clauses = [sentence]
        for clause in clauses:
            clause = re.sub(r"^(?:then|and)\s+", "", clause.strip(" ,.;!?"), flags=re.I)
            if len(clause) >= 3 and clause[:1].upper() + clause[1:] not in out:
                out.append(clause[:1].upper() + clause[1:])
    return out[:9]


def coordinator_schema(lanes: list[str], request: str) -> dict[str, Any]:
    """The JSON schema the coordinator's reply is decoded under: 2 to 4 tasks with ids T1…Tn,
    each naming a lane and depending only on earlier tasks, task n taking the request's n-th
    part (`parts`) as its prompt. Every plan it can write is a DAG with known ids and lanes,
    and no task is one the request did not ask for (a small model otherwise copies its
    example, or one part twice)."""
    found = parts(request)
    clauses = found[1:] if len(found) > 2 else [
        found[0], f"Check the draft answer to this request and improve it: {found[0]}"]

    def item(n: int) -> dict[str, Any]:
        earlier = [f"T{j}" for j in range(1, n)]
        deps: dict[str, Any] = ({"type": "array", "maxItems": 0, "items": {"type": "string"}}
                                if n == 1 else
                                {"type": "array", "maxItems": 1, "items": {"enum": earlier}})
        return {"type": "object", "properties": {
            "id": {"const": f"T{n}"}, "agent": {"enum": lanes},
            "prompt": {"const": clauses[n - 1]}, "deps": deps},
            "required": ["id", "agent", "prompt", "deps"], "additionalProperties": False}

    most = min(COORDINATOR_TASKS[-1], len(clauses))
    return {"type": "object", "properties": {"tasks": {"anyOf": [
        {"type": "array", "prefixItems": [item(n) for n in range(1, count + 1)], "items": False}
        for count in COORDINATOR_TASKS if count <= most]}},
        "required": ["tasks"], "additionalProperties": False}


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
