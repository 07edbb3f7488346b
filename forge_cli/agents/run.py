"""An agent run inside the node: request → plan → route → waves of tasks → verdicts → one
answer → intent coverage (→ verification).

Every forge call (coordinator, classifier, task, judge, synthesizer) is a real chat completion
on the node's engine or a mesh peer, bought by the run's account in a TradeSession — the
reservation, the safety gates and the dual-signed trade are exactly those of
`/v1/chat/completions`. A lane may run elsewhere (a command, an OpenAI-compatible endpoint,
Anthropic's API, forge_cli.agents.executors); those calls are witnessed the same way and count
as calls. Every step is an `agent` ledger entry whose `parent` is its causal parent:

    request ─ plan ─┬─ route                       (one per task: which lane, decided how)
                    ├─ task ─ result ─ verdict ─ task (escalated) ─ result ─ verdict
                    ├─ answer ─ intent (─ verification)
                    └─ stop | error                (why a run ended without an answer)

A task's `inputs` name the results of its data dependencies; a result names its trade.
A resumed run's request has the old run's last entry as parent.

Budget: before each call the run holds the call's maximum cost (max_tokens × the price) next
to what it has spent and what calls in flight hold; a call that could take the run over the
budget is not started. Calls in flight finish (their maximum was held, so even they cannot
overshoot) and the `stop` entry says how many there were. The seconds budget and the call
limit are checked before each call the same way.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from forge_cli.agents import executors, record
from forge_cli.agents import judge as judges
from forge_cli.agents import plan as plans
from forge_cli.agents import roster as rosters
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
JUDGE_TOKENS = 48  # the model judge's {ok, score, reason}
CLASSIFY_TOKENS = 24  # the classifier's {"lane": …}
VERIFY_TIMEOUT_S = 60
PLANNER_SYSTEM = (
    "You are the coordinator of a team. Split the user's request into its parts: one task for "
    "each part, 2 to 4 tasks in all. Each task's prompt is that part of the request, as an "
    "instruction. Each task names the lane (agent) that suits it. Reply with JSON.")
# One worked example, as a turn of the conversation: small models copy its shape, not its words.
PLANNER_SHOT = (
    "Explain what a hash table is and give two examples of its use",
    '{"tasks": [{"id": "T1", "agent": "%s", "prompt": "Explain what a hash table is", '
    '"deps": []}, {"id": "T2", "agent": "%s", "prompt": "Give two examples of the use of a '
    'hash table", "deps": ["T1"]}]}')
TASK_SYSTEM = ("You are a careful worker. Do only your task, briefly: at most five short lines. "
               "Answer with the result only.")
SYNTH_SYSTEM = ("You write the final answer to the user's request from the results of the "
                "tasks below. Answer once, clearly and briefly.")
CLASSIFY_SYSTEM = "Pick the lane best suited to the task. Reply with JSON: {\"lane\": NAME}."


@dataclass(frozen=True)
class Limits:
    """What a run may spend and how it runs."""

    budget_cu: int | None = None
    max_calls: int | None = None
    max_tokens: int = 256
    concurrency: int = 4
    approval_wait_s: int = 0
    mode: str = "balanced"  # how a task on a peer's model picks the peer: cost|quality|balanced
    max_seconds: int | None = None


@dataclass(frozen=True)
class Team:
    """Who does the work: the roster and how it is routed, judged and escalated."""

    roster: rosters.Roster = field(default_factory=rosters.default)
    threshold_pm: int = rosters.DEFAULT_THRESHOLD_PM
    margin_pm: int = rosters.DEFAULT_MARGIN_PM
    tiers: dict[str, tuple[str, ...]] = field(default_factory=dict)  # tier → model names
    judge: bool = True  # the model judge after the deterministic checks
    intent_judge: bool = False  # a model judgment when the intent check is flagged
    verifier: tuple[str, ...] = ()  # argv of a command that verifies the answer
    categories: tuple[str, ...] = ()  # lane categories a run may use; empty: all


@dataclass(frozen=True)
class Call:
    text: str
    cu: int
    trade: int | None
    tokens: int
    finish_reason: str = "stop"


def new_run_id() -> str:
    return "ag_" + secrets.token_hex(6)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


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


def is_base(node: Node, name: str) -> bool:
    """Whether the catalog marks `name` (a catalog name, or the file a node serves) as a base
    model: one that continues text rather than following instructions."""
    from forge_cli.inference import catalog

    served = node.models.get(name)
    path = getattr(served, "path", None)
    for entry in catalog.entries():
        if entry.name == name or (path is not None and path.name == entry.file):
            return entry.kind == "base"
    return False


def placement(node: Node, task: plans.Task, lane: rosters.Lane, default: Any,
              tiers: dict[str, tuple[str, ...]]) -> list[tuple[str, Any]]:
    """Where a task runs, as (tier, model) in the order to try: the task's own model (or the
    first model of the lane's tier, or the run's), then one model of each higher tier to
    escalate to when a verdict fails — never a base model — then the last one again, at most
    the lane's max_turns in all.

    A model only mesh peers offer is bought from the best peer (`Remote`, routed by the run's
    mode like `/v1/forge/route`); everything else runs on this node.
    """
    known = set(node.models) | remote_models(node)

    def resolve(name: str) -> Any:
        return node.model(name) if name in node.models else Remote(name)

    start = rosters.TIERS.index(lane.model_tier)
    if task.model:
        first = resolve(task.model)
    else:
        own = [n for n in tiers.get(lane.model_tier, ()) if n in known and not is_base(node, n)]
        first = resolve(own[0]) if own else default
    out = [(lane.model_tier, first)]
    for tier in rosters.TIERS[start + 1:]:
        names = [n for n in tiers.get(tier, ()) if n in known and not is_base(node, n)
                 and n not in {m.name for _, m in out}]
        if names:
            out.append((tier, resolve(names[0])))
    # No stronger model: the next turn retries the last one, told why its result failed.
    while len(out) < lane.max_turns:
        out.append(out[-1])
    return out[:lane.max_turns]


class Run:
    """One run's state: what it spent, holds and started, and how to record a step."""

    def __init__(self, node: Node, who: Any, model: Any, limits: Limits,
                 team: Team | None = None) -> None:
        self.node, self.who, self.model, self.limits = node, who, model, limits
        self.team = team or Team()
        self.id = new_run_id()
        self.started = time.monotonic()
        self.spent = 0  # CU of settled calls
        self.held = 0  # CU held for calls started and not yet settled
        self.calls = 0  # calls started (or being started)
        self.in_flight = 0  # calls started and not yet settled (they hold `held`)
        self.halt: tuple[str, str, int] | None = None  # gate, reason, calls in flight then
        self.request_seq = 0
        self.plan_seq: int | None = None
        self.planner = "file"  # or coordinator, resume

    async def record(self, step: str, parent: int | None, bodies: tuple[bytes, ...] = (),
                     **data: Any) -> Entry:
        return await self.node.append(record.KIND, {"run": self.id, "step": step, **data},
                                      parent=parent, bodies=bodies)

    def _stop(self, gate: str, reason: str, *, own: int = 0) -> None:
        """Remember the first reason to stop (with the other calls in flight) and raise."""
        if self.halt is None:
            self.halt = (gate, reason, self.in_flight - own)
        raise RunStopped

    def seconds_left(self) -> float | None:
        if self.limits.max_seconds is None:
            return None
        return self.limits.max_seconds - (time.monotonic() - self.started)

    def _admit(self, label: str) -> None:
        """The limits every call meets before it starts: a stop, the call limit, the seconds."""
        if self.halt is not None:
            raise RunStopped
        limits = self.limits
        if limits.max_calls is not None and self.calls >= limits.max_calls:
            self._stop("max_calls", f"call limit: {self.calls} calls started of at most "
                       f"{limits.max_calls}; {label} was not started")
        left = self.seconds_left()
        if left is not None and left <= 0:
            self._stop("max_seconds", f"seconds budget: {time.monotonic() - self.started:.0f} s "
                       f"used of at most {limits.max_seconds} s; {label} was not started")

    # -- one call on another executor -------------------------------------------------------

    async def external(self, lane: rosters.Lane, instruction: str, max_tokens: int,
                       label: str, opened: Callable[[Any], Awaitable[None]]) -> Any:
        """A call to the lane's executor outside forge: counted as a call, timed against the
        seconds budget (what is left of it bounds the call). `opened` records its start."""
        self._admit(label)
        self.calls += 1
        self.in_flight += 1
        try:
            await opened(None)
            left = self.seconds_left()
            return await executors.call(lane, TASK_SYSTEM, instruction, max_tokens,
                                        left if left is not None else float(lane.timeout_s))
        finally:
            self.in_flight -= 1

    # -- one paid call ---------------------------------------------------------------------

    async def call(self, model: Any, messages: list[dict[str, str]], max_tokens: int,
                   label: str, opened: Callable[[Any], Awaitable[None]] | None = None,
                   schema: dict[str, Any] | None = None) -> Call:
        """Check the limits, reserve through the safety gates, generate (under `schema`'s
        grammar when given), settle the trade."""
        self._admit(label)
        limits = self.limits
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
                session, forward = await self._open(model, messages, max_tokens, schema)
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
            return await self._generate(session, forward, messages, label, opened, schema)
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

    async def _open(self, model: Any, messages: list[dict[str, str]], max_tokens: int,
                    schema: dict[str, Any] | None) -> tuple[TradeSession, Any]:
        """An open session for the call, waiting up to approval_wait_s for a person when the
        spend needs approval. For a `Remote` model: a peer's quote and a session at it, with
        the forward that buys from the peer."""
        from forge_cli.trade import forwarding
        from forge_cli.trade.session import request_bytes

        # Greedy sampling: a plan's results are repeatable, which resume relies on least of all
        # but tests and audits like.
        payload = {"model": model.name, "messages": messages, "max_tokens": max_tokens,
                   "temperature": 0, "seed": 0, **_response_format(schema)}
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
                        opened: Callable[[Any], Awaitable[None]] | None,
                        schema: dict[str, Any] | None) -> Call:
        from forge_cli.inference import grammar
        from forge_cli.inference.engine import Sampling

        node = self.node
        sampling = Sampling(max_tokens=session.max_tokens, temperature=0.0, seed=0,
                            grammar=grammar.from_schema(schema) if schema else None)
        try:
            async with session:
                if opened is not None:
                    await opened(session)
                if forward is not None:
                    pump = forward.start(node, {"messages": messages, "temperature": 0, "seed": 0,
                                                **_response_format(schema)})
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
        tokens = completion.completion_tokens if completion is not None else 0
        finish = (completion.finish_reason if completion is not None
                  else "length" if tokens >= session.max_tokens else "stop")
        return Call(session.text, settled.cu, settled.trade_seq, tokens, finish)

    # -- recording how it ends ---------------------------------------------------------------

    async def record_stop(self) -> None:
        assert self.halt is not None
        gate, reason, in_flight = self.halt
        if in_flight:
            reason += (f"; {in_flight} call(s) already in flight finished and were paid (their "
                       "maximum cost was held, so they stayed within the limits)")
        await self.record("stop", self.plan_seq if self.plan_seq is not None else self.request_seq,
                          gate=gate, reason=reason[:1000], spent_cu=self.spent, calls=self.calls,
                          in_flight=in_flight, seconds_ms=self.elapsed_ms())

    def elapsed_ms(self) -> int:
        return int((time.monotonic() - self.started) * 1000)


