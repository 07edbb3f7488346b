"""Agent runs as the ledger witnesses them: find a run's steps and summarise it.

Reads only the ledger (a reader connection is enough), so `forge agent show` works offline
and gives the same summary as the node's `GET /v1/forge/agent/runs/{id}`.
"""

from __future__ import annotations

import json
from typing import Any

from forge_cli.errors import UsageError
from forge_cli.ledger.entries import Entry, body_hash, leaf_hash

KIND = "agent"


def steps(ledger: Any, run: str) -> list[Entry]:
    """Every entry of `run`, in seq order; UsageError if there is none."""
    found = [e for e in ledger.iter_entries(kind=KIND) if e.data["run"] == run]
    if not found:
        raise UsageError(f"no agent run {run!r} in the ledger",
                         hint="run ids look like ag_0123456789ab; `forge ledger show -k agent` "
                         "lists the steps")
    return found


class _Reader:
    """Bodies of one run's entries, each checked against the hash its entry names: a body
    edited after the fact is reported, never shown as if it were witnessed."""

    def __init__(self, ledger: Any) -> None:
        self.ledger = ledger
        self.findings: list[str] = []

    def text(self, digest: str | None, seq: int, what: str) -> str | None:
        if digest is None:
            return None
        body = self.ledger.body(digest)
        if body is None:
            return None  # redacted or missing; `forge ledger get SEQ` says which
        if body_hash(body) != digest:
            self.findings.append(f"seq {seq}: the {what} body does not match the hash its entry "
                                 "records (tampered after it was witnessed)")
        return body.decode("utf-8", errors="replace")

    def check(self, entry: Entry) -> None:
        if leaf_hash(entry.raw) != entry.hash:
            self.findings.append(f"seq {entry.seq}: the entry's bytes do not match its hash")


def passed_results(ledger: Any, run: str) -> dict[str, tuple[int, int]]:
    """task id → (result seq, verdict seq) of every task whose result passed in `run`,
    including results that `run` itself reused from an earlier run. Only `run`'s own entries
    are read: a resume never picks up another run's results, even for the same task ids."""
    out: dict[str, tuple[int, int]] = {}
    for entry in steps(ledger, run):
        data = entry.data
        if data["step"] == "verdict" and data["ok"]:
            out[data["task"]] = (entry.fields["parent"], entry.seq)
        elif data["step"] == "task" and data["reuse"] is not None:
            verdict = ledger.entry(data["reuse"])
            out[data["task"]] = (verdict.fields["parent"], verdict.seq)
    return out


def _ids(deps: list[Any]) -> list[str]:
    return [d["id"] if isinstance(d, dict) else d for d in deps]


