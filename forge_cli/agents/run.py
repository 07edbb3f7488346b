"""An agent run inside the node: request → plan → waves of paid tasks → verdicts → one answer.

Every call (coordinator, task, synthesizer) is a real chat completion on the node's engine,
bought by the run's account in a TradeSession — the reservation, the safety gates and the
dual-signed trade are exactly those of `/v1/chat/completions`. Every step is an
`agent` ledger entry whose `parent` is its causal parent:

    request ─ plan ─┬─ task ─ result ─ verdict     (one chain per task attempt)
                    ├─ answer                      (data edges: `inputs` = the result seqs used)
                    └─ stop | error                (why a run ended without an answer)

A task's `inputs` name the results of its dependencies (data edges); a result names its trade.
A resumed run's request has the old run's last entry as parent.

Budget: before each call the run holds the call's maximum cost (max_tokens × the price) next
to what it has spent and what calls in flight hold; a call that could take the run over the
budget is not started. Calls in flight finish (their maximum was held, so even they cannot
overshoot) and the `stop` entry says how many there were.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from forge_cli.agents import plan as plans
from forge_cli.agents import record
from forge_cli.errors import (
    ApprovalRequired,
    ForgeError,
    KillSwitchActive,
    RunStopped,
    SelfTrade,
    SpendDenied,
    UsageError,
)
from forge_cli.ledger.entries import Entry, trade_cost
from forge_cli.trade.seams import Node
from forge_cli.trade.session import TradeSession

APPROVAL_POLL_S = 0.2
CONTEXT_CHARS = 1500  # of each earlier result shown to a task or the synthesizer
PLANNER_SYSTEM = (
    "You are the coordinator of a team. Split the user's request into at most 6 small tasks "
    "and reply with JSON only, in this shape: "
    '{"tasks": [{"id": "a", "prompt": "…", "deps": []}, '
    '{"id": "b", "prompt": "…", "deps": ["a"]}]}. '
    "An id is a short word; deps names the tasks whose results a task needs.")
TASK_SYSTEM = "You are a careful worker. Do the task; answer with the result only."
SYNTH_SYSTEM = ("You write the final answer to the user's request from the results of the "
                "tasks below. Answer once, clearly.")


@dataclass(frozen=True)
class Limits:
    """What a run may spend and how it runs."""

    budget_cu: int | None = None
    max_calls: int | None = None
    max_tokens: int = 256
    concurrency: int = 4
    approval_wait_s: int = 0
    mode: str = "balanced"  # how a task on a peer's model picks the peer: cost|quality|balanced


@dataclass(frozen=True)
class Call:
    text: str
    cu: int
    trade: int | None
    tokens: int


def new_run_id() -> str:
    return "ag_" + secrets.token_hex(6)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Remote:
    """A task placed on a mesh peer: bought like a forwarded request (forge_cli.trade.forwarding)."""

    name: str
    params: int = 0


def remote_models(node: Node) -> set[str]:
    """Models that unflagged mesh peers offer and this node does not serve."""
    if node.mesh is None:
        return set()
    from forge_cli.trade import forwarding

    return {s.model for s in forwarding.all_sellers(node)} - set(node.models)


def placement(node: Node, task: plans.Task, default: Any) -> list[Any]:
    """Where a task runs, in the order to try: its own model (or the run's), then one stronger
    model (more parameters) to escalate to when the result fails validation.

    A task naming a model only mesh peers offer is bought from the best peer (`Remote`,
    routed by the run's mode like `/v1/forge/route`); everything else runs on this node.
    """
    if task.model and task.model not in node.models:
        return [Remote(task.model)]
    first = node.model(task.model) if task.model else default
    stronger = [m for m in node.models.values() if m.params > first.params]
    return [first] + ([max(stronger, key=lambda m: m.params)] if stronger else [])


def check(task: plans.Task, call: Call) -> tuple[bool, str]:
    """The validator: a cheap deterministic check of a result (non-empty; `expect` if given)."""
    if not call.text.strip():
        return False, f"empty result after {call.tokens} tokens"
    if task.expect is not None and task.expect not in call.text:
        return False, f"result does not contain {task.expect!r}"
    return True, f"{call.tokens} tokens" + (f", contains {task.expect!r}" if task.expect else "")


class Run:
    """One run's state: what it spent, holds and started, and how to record a step."""

    def __init__(self, node: Node, who: Any, model: Any, limits: Limits) -> None:
        self.node, self.who, self.model, self.limits = node, who, model, limits
        self.id = new_run_id()
        self.spent = 0  # CU of settled calls
        self.held = 0  # CU held for calls started and not yet settled
        self.calls = 0  # calls started (or being started)
        self.in_flight = 0  # calls started and not yet settled (they hold `held`)
        self.halt: tuple[str, str, int] | None = None  # gate, reason, calls in flight then
        self.request_seq = 0
        self.plan_seq: int | None = None

    async def record(self, step: str, parent: int | None, bodies: tuple[bytes, ...] = (),
                     **data: Any) -> Entry:
        return await self.node.append(record.KIND, {"run": self.id, "step": step, **data},
                                      parent=parent, bodies=bodies)

    def _stop(self, gate: str, reason: str, *, own: int = 0) -> None:
        """Remember the first reason to stop (with the other calls in flight) and raise."""
        if self.halt is None:
            self.halt = (gate, reason, self.in_flight - own)
        raise RunStopped

    # -- one paid call ---------------------------------------------------------------------

    async def call(self, model: Any, messages: list[dict[str, str]], max_tokens: int,
                   label: str, opened: Callable[[Any], Awaitable[None]] | None = None) -> Call:
        """Check the limits, reserve through the safety gates, generate, settle the trade."""
        if self.halt is not None:
            raise RunStopped
        limits = self.limits
        if limits.max_calls is not None and self.calls >= limits.max_calls:
            self._stop("max_calls", f"call limit: {self.calls} calls started of at most "
                       f"{limits.max_calls}; {label} was not started")
        if isinstance(model, Remote):
            # A peer's advertised price, at the worst reputation surcharge (×2): the quote
            # below can only be lower.
            from forge_cli.trade import forwarding

            offers = [s.price_ucu_per_token for s in forwarding.sellers(self.node, model.name)]
            price = 2 * max(offers, default=0)
        else:
            price = self.node.price(model)
        hold = trade_cost(max_tokens, price)
        self._check_budget(hold, label, f"up to {max_tokens} tokens at {price / 1e6:.2f} CU/token")
        # Held before the first await, so calls started side by side cannot both squeeze in.
        self.held += hold
        self.calls += 1
        self.in_flight += 1
        try:
            try:
                session, forward = await self._open(model, messages, max_tokens)
            except SpendDenied as exc:
                self.calls -= 1
                self._stop(exc.gate, exc.message, own=1)
            self.held += session.max_cu - hold
            hold = session.max_cu
            if limits.budget_cu is not None and self.spent + self.held > limits.budget_cu:
                # The price moved between the estimate and the quote: give the reservation back.
                await session.close()
                self.calls -= 1
                self.held -= hold
                hold = 0
                self._stop("budget", self._over_budget(session.max_cu, label,
                                                       "at the price quoted just now"), own=1)
            return await self._generate(session, forward, messages, label, opened)
        finally:
            self.held -= hold
            self.in_flight -= 1

    def _check_budget(self, cu: int, label: str, how: str) -> None:
        budget = self.limits.budget_cu
        if budget is not None and self.spent + self.held + cu > budget:
            self._stop("budget", self._over_budget(cu, label, how))

    def _over_budget(self, cu: int, label: str, how: str) -> str:
        in_flight = f" + {self.held:,} CU held by calls in flight" if self.held else ""
        return (f"budget: {self.spent:,} CU spent{in_flight} + {cu:,} CU for {label} ({how}) "
                f"would exceed the budget of {self.limits.budget_cu:,} CU; {label} was not "
                "started")

    async def _open(self, model: Any, messages: list[dict[str, str]],
                    max_tokens: int) -> tuple[TradeSession, Any]:
        """An open session for the call, waiting up to approval_wait_s for a person when the
        spend needs approval. For a `Remote` model: a peer's quote and a session at it, with
        the forward that buys from the peer."""
        from forge_cli.trade import forwarding
        from forge_cli.trade.session import request_bytes

        # Greedy sampling: a plan's results are repeatable, which resume relies on least of all
        # but tests and audits like.
        payload = {"model": model.name, "messages": messages, "max_tokens": max_tokens,
                   "temperature": 0, "seed": 0}
        request = request_bytes(payload)
        deadline = time.monotonic() + self.limits.approval_wait_s
        forward = None
        if isinstance(model, Remote):
            forward = await forwarding.forward(self.node, self.who, model.name, max_tokens,
                                               request, self.limits.mode)
            session = forward.session
        else:
            session = self.node.buyer_session(self.who, model=model, max_tokens=max_tokens,
                                              request=request)
        while True:
            try:
                return await session.open(), forward
            except ApprovalRequired as exc:
                if time.monotonic() >= deadline:
                    raise
                await self._await_approval(exc, deadline)

    async def _await_approval(self, pending: ApprovalRequired, deadline: float) -> None:
        while time.monotonic() < deadline:
            await asyncio.sleep(APPROVAL_POLL_S)
            if self.node.safety_killed():
                raise KillSwitchActive(f"kill switch: activated while the run waited for "
                                       f"approval {pending.approval_id}")
            status = self.node.approval_status(pending.approval_id) or "requested"
            if status == "approved":
                return
            if status != "requested":
                raise SpendDenied(f"approval: {pending.approval_id} was {status}", gate="approval")
        raise SpendDenied(f"{pending.message}; no one approved it within "
                          f"{self.limits.approval_wait_s} s", gate="approval")

    async def _generate(self, session: TradeSession, forward: Any,
                        messages: list[dict[str, str]], label: str,
                        opened: Callable[[Any], Awaitable[None]] | None) -> Call:
        from forge_cli.inference.engine import Sampling

        node = self.node
        sampling = Sampling(max_tokens=session.max_tokens, temperature=0.0, seed=0)
        try:
            async with session:
                if opened is not None:
                    await opened(session)
                if forward is not None:
                    pump = forward.start(node, {"messages": messages, "temperature": 0, "seed": 0})
                else:
                    served = node.model(session.model.name)  # not forwarded: served here
                    pump = await node.pump(
                        lambda: served.engine.chat(messages, sampling, block=False))
                async for _ in session.run(pump):
                    pass
                if not session.killed:
                    await session.settle()
        finally:
            self.spent += session.settled.cu if session.settled is not None else 0
        if session.killed:
            self._stop("kill_switch", f"kill switch: activated while {label} was generating; it "
                       "stopped and nothing was charged for it", own=1)
        completion = session.completion
        settled = session.settled
        assert settled is not None
        return Call(session.text, settled.cu, settled.trade_seq,
                    completion.completion_tokens if completion is not None else 0)

    # -- recording how it ends ---------------------------------------------------------------

    async def record_stop(self) -> None:
        assert self.halt is not None
        gate, reason, in_flight = self.halt
        if in_flight:
            reason += (f"; {in_flight} call(s) already in flight finished and were paid (their "
                       "maximum cost was held, so they stayed within the limits)")
        await self.record("stop", self.plan_seq if self.plan_seq is not None else self.request_seq,
                          gate=gate, reason=reason[:1000], spent_cu=self.spent, calls=self.calls,
                          in_flight=in_flight)


def _context(request: str, results: list[tuple[str, str]]) -> str:
    parts = [f"Request: {request}"]
    for task_id, text in results:
        parts.append(f"[{task_id}] {text[:CONTEXT_CHARS]}")
    return "\n\n".join(parts)


async def execute(node: Node, who: Any, request: str, *, model_name: str | None, limits: Limits,
                  plan_source: str | dict[str, Any] | list[Any] | None = None,
                  resume: dict[str, Any] | None = None) -> str:
    """Run an agent request to its end (answer, stop or error), recording every step.

    Returns the run id. `resume` is the summary of an earlier run of the same account: its
    plan is reused and so is every result whose verdict passed.
    """
    if who.is_operator:
        raise SelfTrade("an agent run spends from an account, and the operator's is this node's "
                        "own: buying from yourself is refused",
                        hint="pass account=NAME (`forge agent run --account NAME`); "
                        "`forge wallet agent create NAME` makes one")
    run = Run(node, who, node.model(model_name), limits)
    entry = await run.record(
        "request", resume["last_seq"] if resume else None, bodies=(request.encode(),),
        account=who.account_hex, request_sha256=_sha(request), budget_cu=limits.budget_cu,
        max_calls=limits.max_calls, resumes=resume["run"] if resume else None,
        model=run.model.name, max_tokens=limits.max_tokens)
    run.request_seq = entry.seq
    plan = await _plan(run, request, plan_source, resume)
    if plan is None:
        return run.id
    reused = resume["passed"] if resume else {}
    results: dict[str, tuple[int, str]] = {}
    for wave_no, wave in enumerate(plan.waves):
        for task in wave:
            if task.id in reused:
                result_seq, verdict_seq = reused[task.id]
                await run.record("task", run.plan_seq, task=task.id, wave=wave_no, attempt=0,
                                 model=None, deps=list(task.deps), inputs=[], max_cu=None,
                                 reuse=verdict_seq)
                text = node.entry_body(result_seq, "result_sha256")
                results[task.id] = (result_seq, (text or b"").decode("utf-8", "replace"))
        todo = [t for t in wave if t.id not in reused]
        gate = asyncio.Semaphore(limits.concurrency)
        outcomes = await asyncio.gather(
            *(_task(run, request, task, wave_no, results, gate) for task in todo),
            return_exceptions=True)
        if run.halt is not None:
            await run.record_stop()
            return run.id
        for task, outcome in zip(todo, outcomes):
            if isinstance(outcome, BaseException):
                if not isinstance(outcome, ForgeError):
                    await run.record("error", run.plan_seq, stage="internal",
                                     reason=f"{type(outcome).__name__}: {outcome}"[:1000],
                                     body_sha256=None, trade=None, cu=0)
                    raise outcome
                await run.record("error", run.plan_seq, stage="task",
                                 reason=f"task {task.id!r}: {outcome.message}"[:1000],
                                 body_sha256=None, trade=None, cu=0)
                return run.id
        for task, outcome in zip(todo, outcomes):
            assert not isinstance(outcome, BaseException)  # each one returned above
            ok, seq, detail = outcome
            if not ok:
                await run.record("error", seq, stage="validate",
                                 reason=f"task {task.id!r} failed validation: {detail}"[:1000],
                                 body_sha256=None, trade=None, cu=0)
                return run.id
            results[task.id] = (seq, detail)
    await _answer(run, request, plan, results)
    return run.id


async def _plan(run: Run, request: str, source: Any, resume: dict[str, Any] | None
                ) -> plans.Plan | None:
    """The plan (from the caller, the old run, or the coordinator model), recorded; or None
    when the run ended here (plan rejected, or stopped before the coordinator could run)."""
    node, limits = run.node, run.limits
    planner, trade, cu, model_name = "file", None, 0, None
    if resume is not None and resume.get("plan_text") is not None:
        planner, source = "resume", resume["plan_text"]
    elif source is None:
        planner, model_name = "model", run.model.name
        messages = [{"role": "system", "content": PLANNER_SYSTEM},
                    {"role": "user", "content": request}]
        try:
            call = await run.call(run.model, messages, limits.max_tokens, "the coordinator")
        except RunStopped:
            await run.record_stop()
            return None
        source, trade, cu = call.text, call.trade, call.cu
    try:
        plan = plans.parse(source, models=set(node.models) | remote_models(node),
                           max_tokens_limit=min(m.engine.n_ctx for m in node.models.values()))
    except plans.PlanRejected as exc:
        text = source if isinstance(source, str) else _json(source)
        await run.record("error", run.request_seq, bodies=(text.encode(),), stage="plan",
                         reason=f"plan rejected: {exc.message}"[:1000], body_sha256=_sha(text),
                         trade=trade, cu=cu)
        return None
    text = plan.canonical_text()
    entry = await run.record("plan", run.request_seq, bodies=(text.encode(),), planner=planner,
                             model=model_name, trade=trade, cu=cu, plan_sha256=_sha(text),
                             tasks=len(plan.tasks), waves=len(plan.waves))
    run.plan_seq = entry.seq
    return plan


def _json(value: Any) -> str:
    import json

    return json.dumps(value, sort_keys=True, ensure_ascii=False)


async def _task(run: Run, request: str, task: plans.Task, wave: int,
                results: dict[str, tuple[int, str]], gate: asyncio.Semaphore
                ) -> tuple[bool, int, str]:
    """Run one task (escalating once if its result fails); (passed, seq, text or reason)."""
    inputs = [results[d][0] for d in task.deps]
    context = _context(request, [(d, results[d][1]) for d in task.deps])
    messages = [{"role": "system", "content": TASK_SYSTEM},
                {"role": "user", "content": f"{context}\n\nYour task: {task.prompt}"}]
    max_tokens = task.max_tokens or run.limits.max_tokens
    verdict_seq, reason = 0, ""
    for attempt, model in enumerate(placement(run.node, task, run.model), start=1):
        started: dict[str, int] = {}

        async def opened(reservation: Any, model: Any = model, attempt: int = attempt,
                         started: dict[str, int] = started) -> None:
            entry = await run.record("task", run.plan_seq, task=task.id, wave=wave,
                                     attempt=attempt, model=model.name, deps=list(task.deps),
                                     inputs=inputs, max_cu=reservation.max_cu, reuse=None)
            started["seq"] = entry.seq

        async with gate:
            call = await run.call(model, messages, max_tokens, f"task {task.id!r}", opened)
        result = await run.record("result", started["seq"], bodies=(call.text.encode(),),
                                  task=task.id, model=model.name, trade=call.trade, cu=call.cu,
                                  completion_tokens=call.tokens, result_sha256=_sha(call.text))
        ok, reason = check(task, call)
        verdict = await run.record("verdict", result.seq, task=task.id, ok=ok,
                                   check="deterministic", reason=reason)
        if ok:
            return True, result.seq, call.text
        verdict_seq = verdict.seq
    return False, verdict_seq, reason


async def _answer(run: Run, request: str, plan: plans.Plan,
                  results: dict[str, tuple[int, str]]) -> None:
    messages = [{"role": "system", "content": SYNTH_SYSTEM},
                {"role": "user", "content": _context(request, [(t.id, results[t.id][1])
                                                               for t in plan.tasks])}]
    try:
        call = await run.call(run.model, messages, run.limits.max_tokens, "the synthesizer")
    except RunStopped:
        await run.record_stop()
        return
    await run.record("answer", run.plan_seq, bodies=(call.text.encode(),), model=run.model.name,
                     trade=call.trade, cu=call.cu, answer_sha256=_sha(call.text),
                     inputs=[results[t.id][0] for t in plan.tasks])


def resumable(ledger: Any, run_id: str) -> dict[str, Any]:
    """What `execute(resume=…)` needs from an earlier run, or UsageError if it cannot resume."""
    summary = record.summarize(ledger, run_id)
    if summary["status"] == "answered":
        raise UsageError(f"run {run_id} already has its answer (seq {summary['answer_seq']}); "
                         "there is nothing to resume")
    if summary["status"] == "rejected":
        raise UsageError(f"run {run_id} ended with its plan rejected; start a new run with a "
                         "valid plan")
    plan_text = None
    if summary["plan"] is not None:
        body = ledger.body(ledger.entry(summary["plan"]["seq"]).data["plan_sha256"])
        plan_text = body.decode() if body is not None else None
    return {"run": run_id, "last_seq": summary["seqs"][-1], "account": summary["account"],
            "request": summary["request"], "plan_text": plan_text,
            "budget_cu": summary["budget_cu"], "max_calls": summary["max_calls"],
            "model": summary["model"], "max_tokens": summary["max_tokens"],
            "passed": record.passed_results(ledger, run_id)}