def _response_format(schema: dict[str, Any] | None) -> dict[str, Any]:
    if schema is None:
        return {}
    return {"response_format": {"type": "json_schema",
                                "json_schema": {"name": "reply", "schema": schema}}}


def upstream(task_id: str, text: str, seq: int, limit: int = CONTEXT_CHARS) -> str:
    """An earlier result as a task or the synthesizer sees it: cut at `limit` characters with
    a marker saying how much was cut and where the whole output is witnessed."""
    if len(text) <= limit:
        return f"[{task_id}] {text}"
    return (f"[{task_id}] {text[:limit]}\n[… truncated: {len(text) - limit:,} of {len(text):,} "
            f"characters cut; the whole output is witnessed at ledger seq {seq} "
            f"(`forge ledger get {seq}`)]")


def _context(request: str, results: list[str]) -> str:
    return "\n\n".join([f"Request: {request}", *results])


async def execute(node: Node, who: Any, request: str, *, model_name: str | None, limits: Limits,
                  team: Team | None = None,
                  plan_source: str | dict[str, Any] | list[Any] | None = None,
                  resume: dict[str, Any] | None = None, plan_only: bool = False) -> str:
    """Run an agent request to its end (answer, stop or error), recording every step.

    Returns the run id. `resume` is the summary of an earlier run of the same account: its
    plan is reused and so is every result whose verdict passed. `plan_only` ends the run once
    its plan is made and routed (`forge agent plan`): the coordinator is paid, nothing else runs.
    """
    if who.is_operator:
        raise SelfTrade("an agent run spends from an account, and the operator's is this node's "
                        "own: buying from yourself is refused",
                        hint="pass account=NAME (`forge agent run --account NAME`); "
                        "`forge wallet agent create NAME` makes one")
    team = team or Team()
    run = Run(node, who, node.model(model_name), limits, team)
    lanes = _json([lane.to_json() for lane in team.roster.lanes])
    entry = await run.record(
        "request", resume["last_seq"] if resume else None, bodies=(request.encode(),
                                                                   lanes.encode()),
        account=who.account_hex, request_sha256=_sha(request), budget_cu=limits.budget_cu,
        max_calls=limits.max_calls, max_seconds=limits.max_seconds,
        resumes=resume["run"] if resume else None, model=run.model.name,
        max_tokens=limits.max_tokens, roster=team.roster.source, roster_sha256=_sha(lanes),
        **({"plan_only": True} if plan_only else {}))
    run.request_seq = entry.seq
    plan = await _plan(run, request, plan_source, resume)
    if plan is None:
        return run.id
    lanes_of = await _route_all(run, plan)
    if lanes_of is None or plan_only:
        return run.id
    reused = resume["passed"] if resume else {}
    results: dict[str, tuple[int, str]] = {}
    failed: dict[str, str] = {}
    for wave_no, wave in enumerate(plan.waves):
        for task in wave:
            if task.id in reused:
                result_seq, verdict_seq = reused[task.id]
                await run.record("task", run.plan_seq, task=task.id, wave=wave_no, attempt=0,
                                 model=None, deps=list(task.deps), inputs=[], max_cu=None,
                                 reuse=verdict_seq, lane=lanes_of[task.id].name)
                text = node.entry_body(result_seq, "result_sha256")
                results[task.id] = (result_seq, (text or b"").decode("utf-8", "replace"))
        todo = [t for t in wave if t.id not in reused]
        gate = asyncio.Semaphore(limits.concurrency)
        outcomes = await asyncio.gather(
            *(_task(run, request, task, lanes_of[task.id], wave_no, results, failed, gate)
              for task in todo), return_exceptions=True)
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
            if ok:
                results[task.id] = (seq, detail)
            else:
                failed[task.id] = detail
    if not results:
        await run.record("error", run.plan_seq, stage="validate",
                         reason=("every task failed its check: " + "; ".join(
                             f"{k}: {v}" for k, v in failed.items()))[:1000],
                         body_sha256=None, trade=None, cu=0)
        return run.id
    await _answer(run, request, plan, results, failed)
    return run.id