def summarize(ledger: Any, run: str) -> dict[str, Any]:
    """One run: request, plan, routes, tasks (lane, model, CU, verdict), spend, answer, intent.

    `status` is answered, planned (`forge agent plan`: planned and routed, nothing run),
    stopped (budget, call or seconds limit, or a safety gate), rejected (the plan), refused
    (the policy), failed (every task failed its check, or an engine error) or running.
    `integrity` lists bodies or entries of the run that do not match their hashes.
    """
    found = steps(ledger, run)
    read = _Reader(ledger)
    out: dict[str, Any] = {"run": run, "status": "running", "request": None, "account": None,
                           "budget_cu": None, "max_calls": None, "max_seconds": None,
                           "resumes": None, "model": None, "max_tokens": None, "roster": None,
                           "plan": None, "route": [], "tasks": [], "spent_cu": 0, "calls": 0,
                           "seconds": 0.0, "answer": None, "intent": None,
                           "verification": None, "stop": None, "error": None,
                           "integrity": [], "seqs": [e.seq for e in found]}
    tasks: dict[str, dict[str, Any]] = {}
    first_ts = found[0].fields["ts"]
    for entry in found:
        read.check(entry)
        data, seq = entry.data, entry.seq
        step = data["step"]
        if step == "request":
            out.update(request=read.text(data["request_sha256"], seq, "request"),
                       account=data["account"], budget_cu=data["budget_cu"],
                       max_calls=data["max_calls"], max_seconds=data.get("max_seconds"),
                       resumes=data["resumes"], model=data["model"],
                       max_tokens=data["max_tokens"], roster=data.get("roster"),
                       request_seq=seq)
        elif step == "plan":
            planner = "coordinator" if data["planner"] == "model" else data["planner"]
            out["plan"] = {"seq": seq, "planner": planner, "model": data["model"],
                           "trade": data["trade"], "cu": data["cu"], "tasks": data["tasks"],
                           "waves": data["waves"], "edges": data.get("edges", [])}
            out["spent_cu"] += data["cu"]
            out["calls"] += 1 if planner == "coordinator" else 0
            text = read.text(data["plan_sha256"], seq, "plan")
            for item in (json.loads(text)["tasks"] if text else []):
                tasks[item["id"]] = {"id": item["id"], "deps": _ids(item["deps"]),
                                     "order": [d["id"] for d in item["deps"]
                                               if isinstance(d, dict) and d.get("type") == "order"],
                                     "prompt": item["prompt"], "lane": item.get("agent"),
                                     "status": "not run", "model": item.get("model"),
                                     "wave": None, "attempts": 0, "cu": 0, "trades": [],
                                     "result_seq": None, "verdict": None, "result": None}
        elif step == "route":
            out["route"].append({"seq": seq, "task": data["task"], "lane": data["lane"],
                                 "method": data["method"], "confidence_pm": data["confidence_pm"],
                                 "candidates": data["candidates"], "trade": data["trade"],
                                 "cu": data["cu"]})
            out["spent_cu"] += data["cu"]
            out["calls"] += 1 if data["trade"] is not None else 0
            if data["task"] in tasks:
                tasks[data["task"]]["lane"] = data["lane"]
        elif step == "task":
            task = tasks.setdefault(data["task"], {"id": data["task"], "deps": data["deps"],
                                                   "cu": 0, "trades": [], "attempts": 0})
            task.update(wave=data["wave"], model=data["model"])
            if data.get("lane"):
                task["lane"] = data["lane"]
            if data["reuse"] is not None:
                verdict = ledger.entry(data["reuse"])
                result = ledger.entry(verdict.fields["parent"])
                task.update(status="reused", reused_from=data["reuse"], result_seq=result.seq,
                            model=result.data["model"], result=read.text(
                                result.data["result_sha256"], result.seq, "result"),
                            verdict={"ok": True, "check": verdict.data["check"],
                                     "reason": verdict.data["reason"],
                                     "score": verdict.data.get("score"), "seq": verdict.seq})
            else:
                task.update(status="running", attempts=task["attempts"] + 1,
                            tier=data.get("tier"))
                out["calls"] += 1
        elif step == "result":
            task = tasks[data["task"]]
            task["cu"] += data["cu"]
            out["spent_cu"] += data["cu"]
            if data["trade"] is not None:
                task["trades"].append(data["trade"])
            task.update(result_seq=seq, model=data["model"], status="checking",
                        result=read.text(data["result_sha256"], seq, "result"))
            if data.get("external_cost") is not None:
                task["external_cost"] = data["external_cost"]
            if data.get("external_trade_sha256") is not None:  # the seller's signed trade, held
                task["external_trade_sha256"] = data["external_trade_sha256"]
        elif step == "verdict":
            task = tasks[data["task"]]
            task["cu"] += data.get("cu", 0)
            out["spent_cu"] += data.get("cu", 0)
            if data.get("trade") is not None:
                out["calls"] += 1
            task.update(status="passed" if data["ok"] else "failed",
                        verdict={"ok": data["ok"], "check": data["check"],
                                 "reason": data["reason"], "score": data.get("score"),
                                 "seq": seq})
        elif step == "answer":
            out["spent_cu"] += data["cu"]
            out["calls"] += 1
            out.update(status="answered", answer=read.text(data["answer_sha256"], seq, "answer"),
                       answer_seq=seq, answer_model=data["model"], answer_trade=data["trade"])
        elif step == "intent":
            judgment = data["judgment"]
            if judgment is not None:
                out["spent_cu"] += judgment["cu"]
                out["calls"] += 1 if judgment["trade"] is not None else 0
            out["intent"] = {"seq": seq, "method": data["method"],
                             "coverage": data["coverage_pm"] / 1000,
                             "coverage_pm": data["coverage_pm"], "flagged": data["flagged"],
                             "missing": data["missing"], "terms": data["terms"],
                             "judgment": judgment}
        elif step == "verification":
            out["verification"] = {"seq": seq, "ok": data["ok"], "source": data["source"],
                                   "detail": data["detail"]}
        elif step == "stop":
            out.update(status="stopped", stop={"seq": seq, "gate": data["gate"],
                                               "reason": data["reason"],
                                               "in_flight": data["in_flight"]})
        elif step == "error":
            out["spent_cu"] += data["cu"]
            out["calls"] += 1 if data["trade"] is not None else 0
            status = {"plan": "rejected", "policy": "refused"}.get(data["stage"], "failed")
            out.update(status=status, error={"seq": seq, "stage": data["stage"],
                                             "reason": data["reason"]})
            if data.get("body_sha256"):
                out["error"]["text"] = read.text(data["body_sha256"], seq, "rejected plan")
        out["seconds"] = round((entry.fields["ts"] - first_ts) / 1000, 3)
    for task in tasks.values():
        if task["status"] in ("running", "checking"):
            task["status"] = "interrupted"
    if out["status"] == "running" and found[0].data.get("plan_only") and out["plan"]:
        out["status"] = "planned"
    out["tasks"] = list(tasks.values())
    out["integrity"] = read.findings
    return out


