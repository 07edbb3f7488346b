"""Agent runs as the ledger witnesses them: find a run's steps and summarise it.

Reads only the ledger (a reader connection is enough), so `forge agent show` works offline
and gives the same summary as the node's `GET /v1/forge/agent/runs/{id}`.
"""

from __future__ import annotations

import json
from typing import Any

from forge_cli.errors import UsageError
from forge_cli.ledger.entries import Entry

KIND = "agent"


def steps(ledger: Any, run: str) -> list[Entry]:
    """Every entry of `run`, in seq order; UsageError if there is none."""
    found = [e for e in ledger.iter_entries(kind=KIND) if e.data["run"] == run]
    if not found:
        raise UsageError(f"no agent run {run!r} in the ledger",
                         hint="run ids look like ag_0123456789ab; `forge ledger show -k agent` "
                         "lists the steps")
    return found


def _text(ledger: Any, digest: str | None) -> str | None:
    if digest is None:
        return None
    body = ledger.body(digest)
    if body is None:
        return None  # redacted or missing; `forge ledger get SEQ` says which
    return body.decode("utf-8", errors="replace")


def passed_results(ledger: Any, run: str) -> dict[str, tuple[int, int]]:
    """task id → (result seq, verdict seq) of every task whose result passed in `run`,
    including results that `run` itself reused from an earlier run."""
    out: dict[str, tuple[int, int]] = {}
    results: dict[int, Entry] = {}
    for entry in steps(ledger, run):
        data = entry.data
        if data["step"] == "result":
            results[entry.seq] = entry
        elif data["step"] == "verdict" and data["ok"]:
            out[data["task"]] = (entry.fields["parent"], entry.seq)
        elif data["step"] == "task" and data["reuse"] is not None:
            verdict = ledger.entry(data["reuse"])
            out[data["task"]] = (verdict.fields["parent"], verdict.seq)
    return out


def summarize(ledger: Any, run: str) -> dict[str, Any]:
    """One run: request, tasks (model, CU, verdict), spend, and how it ended.

    `status` is answered, stopped (budget, call limit or a safety gate), rejected (the plan),
    failed (a task failed validation, or an engine error) or running.
    """
    found = steps(ledger, run)
    out: dict[str, Any] = {"run": run, "status": "running", "request": None, "account": None,
                           "budget_cu": None, "max_calls": None, "resumes": None, "model": None,
                           "max_tokens": None, "plan": None,
                           "tasks": [], "spent_cu": 0, "calls": 0, "answer": None, "stop": None,
                           "error": None, "seqs": [e.seq for e in found]}
    tasks: dict[str, dict[str, Any]] = {}
    for entry in found:
        data, seq = entry.data, entry.seq
        step = data["step"]
        if step == "request":
            out.update(request=_text(ledger, data["request_sha256"]), account=data["account"],
                       budget_cu=data["budget_cu"], max_calls=data["max_calls"],
                       resumes=data["resumes"], model=data["model"],
                       max_tokens=data["max_tokens"], request_seq=seq)
        elif step == "plan":
            out["plan"] = {"seq": seq, "planner": data["planner"], "model": data["model"],
                           "trade": data["trade"], "cu": data["cu"], "tasks": data["tasks"],
                           "waves": data["waves"]}
            out["spent_cu"] += data["cu"]
            out["calls"] += 1 if data["planner"] == "model" else 0
            text = _text(ledger, data["plan_sha256"])
            for item in (json.loads(text)["tasks"] if text else []):
                tasks[item["id"]] = {"id": item["id"], "deps": item["deps"],
                                     "prompt": item["prompt"], "status": "not run",
                                     "model": item.get("model"), "wave": None, "attempts": 0,
                                     "cu": 0, "trades": [], "result_seq": None, "verdict": None,
                                     "result": None}
        elif step == "task":
            task = tasks.setdefault(data["task"], {"id": data["task"], "deps": data["deps"],
                                                   "cu": 0, "trades": [], "attempts": 0})
            task.update(wave=data["wave"], model=data["model"])
            if data["reuse"] is not None:
                verdict = ledger.entry(data["reuse"])
                result = ledger.entry(verdict.fields["parent"])
                task.update(status="reused", reused_from=data["reuse"], result_seq=result.seq,
                            model=result.data["model"], result=_text(
                                ledger, result.data["result_sha256"]),
                            verdict={"ok": True, "reason": verdict.data["reason"],
                                     "seq": verdict.seq})
            else:
                task.update(status="running", attempts=task["attempts"] + 1)
                out["calls"] += 1
        elif step == "result":
            task = tasks[data["task"]]
            task["cu"] += data["cu"]
            out["spent_cu"] += data["cu"]
            if data["trade"] is not None:
                task["trades"].append(data["trade"])
            task.update(result_seq=seq, model=data["model"], status="checking",
                        result=_text(ledger, data["result_sha256"]))
        elif step == "verdict":
            task = tasks[data["task"]]
            task.update(status="passed" if data["ok"] else "failed",
                        verdict={"ok": data["ok"], "reason": data["reason"], "seq": seq,
                                 "check": data["check"]})
        elif step == "answer":
            out["spent_cu"] += data["cu"]
            out["calls"] += 1
            out.update(status="answered", answer=_text(ledger, data["answer_sha256"]),
                       answer_seq=seq, answer_model=data["model"], answer_trade=data["trade"])
        elif step == "stop":
            out.update(status="stopped", stop={"seq": seq, "gate": data["gate"],
                                               "reason": data["reason"],
                                               "in_flight": data["in_flight"]})
        elif step == "error":
            out["spent_cu"] += data["cu"]
            out["calls"] += 1 if data["trade"] is not None else 0
            out.update(status="rejected" if data["stage"] == "plan" else "failed",
                       error={"seq": seq, "stage": data["stage"], "reason": data["reason"]})
    for task in tasks.values():
        if task["status"] in ("running", "checking"):
            task["status"] = "interrupted"
    out["tasks"] = list(tasks.values())
    return out