async def _plan(run: Run, request: str, source: Any, resume: dict[str, Any] | None
                ) -> plans.Plan | None:
    """The plan (from the caller, the old run, or the coordinator model), recorded; or None
    when the run ended here (plan rejected, or stopped before the coordinator could run)."""
    node, limits, roster = run.node, run.limits, run.team.roster
    planner, trade, cu, model_name = "file", None, 0, None
    if resume is not None and resume.get("plan_text") is not None:
        planner, source = "resume", resume["plan_text"]
    elif source is None:
        planner, model_name = "coordinator", run.model.name
        try:
            call = await run.call(run.model, coordinator_messages(request, roster),
                                  limits.max_tokens, "the coordinator",
                                  schema=plans.coordinator_schema(roster.names(), request))
        except RunStopped:
            await run.record_stop()
            return None
        source, trade, cu = call.text, call.trade, call.cu
    try:
        plan = plans.parse(source, models=set(node.models) | remote_models(node),
                           max_tokens_limit=min(m.engine.n_ctx for m in node.models.values()),
                           lanes=set(roster.names()))
    except plans.PlanRejected as exc:
        text = source if isinstance(source, str) else _json(source)
        await run.record("error", run.request_seq, bodies=(text.encode(),), stage="plan",
                         reason=f"plan rejected: {exc.message}"[:1000], body_sha256=_sha(text),
                         trade=trade, cu=cu, planner=planner)
        return None
    run.planner = planner
    text = plan.canonical_text()
    edges = [{"from": d, "to": t.id, "type": "order" if d in t.order else "data"}
             for t in plan.tasks for d in t.deps]
    entry = await run.record("plan", run.request_seq, bodies=(text.encode(),), planner=planner,
                             model=model_name, trade=trade, cu=cu, plan_sha256=_sha(text),
                             tasks=len(plan.tasks), waves=len(plan.waves), edges=edges)
    run.plan_seq = entry.seq
    return plan