def describe(summary: dict[str, Any]) -> str:
    """The summary for a person: one line per task, then the outcome."""
    s = summary
    budget = "no budget" if s["budget_cu"] is None else f"budget {s['budget_cu']:,} CU"
    calls = "" if s["max_calls"] is None else f", at most {s['max_calls']} calls"
    secs = "" if not s.get("max_seconds") else f", at most {s['max_seconds']} s"
    lines = [f"run {s['run']}  {s['status']}  ({budget}{calls}{secs})"]
    for finding in s.get("integrity") or []:
        lines.append(f"TAMPERED {finding}")
    if s["resumes"]:
        lines.append(f"resumes  {s['resumes']}")
    if s["request"] is not None:
        lines.append(f"request  {_one_line(s['request'], 100)}")
    if s["plan"]:
        p = s["plan"]
        via = f"{p['planner']}" + (f" ({p['model']}, {p['cu']} CU)" if p["model"] else "")
        lines.append(f"plan     seq {p['seq']}: {p['tasks']} tasks in {p['waves']} waves, by {via}")
    for r in s.get("route") or []:
        how = r["method"] + (f", {r['cu']} CU" if r["trade"] is not None else "")
        top = ", ".join(f"{n} {v / 1000:.2f}" for n, v in r["candidates"][:3])
        lines.append(f"  route  {r['task']:<12} → {r['lane']:<18} by {how} (keywords: {top})")
    for t in s["tasks"]:
        deps = f" ← {','.join(t['deps'])}" if t["deps"] else ""
        verdict = t.get("verdict") or {}
        why = ""
        if verdict:
            score = "" if verdict.get("score") is None else f" {verdict['score']}/10"
            why = f" [{verdict.get('check')}{score}: {_one_line(verdict['reason'], 60)}]"
        model = t.get("model") or "-"
        wave = "-" if t.get("wave") is None else t["wave"]
        lane = t.get("lane") or "-"
        trades = f" trade {','.join(map(str, t['trades']))}" if t["trades"] else ""
        lines.append(f"  task {t['id']:<12} wave {wave}  {t['status']:<11} {lane:<18} "
                     f"{model:<20} {t['cu']:>6} CU{trades}{deps}{why}")
    lines.append(f"spent    {s['spent_cu']:,} CU in {s['calls']} calls, {s.get('seconds', 0):.1f} s")
    if s["stop"]:
        lines.append(f"stopped  [{s['stop']['gate']}] {s['stop']['reason']} (seq {s['stop']['seq']})")
    if s["error"]:
        lines.append(f"{s['status']:<8} [{s['error']['stage']}] {s['error']['reason']} "
                     f"(seq {s['error']['seq']})")
        if s["error"].get("text") is not None:
            lines.append(f"the text it was given:\n{s['error']['text']}")
    if s["answer"] is not None:
        lines.append(f"answer   (seq {s['answer_seq']}, {s['answer_model']})\n{s['answer']}")
    intent = s.get("intent")
    if intent:
        flag = "FLAGGED" if intent["flagged"] else "ok"
        missing = f"; missing: {', '.join(intent['missing'])}" if intent["missing"] else ""
        lines.append(f"intent   {flag}: covers {intent['coverage_pm'] / 10:.0f} % of the "
                     f"request's {intent['terms']} salient terms{missing}")
    if s.get("verification"):
        v = s["verification"]
        lines.append(f"verified {'ok' if v['ok'] else 'FAILED'} by {v['source']}: "
                     f"{_one_line(v['detail'], 80)}")
    return "\n".join(lines)