def describe(summary: dict[str, Any]) -> str:
    """The summary for a person: one line per task, then the outcome."""
    s = summary
    budget = "no budget" if s["budget_cu"] is None else f"budget {s['budget_cu']:,} CU"
    calls = "" if s["max_calls"] is None else f", at most {s['max_calls']} calls"
    lines = [f"run {s['run']}  {s['status']}  ({budget}{calls})"]
    if s["resumes"]:
        lines.append(f"resumes  {s['resumes']}")
    if s["request"] is not None:
        lines.append(f"request  {_one_line(s['request'], 100)}")
    if s["plan"]:
        p = s["plan"]
        via = f"{p['planner']}" + (f" ({p['model']}, {p['cu']} CU)" if p["model"] else "")
        lines.append(f"plan     seq {p['seq']}: {p['tasks']} tasks in {p['waves']} waves, by {via}")
    for t in s["tasks"]:
        deps = f" ← {','.join(t['deps'])}" if t["deps"] else ""
        verdict = t.get("verdict") or {}
        why = f" ({verdict['reason']})" if verdict and not verdict.get("ok") else ""
        model = t.get("model") or "-"
        wave = "-" if t.get("wave") is None else t["wave"]
        trades = f" trade {','.join(map(str, t['trades']))}" if t["trades"] else ""
        lines.append(f"  task {t['id']:<12} wave {wave}  {t['status']:<11} {model:<20} "
                     f"{t['cu']:>6} CU{trades}{deps}{why}")
    lines.append(f"spent    {s['spent_cu']:,} CU in {s['calls']} calls")
    if s["stop"]:
        lines.append(f"stopped  [{s['stop']['gate']}] {s['stop']['reason']} (seq {s['stop']['seq']})")
    if s["error"]:
        lines.append(f"{s['status']:<8} [{s['error']['stage']}] {s['error']['reason']} "
                     f"(seq {s['error']['seq']})")
    if s["answer"] is not None:
        lines.append(f"answer   (seq {s['answer_seq']}, {s['answer_model']})\n{s['answer']}")
    return "\n".join(lines)


def _one_line(text: str, width: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[:width - 1] + "…"