def coordinator_messages(request: str, roster: rosters.Roster) -> list[dict[str, str]]:
    lanes = "; ".join(f"{lane.name} ({lane.domain}: {', '.join(lane.keywords[:5])})"
                      for lane in roster.lanes)
    shot_q, shot_a = PLANNER_SHOT
    first, second = (rosters.route(p, roster).candidates[0][0] for p in
                     ("Explain what a hash table is", "Give two examples of the use"))
    return [{"role": "system", "content": f"{PLANNER_SYSTEM} Lanes: {lanes}."},
            {"role": "user", "content": shot_q},
            {"role": "assistant", "content": shot_a % (first, second)},
            {"role": "user", "content": request}]


async def _route_all(run: Run, plan: plans.Plan) -> dict[str, rosters.Lane] | None:
    """Every task's lane, each decision a `route` step; None when the run ended here (a lane
    outside the allowed categories, or a stop while the classifier was needed)."""
    team = run.team
    out: dict[str, rosters.Lane] = {}
    for task in plan.tasks:
        lexical = rosters.route(task.prompt, team.roster, threshold_pm=team.threshold_pm,
                                margin_pm=team.margin_pm)
        trade, cu = None, 0
        if task.agent is not None and (run.planner != "coordinator" or lexical.lane is None):
            # A plan's own lane stands; the coordinator's only where the keywords do not
            # decide (the deterministic router goes first, as for a task with no lane).
            method = "coordinator" if run.planner == "coordinator" else "plan"
            name = task.agent
        elif lexical.lane is not None:
            method, name = "lexical", lexical.lane
        else:
            method = "classifier"
            try:
                name, trade, cu = await _classify(run, task.prompt)
            except RunStopped:
                await run.record_stop()
                return None
        lane = team.roster.lane(name)
        await run.record("route", run.plan_seq, task=task.id, lane=name, method=method,
                         category=lane.category, executor=lane.executor,
                         confidence_pm=lexical.confidence_pm,
                         candidates=[[n, s] for n, s in lexical.candidates],
                         threshold_pm=team.threshold_pm, margin_pm=team.margin_pm,
                         trade=trade, cu=cu)
        if team.categories and lane.category not in team.categories:
            await run.record("error", run.plan_seq, stage="policy",
                             reason=(f"policy: task {task.id!r} was routed to lane {name!r} of "
                                     f"category {lane.category!r}; this node's agents may use "
                                     f"only {', '.join(team.categories)} (agents.categories)"),
                             body_sha256=None, trade=None, cu=0)
            return None
        out[task.id] = lane
    return out