def runs(ledger: Any, limit: int = 50) -> list[dict[str, Any]]:
    """The newest runs first: id, status, request, CU, calls, seconds, tasks and verdicts."""
    ids: list[str] = []
    for entry in ledger.iter_entries(kind=KIND):
        if entry.data["step"] == "request":
            ids.append(entry.data["run"])
    out = []
    for run in reversed(ids[-limit:]):
        s = summarize(ledger, run)
        out.append(brief(s))
    return out


def brief(s: dict[str, Any]) -> dict[str, Any]:
    """The counts `list` and `compare` show of a run."""
    verdicts = [t["verdict"]["ok"] for t in s["tasks"] if t.get("verdict")]
    intent = s.get("intent") or {}
    return {"run": s["run"], "status": s["status"], "request": s["request"],
            "account": s["account"], "tasks": len(s["tasks"]),
            "passed": sum(verdicts), "failed": len(verdicts) - sum(verdicts),
            "spent_cu": s["spent_cu"], "calls": s["calls"], "seconds": s["seconds"],
            "coverage_pm": intent.get("coverage_pm"), "flagged": intent.get("flagged"),
            "planner": (s.get("plan") or {}).get("planner"),
            "tampered": bool(s.get("integrity"))}


COMPARED = ("tasks", "passed", "failed", "spent_cu", "calls", "seconds", "coverage_pm")


def compare(ledger: Any, a: str, b: str) -> dict[str, Any]:
    """Two runs side by side, and b − a for each count."""
    left, right = brief(summarize(ledger, a)), brief(summarize(ledger, b))
    delta = {k: (None if left[k] is None or right[k] is None else
                 round(right[k] - left[k], 3)) for k in COMPARED}
    return {"a": left, "b": right, "delta": delta}


def describe_compare(c: dict[str, Any]) -> str:
    a, b = c["a"], c["b"]
    rows = [f"{'':<12} {a['run']:>16} {b['run']:>16} {'b - a':>10}",
            f"{'status':<12} {a['status']:>16} {b['status']:>16}"]
    for key in COMPARED:
        d = c["delta"][key]
        rows.append(f"{key:<12} {_cell(a[key]):>16} {_cell(b[key]):>16} "
                    f"{'' if d is None else f'{d:+}':>10}")
    return "\n".join(rows)


def describe_runs(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no agent runs in this ledger"
    out = []
    for r in rows:
        cov = "-" if r["coverage_pm"] is None else f"{r['coverage_pm'] / 10:.0f}%"
        mark = " TAMPERED" if r["tampered"] else ""
        out.append(f"{r['run']}  {r['status']:<9} {r['passed']}/{r['tasks']} passed  "
                   f"{r['spent_cu']:>6} CU {r['calls']:>3} calls {r['seconds']:>7.1f} s  "
                   f"intent {cov:>4}{mark}  {_one_line(r['request'] or '', 50)}")
    return "\n".join(out)


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def _one_line(text: str, width: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[:width - 1] + "…"
