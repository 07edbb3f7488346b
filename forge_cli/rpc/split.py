"""The head of a split model: layer peers agreed with, tunnels opened, the model loaded in a
child process with the peers as RPC devices, and every generation metered to the peers.

`SplitEngine` stands where an `Engine` stands (the node's LoadedModel.engine): chat, generate,
describe, placement, close. Requests run in the child (`forge_cli.rpc.child`); when it dies
because a peer went away (or stalled past `rpc.stall_s`), the requests it served fail with
PeerLost naming that peer, each paid for the tokens it produced, and the engine reloads on
the peers left, or refuses with 503 when the model no longer fits. A peer that closes an idle
tunnel is not lost: the engine sleeps (its child ended) and wakes on the next request, which
waits for the reload rather than failing.

Its parts, one concern each: `plan` (which layers run where), `lenders` (the peers and the JSON
client that talks to them), `supervisor` (the child process), `payment` (the layer trades),
`tunnel` (the relays to the peers' ggml servers). Finding peers on the mesh for `--split auto`
is the composition root's (`forge_cli.root.rpc`): rpc imports no other channel.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forge_cli.errors import EngineBusy, ForgeError, ModelError, PeerLost
from forge_cli.inference.engine import Completion, Sampling, Stream, refuse_oversized
from forge_cli.inference.tools import Tools
from forge_cli.rpc.lenders import Lender, PeerClient
from forge_cli.rpc.payment import Payer, Paying
from forge_cli.rpc.plan import Plan, plan_layers
from forge_cli.rpc.supervisor import LOAD_TIMEOUT_S, ChildProcess, error_class, exit_text, reap
from forge_cli.rpc.tunnel import HeadTunnel

log = logging.getLogger("forge.rpc")


@dataclass
class _Job:
    id: int
    lenders: list[Lender]  # the peers the generation runs on
    out: queue.SimpleQueue[tuple[Any, ...]] = field(default_factory=queue.SimpleQueue)
    prompt_tokens: int = 0
    tokens: int = 0
    pieces: list[str] = field(default_factory=list)
    last: float = field(default_factory=time.monotonic)
    ended: bool = False
    cancelled: threading.Event = field(default_factory=threading.Event)


class SplitStream(Stream):
    """A request's text pieces, as `Engine`'s Stream gives them; a failed request still has
    its `completion`: what was produced before the failure, which is what the buyer pays for."""

    def __init__(self, engine: SplitEngine, job: _Job) -> None:
        super().__init__(job)  # type: ignore[arg-type]
        self._engine = engine
        self._split_job = job

    def _failed(self) -> Completion:
        job = self._split_job
        return Completion("".join(job.pieces), job.prompt_tokens, job.tokens, "error")

    def cancel(self) -> None:
        self._engine._cancel(self._split_job)

    close = cancel

    def __del__(self) -> None:
        try:
            self.cancel()
        except Exception:  # the engine may already be gone at interpreter exit
            pass


class SplitEngine:
    """A model split between this head and layer peers at `urls` (see the module docstring).

    `signer` is the head's identity (it signs handshakes and pays); `attach(node)` lets the
    engine pay peers through the node's wallet (a SplitEngine not attached pays nothing, so
    each peer carries no more for it than the credit its terms state). With `load=False` the
    model is loaded by `attach`, so the weights are paid for as they go to the peers, or by
    the first request."""

    def __init__(self, path: str | Path, *, name: str, urls: list[str], signer: Any,
                 n_ctx: int, n_threads: int | None = None, n_threads_batch: int | None = None,
                 slots: int | None = None, queue_size: int = 16, stall_s: int = 120,
                 head_mb: int | None = None, load: bool = True) -> None:
        from forge_cli.inference import gguf_meta, identity
        from forge_cli.rpc import ggml
        from forge_cli.rpc.peer import available_mb

        ggml.require_rpc()
        self.path = Path(path)
        self.name = name
        self.signer = signer
        self.stall_s = stall_s
        self.head_mb = head_mb or available_mb()
        self._config = {"path": str(self.path), "name": name, "n_ctx": n_ctx,
                        "n_threads": n_threads, "n_threads_batch": n_threads_batch,
                        "slots": slots, "queue_size": queue_size}
        info = gguf_meta.read_info(self.path)
        self.file_mb = info.file_size // (1 << 20)
        self.n_layer = int(info.metadata.get(f"{info.architecture}.block_count", 0))
        if self.n_layer < 1:
            raise ModelError(f"{self.path} does not say how many layers it has "
                             f"({info.architecture}.block_count): it cannot be split")
        self.sha256 = identity.sha256_file(self.path)
        self._jobs: dict[int, _Job] = {}
        self._ids = itertools.count(1)
        self._lock = threading.RLock()  # a stream collected on a thread that holds it cancels
        self._ready = threading.Event()
        self._unavailable: Exception | None = None
        self._closing = False
        self._child = ChildProcess(name)
        self._asleep = not load  # no child: the next request (or attach) loads the model
        self._waking = False
        self._pending: list[tuple[Any, ...]] = []  # requests waiting for the engine to wake
        self.live: list[Lender] = []
        self.plan: Plan | None = None
        self.info: dict[str, Any] = {}
        self.load_s = 0.0
        self.loads = 0
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, name="forge-rpc-tunnels",
                         daemon=True).start()
        try:
            self._client: PeerClient = self._run(PeerClient.open())
            self._payer = Payer(name, signer, self._client, self._loop)
            self.lenders = [self._run(self._client.hello(url)) for url in urls]
            if load:
                self._load()
        except BaseException:
            self._shutdown_loop()
            raise
        threading.Thread(target=self._watch, name="forge-rpc-watch", daemon=True).start()

    # -- the tunnels' event loop ---------------------------------------------------------------

    def _run(self, coro: Any, timeout: float | None = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _agree(self, lender: Lender) -> str:
        """Terms for the lender's layers, checked; then its tunnel's loopback endpoint."""
        agreed = await self._client.terms(lender, head=self.signer.node_id,
                                          model_sha256=self.sha256)
        lender.agreed = agreed
        if lender.tunnel is not None:
            await lender.tunnel.close()
        lender.tunnel = HeadTunnel(lender.url, lender.node_id, self.signer, agreed,
                                   self._client.tunnels, on_lost=self._child.end_now,
                                   child=self._child.pid, on_idle=self._peer_idle,
                                   top_up=lambda tokens: self._payer.top_up(lender, agreed,
                                                                            tokens))
        return await lender.tunnel.start()

    # -- loading -------------------------------------------------------------------------------

    def _load(self, *, drop_unreachable: bool = False) -> None:
        """Plan over the peers still here, agree terms, open tunnels, start the child; with
        `drop_unreachable`, a peer that no longer answers is lost and the plan made again
        without it (waking: it may have gone while the engine slept)."""
        started = time.perf_counter()
        live = [lender for lender in self.lenders if lender.lost is None]
        if self.file_mb > self.head_mb + sum(lender.free_mb for lender in live):
            lost = "; ".join(lender.lost for lender in self.lenders if lender.lost) or "none"
            raise ModelError(f"{self.name} ({self.file_mb} MiB) no longer fits in the memory of "
                             f"this head and the layer peers left (peers lost: {lost})")
        if live:
            plan = plan_layers(self.n_layer, self.head_mb, [lender.free_mb for lender in live])
        else:
            plan = Plan(self.n_layer, 0, [], list(range(self.n_layer + 1)), [])
        for lender, layers in zip(live, plan.peers, strict=True):
            lender.layers = layers
        endpoints = []
        for lender in live:
            try:
                endpoints.append(self._run(self._agree(lender)))
            except PeerLost as exc:
                if not drop_unreachable:
                    raise
                lender.lost = exc.message
                log.warning("%s", exc.message)
                return self._load(drop_unreachable=True)
        self._start_child({**self._config, "endpoints": endpoints,
                           "n_gpu_layers": plan.n_gpu_layers,
                           "tensor_split": plan.tensor_split or None})
        try:
            plan.check({int(k): v for k, v in self.info.get("assigned", {}).items()})
        except ModelError:
            self._child.kill()
            raise
        self.plan = plan
        self.live = live
        self.load_s = time.perf_counter() - started
        self.loads += 1
        self._ready.set()

    def _start_child(self, config: dict[str, Any]) -> None:
        self.info = self._child.start(config, death_reason=self._death_reason,
                                      refusal=self._refusal)
        self._child.read(self._on_message, self._on_end)

    def _death_reason(self) -> str:
        lost = [lender.tunnel.lost for lender in self.lenders
                if lender.tunnel is not None and lender.tunnel.lost]
        return "; ".join(lost) or "its process exited"

    def _refusal(self) -> ForgeError | None:
        """A peer's refusal that stopped the child loading, if one did."""
        return next((lender.tunnel.refusal for lender in self.lenders
                     if lender.tunnel is not None and lender.tunnel.refusal), None)

    def _peer_idle(self, tunnel: HeadTunnel) -> None:
        """A peer closed this engine's idle tunnel: end the child and sleep until the next
        request (a request in flight fails as if the peer were lost, and the engine reloads)."""
        with self._lock:
            if self._closing or self._asleep or all(lender.tunnel is not tunnel
                                                    for lender in self.live):
                return
            self._asleep = not self._jobs
        self._child.end_now()  # on the tunnels' loop: never wait here

    # -- the child's messages ------------------------------------------------------------------

    def _on_message(self, msg: tuple[Any, ...]) -> None:
        kind, job_id, *rest = msg
        job = self._jobs.get(job_id)
        if job is None:
            return
        job.last = time.monotonic()
        if kind == "start":
            job.prompt_tokens = rest[0]
        elif kind == "text":
            job.pieces.append(rest[0])
            job.tokens = rest[1]
            job.out.put(("text", rest[0], rest[1]))
        elif kind == "done":
            self._end(job, ("done", rest[0]))
        elif kind == "error":
            self._end(job, ("error", error_class(rest[0])(rest[1])))

    def _on_end(self, proc: subprocess.Popen[bytes]) -> None:
        """A child's socket closed: lost, unless the engine closes, sleeps or replaced it."""
        if self._closing or proc is not self._child.proc or self._asleep:
            return
        self._lost(proc)

    def _lost(self, proc: subprocess.Popen[bytes]) -> None:
        """The child died: name the peer, fail its requests (paid for what they produced),
        reload on the peers left."""
        self._ready.clear()
        deadline = time.monotonic() + 2  # the tunnel marks its peer before ggml notices
        while time.monotonic() < deadline and not any(
                lender.tunnel and lender.tunnel.lost for lender in self.live):
            time.sleep(0.05)
        code = reap(proc)
        named = [lender for lender in self.live if lender.tunnel and lender.tunnel.lost]
        for lender in named:
            lender.lost = lender.tunnel.lost if lender.tunnel else lender.lost
        if named:
            why = "; ".join(str(lender.lost) for lender in named)
        else:
            why = f"the split engine's process exited ({exit_text(code)})"
        for job in list(self._jobs.values()):
            self._end(job, ("error", PeerLost(
                f"{why}; the request failed after {job.tokens} tokens, and only those are "
                "paid for")))
        threading.Thread(target=self._reload, name="forge-rpc-reload", daemon=True).start()

    def _reload(self) -> None:
        try:
            self._load(drop_unreachable=True)
            log.warning("%s reloaded on %d layer peer(s)", self.name, len(self.live))
        except Exception as exc:
            self._unavailable = exc if isinstance(exc, ModelError) else ModelError(str(exc))
            log.error("%s cannot be served any more: %s", self.name, exc)
            self._ready.set()

    def _end(self, job: _Job, item: tuple[Any, ...]) -> None:
        with self._lock:
            if job.ended:
                return
            job.ended = True
            self._jobs.pop(job.id, None)
        job.out.put(item)
        self._payer.meter(job.lenders, job.prompt_tokens, job.tokens,
                          "".join(job.pieces).encode())

    def _watch(self) -> None:
        """Generation that makes no progress for `stall_s` fails: the peer the head waits on
        longest is blamed, and the child is killed (its requests fail by that peer's name)."""
        while not self._closing:
            time.sleep(1)
            jobs = list(self._jobs.values())
            # No request moved for stall_s (queued ones wait on the others: not a stall).
            if not jobs or time.monotonic() - max(job.last for job in jobs) <= self.stall_s:
                continue
            waiting = [(lender.tunnel.waiting_s(), lender) for lender in self.live
                       if lender.tunnel is not None]
            slow = max(waiting, key=lambda pair: pair[0], default=(0.0, None))[1]
            if slow is not None and slow.tunnel is not None:
                slow.tunnel.lost = (f"layer peer {slow.short} stalled: no answer for "
                                    f"{self.stall_s} s")
            self._child.kill()

    # -- metering ------------------------------------------------------------------------------

    def attach(self, node: Paying) -> None:
        """Pay layer peers through `node`'s wallet, as `node`'s account; load the model now if
        it was made with load=False (its weights paid for as they go)."""
        self._payer.node = node
        if self._asleep and not self._waking:
            self._load()
            with self._lock:
                self._asleep = False

    def _wake(self) -> None:
        """Load the model for the requests that came while the engine slept, then run them;
        if it cannot load, they fail by its reason and the next request tries again."""
        try:
            self._load(drop_unreachable=True)
        except Exception as exc:
            failure = exc if isinstance(exc, ForgeError) else ModelError(str(exc))
            with self._lock:
                pending, self._pending, self._waking = self._pending, [], False
            for msg in pending:
                job = self._jobs.get(msg[1])
                if job is not None:
                    self._end(job, ("error", failure))
            return
        with self._lock:
            pending, self._pending = self._pending, []
            self._asleep = self._waking = False
            for msg in pending:
                job = self._jobs.get(msg[1])
                if job is not None:
                    job.lenders, job.last = list(self.live), time.monotonic()
                self._child.send(msg)

    def settled(self, timeout: float = 30) -> None:
        """Wait for the payments under way (tests and shutdown)."""
        self._payer.settled(timeout)

    # -- the Engine surface --------------------------------------------------------------------

    def _submit(self, kind: str, block: bool, *args: Any) -> SplitStream:
        if self._closing:
            raise ModelError(f"the engine for {self.name} is closed")
        with self._lock:
            if self._asleep:  # the request waits in its stream, not in the caller
                job = _Job(next(self._ids), [])
                self._jobs[job.id] = job
                self._pending.append((kind, job.id, *args))
                if not self._waking:
                    self._waking = True
                    threading.Thread(target=self._wake, name="forge-rpc-wake",
                                     daemon=True).start()
                return SplitStream(self, job)
        if not self._ready.is_set() and not block:  # never hold the caller's event loop
            lost = "; ".join(lender.lost for lender in self.lenders if lender.lost)
            raise EngineBusy(f"{self.name} is reloading on the layer peers left ({lost}); "
                             "try again shortly")
        if not self._ready.wait(LOAD_TIMEOUT_S):
            raise ModelError(f"{self.name} is still reloading without a lost layer peer")
        if self._unavailable is not None:
            raise self._unavailable
        job = _Job(next(self._ids), list(self.live))
        with self._lock:
            self._jobs[job.id] = job
        self._child.send((kind, job.id, *args))
        return SplitStream(self, job)

    def chat(self, messages: list[dict[str, Any]], sampling: Sampling = Sampling(), *,
             tools: Tools | None = None, block: bool = True) -> SplitStream:
        return self._submit("chat", block, messages, sampling, tools)

    def generate(self, prompt: str, sampling: Sampling = Sampling(), *, add_bos: bool = True,
                 block: bool = True) -> SplitStream:
        return self._submit("generate", block, prompt, sampling, add_bos)

    def check_grammar(self, grammar: str) -> None:
        """Nothing to check here: the child holds the vocabulary, and a grammar llama.cpp
        refuses fails its request there (a 400) before a token is made or charged."""

    def _cancel(self, job: _Job) -> None:
        with self._lock:  # still waiting for the engine to wake: it never reaches the child
            waiting = [msg for msg in self._pending if msg[1] == job.id]
            self._pending = [msg for msg in self._pending if msg[1] != job.id]
        if waiting:
            self._end(job, ("done", Completion("", 0, 0, "cancelled")))
            return
        if not job.ended:
            self._child.send(("cancel", job.id))

    @property
    def n_ctx(self) -> int:
        return int(self.info.get("n_ctx", self._config["n_ctx"]))

    @property
    def max_prompt_bytes(self) -> int | None:
        limit = self.info.get("max_prompt_bytes")
        return None if limit is None else int(limit)

    def check_prompt_bytes(self, size: int, what: str = "the prompt") -> None:
        """The child engine's bound (Engine.check_prompt_bytes), checked before sending."""
        refuse_oversized(self.name, self.n_ctx, self.max_prompt_bytes, size, what)

    @property
    def slots(self) -> int:
        return int(self.info.get("slots", 1))

    @property
    def slots_note(self) -> str:
        return str(self.info.get("slots_note", ""))

    @property
    def n_threads(self) -> int:
        return int(self.info.get("n_threads", 0))

    @property
    def n_threads_batch(self) -> int:
        return int(self.info.get("n_threads_batch", 0))

    gpu_offload = True  # offloaded to the peers' devices
    queued = 0

    @property
    def n_gpu_layers(self) -> int:
        return self.plan.n_gpu_layers if self.plan else 0

    @property
    def layers(self) -> int:
        return self.n_layer

    def split(self) -> dict[str, Any]:
        """Which device runs which layer (layer n_layer is the output layer)."""
        return {"head": {"peer": self.signer.node_id, "layers": self.plan.head if self.plan else []},
                "output_layer": self.n_layer,
                "peers": [lender.describe() for lender in self.lenders], "loads": self.loads,
                "load_s": round(self.load_s, 3)}

    def describe(self) -> dict[str, Any]:
        described = {k: v for k, v in self.info.items()
                     if k in ("n_ctx", "max_prompt_bytes", "slots", "threads", "threads_batch",
                              "slots_note")}
        return {**described, "gpu_offload": True, "n_gpu_layers": self.n_gpu_layers,
                "split": self.split()}

    def placement(self) -> dict[str, Any]:
        live = [lender for lender in self.lenders if lender.lost is None]
        return {"device": "CPU+RPC" if live else "CPU", "layers": self.n_layer,
                "gpu_layers": self.n_gpu_layers, "split": self.split()}

    def close(self) -> None:
        if self._closing:
            return
        self.settled()
        self._closing = True
        self._child.close()
        for job in list(self._jobs.values()):
            self._end(job, ("error", ModelError(f"the engine for {self.name} was closed")))
        self._shutdown_loop()

    def _shutdown_loop(self) -> None:
        async def stop() -> None:
            for lender in getattr(self, "lenders", []):
                if lender.tunnel is not None:
                    await lender.tunnel.close()
            client = getattr(self, "_client", None)
            if client is not None:
                await client.close()

        try:
            self._run(stop(), timeout=10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)

    def __enter__(self) -> SplitEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()



__all__ = ["Lender", "Paying", "Plan", "SplitEngine", "SplitStream", "plan_layers"]