async def _classify(run: Run, text: str) -> tuple[str, int | None, int]:
    """The classifier: the run's model picks a lane, its reply constrained to the lane names."""
    roster = run.team.roster
    lanes = "\n".join(f"- {lane.name}: {lane.domain} ({', '.join(lane.keywords)})"
                      for lane in roster.lanes)
    messages = [{"role": "system", "content": f"{CLASSIFY_SYSTEM}\nLanes:\n{lanes}"},
                {"role": "user", "content": text}]
    schema = {"type": "object", "properties": {"lane": {"enum": roster.names()}},
              "required": ["lane"], "additionalProperties": False}
    call = await run.call(run.model, messages, CLASSIFY_TOKENS, "the classifier", schema=schema)
    try:
        name = json.loads(call.text)["lane"]
        roster.lane(name)
    except (ValueError, KeyError, TypeError, UsageError):
        name = roster.lanes[0].name  # a reply cut short: the first lane, recorded as such
    return name, call.trade, call.cu


async def _task(run: Run, request: str, task: plans.Task, lane: rosters.Lane, wave: int,
                results: dict[str, tuple[int, str]], failed: dict[str, str],
                gate: asyncio.Semaphore) -> tuple[bool, int, str]:
    """Run one task on its lane, escalating by tier while its verdict fails;
    (passed, seq of the result or the last verdict, text or reason)."""
    inputs = [results[d][0] for d in task.data_deps if d in results]
    shown = [upstream(d, results[d][1], results[d][0]) if d in results
             else f"[{d}] (failed its check: {failed.get(d, 'not run')}; its result is not used)"
             for d in task.data_deps]
    instruction = f"{_context(request, shown)}\n\nYour task (only this part): {task.prompt}"
    messages = [{"role": "system", "content": TASK_SYSTEM},
                {"role": "user", "content": instruction}]
    max_tokens = task.max_tokens or run.limits.max_tokens
    verdict_seq, reason = 0, ""
    if lane.executor != "forge":
        attempts: list[tuple[str, Any]] = [(lane.model_tier, None)]
    else:
        attempts = placement(run.node, task, lane, run.model, run.team.tiers)
    for attempt, (tier, model) in enumerate(attempts, start=1):
        parent = run.plan_seq if attempt == 1 else verdict_seq
        if attempt > 1 and model is not None and model is attempts[attempt - 2][1]:
            # The same model again, framed anew (greedy decoding would repeat itself word for
            # word): the request and earlier results as the setting, the task alone to do.
            messages = [{"role": "system", "content": f"{TASK_SYSTEM}\n\n{_context(request, shown)}"},
                        {"role": "user", "content": f"{task.prompt}\n\n(Answer in at most "
                         "three short lines.)"}]
        started: dict[str, int] = {}
        model_name = model.name if model is not None else executors.label(lane)

        async def opened(reservation: Any, model_name: str = model_name, attempt: int = attempt,
                         tier: str = tier, parent: int | None = parent,
                         started: dict[str, int] = started) -> None:
            entry = await run.record("task", parent, task=task.id, wave=wave,
                                     attempt=attempt, model=model_name, deps=list(task.deps),
                                     inputs=inputs, max_cu=getattr(reservation, "max_cu", None),
                                     reuse=None, lane=lane.name, tier=tier,
                                     executor=lane.executor)
            started["seq"] = entry.seq

        async with gate:
            if model is None:
                ext = await run.external(lane, instruction, max_tokens, f"task {task.id!r}",
                                         opened)
                text, finish, tokens = ext.text, ext.finish_reason, ext.completion_tokens or 0
                witness = {"trade": None, "cu": 0, **ext.witness()}
                model_name = ext.model
                held = (ext.trade_record,) if ext.trade_record is not None else ()
            else:
                call = await run.call(model, messages, max_tokens, f"task {task.id!r}", opened)
                text, finish, tokens = call.text, call.finish_reason, call.tokens
                witness = {"trade": call.trade, "cu": call.cu, "finish_reason": finish}
                held = ()
        result = await run.record("result", started["seq"], bodies=(text.encode(), *held),
                                  task=task.id, model=model_name, completion_tokens=tokens,
                                  result_sha256=_sha(text), **witness)
        if model is None and not witness["call_ok"]:
            verdict, judged = judges.Verdict(False, "executor", f"the {lane.executor} executor "
                                             f"failed: {witness['detail'] or finish}"), None
        else:
            verdict, judged = await _judge(run, task, text, finish, tokens, max_tokens)
            if not verdict.reason and verdict.score is not None:
                verdict = judges.Verdict(verdict.ok, verdict.check,
                                         f"the judge gave {verdict.score}/10", verdict.score)
        entry = await run.record("verdict", result.seq, task=task.id, ok=verdict.ok,
                                 check=verdict.check, reason=verdict.reason[:500],
                                 score=verdict.score, trade=judged.trade if judged else None,
                                 cu=judged.cu if judged else 0)
        if verdict.ok:
            return True, result.seq, text
        verdict_seq, reason = entry.seq, verdict.reason
    return False, verdict_seq, reason


async def _judge(run: Run, task: plans.Task, text: str, finish: str, tokens: int,
                 max_tokens: int) -> tuple[judges.Verdict, Call | None]:
    """Deterministic checks first; then (when the team has one) the model judge, its reply
    decoded under {ok, score, reason}; with the judge's paid call, if it ran."""
    failed = judges.deterministic(text, finish, tokens, max_tokens, task.expect)
    if failed is not None:
        return failed, None
    if not run.team.judge:
        return judges.Verdict(True, "deterministic", f"{tokens} tokens, not empty, not cut, no "
                              "loop" + (f", contains {task.expect!r}" if task.expect else "")), None
    call = await run.call(run.model, judges.judge_messages(task.prompt, text), JUDGE_TOKENS,
                          f"the judge of task {task.id!r}", schema=judges.VERDICT_SCHEMA)
    return judges.read_judgment(call.text), call


async def _answer(run: Run, request: str, plan: plans.Plan, results: dict[str, tuple[int, str]],
                  failed: dict[str, str]) -> None:
    shown = [upstream(t.id, results[t.id][1], results[t.id][0]) for t in plan.tasks
             if t.id in results]
    shown += [f"[{t}] failed its check ({why}); its result is not used" for t, why in
              failed.items()]
    messages = [{"role": "system", "content": SYNTH_SYSTEM},
                {"role": "user", "content": _context(request, shown)}]
    try:
        call = await run.call(run.model, messages, run.limits.max_tokens, "the synthesizer")
    except RunStopped:
        await run.record_stop()
        return
    answer = await run.record("answer", run.plan_seq, bodies=(call.text.encode(),),
                              model=run.model.name, trade=call.trade, cu=call.cu,
                              answer_sha256=_sha(call.text), finish_reason=call.finish_reason,
                              inputs=[results[t.id][0] for t in plan.tasks if t.id in results],
                              failed=sorted(failed), seconds_ms=run.elapsed_ms())
    intent = judges.coverage(request, call.text)
    judgment: dict[str, Any] | None = None
    if intent["flagged"] and run.team.intent_judge:
        try:
            judged = await run.call(run.model, judges.judge_messages(request, call.text),
                                    JUDGE_TOKENS, "the intent judge", schema=judges.VERDICT_SCHEMA)
            verdict = judges.read_judgment(judged.text)
            judgment = {"ok": verdict.ok, "score": verdict.score, "reason": verdict.reason,
                        "trade": judged.trade, "cu": judged.cu}
        except RunStopped:
            run.halt = None  # the answer stands; the judgment was optional
            judgment = {"ok": None, "score": None, "reason": "not run: the run's limits were "
                        "reached", "trade": None, "cu": 0}
    await run.record("intent", answer.seq, **intent, judgment=judgment)
    if run.team.verifier:
        await _verify(run, answer.seq, call.text)


async def _verify(run: Run, answer_seq: int, answer: str) -> None:
    """The configured verifier: its argv with the answer as the last argument; exit 0 is ok."""
    lane = rosters.Lane("verifier", "verify", "verify", ("verify",), executor="subprocess",
                        argv=run.team.verifier, timeout_s=VERIFY_TIMEOUT_S)
    out = await executors.call(lane, "", answer, 0, float(VERIFY_TIMEOUT_S))
    await run.record("verification", answer_seq, ok=out.ok, source=" ".join(run.team.verifier)[:200],
                     detail=(out.text or out.detail)[:500], seconds_ms=out.seconds_ms)


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
            "max_seconds": summary.get("max_seconds"),
            "model": summary["model"], "max_tokens": summary["max_tokens"],
            "passed": record.passed_results(ledger, run_id)}
