"""The head of a split model: layer peers agreed with, tunnels opened, the model loaded in a
child process with the peers as RPC devices, and every generation metered to the peers.

`SplitEngine` stands where an `Engine` stands (the node's LoadedModel.engine): chat, generate,
describe, placement, close. Requests run in the child (`forge_cli.rpc.child`); when it dies
because a peer went away (or stalled past `rpc.stall_s`), the requests it served fail with
PeerLost naming that peer, each paid for the tokens it produced, and the engine reloads on
the peers left, or refuses with 503 when the model no longer fits. A peer that closes an idle
tunnel is not lost: the engine sleeps (its child ended) and wakes on the next request, which
waits for the reload rather than failing.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from forge_cli import errors
from forge_cli.errors import EngineBusy, ForgeError, ModelError, PeerLost, TunnelRefused, UsageError
from forge_cli.inference.engine import Completion, Sampling, Stream, refuse_oversized
from forge_cli.inference.tools import Tools
from forge_cli.ledger import entries
from forge_cli.rpc import terms
from forge_cli.rpc.tunnel import HeadTunnel

if TYPE_CHECKING:
    from collections.abc import Callable

    from forge_cli.trade.wallet import Wallet

log = logging.getLogger("forge.rpc")
LOAD_TIMEOUT_S = 600
HTTP_TIMEOUT_S = 30


class Paying(Protocol):
    """What a split model needs of the node to pay its peers: the node's account and wallet."""

    node_id: str
    wallet: Wallet
    clock: Callable[[], int]


@dataclass
class Plan:
    """Which device runs which layer: layer `n_layer` is the output layer. The head keeps the
    input embeddings and the first layers; the peers run the rest, the last one the output."""

    n_layer: int
    n_gpu_layers: int
    tensor_split: list[float]
    head: list[int]
    peers: list[list[int]]

    def check(self, assigned: dict[int, str]) -> None:
        """ModelError unless llama.cpp put the layers where the plan (and the terms agreed
        from it) says: `assigned` is layer → device ("CPU", "RPC0", …) from its load log."""
        if not assigned:
            return  # this llama.cpp does not log placements: the plan stands
        planned = {layer: "CPU" for layer in self.head}
        planned.update({layer: f"RPC{i}" for i, layers in enumerate(self.peers)
                        for layer in layers})
        if assigned != planned:
            raise ModelError(f"llama.cpp placed the layers as {_by_device(assigned)}, not as "
                             f"planned ({_by_device(planned)}), so the terms agreed with the "
                             "peers would not pay what they run")


def _by_device(assigned: dict[int, str]) -> str:
    devices: dict[str, list[int]] = {}
    for layer, device in sorted(assigned.items()):
        devices.setdefault(device, []).append(layer)
    return "; ".join(f"{device} {','.join(map(str, layers))}" for device, layers in devices.items())


def plan_layers(n_layer: int, head_mb: int, peers_mb: list[int]) -> Plan:
    """Layers split by free memory between the head and its peers, as llama.cpp assigns them
    for the `n_gpu_layers` and `tensor_split` returned: the last `n_gpu_layers` layers (output
    included) go to the devices, cut where the cumulative shares cross (load_tensors)."""
    import numpy as np

    units = n_layer + 1
    if len(peers_mb) >= units:
        raise UsageError(f"the model has {n_layer} layers: too few to give each of "
                         f"{len(peers_mb)} peers one and keep one on the head")
    total = max(1, head_mb + sum(peers_mb))
    head_units = min(max(1, round(units * head_mb / total)), units - len(peers_mb))
    n_gpu = units - head_units
    shares = [float(max(1, mb)) for mb in peers_mb]
    cumulative = np.cumsum(np.array(shares, dtype=np.float32))
    splits = [float(x) for x in cumulative / cumulative[-1]]
    start = max(units - n_gpu, 0)
    head, peers = [], [[] for _ in peers_mb]  # type: list[int], list[list[int]]
    for layer in range(units):
        if layer < start or layer - start >= n_gpu:
            head.append(layer)
            continue
        at = float(np.float32(layer - start) / np.float32(n_gpu))
        peers[min(bisect.bisect_right(splits, at), len(peers) - 1)].append(layer)
    if any(not layers for layers in peers):  # memories too uneven: share the layers evenly
        if shares != [1.0] * len(shares):
            return plan_layers(n_layer, 1, [1] * len(peers_mb))
        raise UsageError(f"the model's {n_layer} layers cannot give each of {len(peers_mb)} "
                         "peers one")
    return Plan(n_layer, n_gpu, shares, head, peers)


@dataclass
class Lender:
    """A layer peer as the head sees it."""

    url: str
    node_id: str
    free_mb: int
    rate: int
    layers: list[int] = field(default_factory=list)
    agreed: dict[str, Any] | None = None
    tunnel: HeadTunnel | None = None
    lost: str | None = None
    paid_cu: int = 0
    trades: int = 0

    @property
    def short(self) -> str:
        return f"{self.node_id[:12]}… at {self.url}"

    def describe(self) -> dict[str, Any]:
        traffic = self.tunnel.traffic.as_dict() if self.tunnel else {}
        return {"peer": self.node_id, "url": self.url, "layers": self.layers,
                "free_mb": self.free_mb, "rate_ucu_per_layer_token": self.rate,
                "paid_cu": self.paid_cu, "trades": self.trades, "lost": self.lost,
                "tunnel_bytes_up": traffic.get("up", 0),
                "tunnel_bytes_down": traffic.get("down", 0)}


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
        self._node: Paying | None = None
        self._jobs: dict[int, _Job] = {}
        self._ids = itertools.count(1)
        self._lock = threading.RLock()  # a stream collected on a thread that holds it cancels
        self._ready = threading.Event()
        self._unavailable: Exception | None = None
        self._closing = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._payments: set[Any] = set()
        self._asleep = not load  # no child: the next request (or attach) loads the model
        self._waking = False
        self._pending: list[tuple[Any, ...]] = []  # requests waiting for the engine to wake
        self.live: list[Lender] = []
        self.plan: Plan | None = None
        self.info: dict[str, Any] = {}
        self.load_s = 0.0
        self.loads = 0
        self._tunnels_http: Any = None
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, name="forge-rpc-tunnels",
                         daemon=True).start()
        try:
            self._http = self._run(self._session())
            self.lenders = [self._run(self._hello(url)) for url in urls]
            if load:
                self._load()
        except BaseException:
            self._shutdown_loop()
            raise
        threading.Thread(target=self._watch, name="forge-rpc-watch", daemon=True).start()

    # -- the tunnels' event loop ---------------------------------------------------------------

    def _run(self, coro: Any, timeout: float | None = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _session(self) -> Any:
        import aiohttp

        # Tunnels live as long as the model is loaded: only connecting is timed.
        self._tunnels_http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=HTTP_TIMEOUT_S))
        return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S))

    async def _json(self, method: str, url: str, body: Any = None) -> Any:
        import aiohttp

        from forge_cli.client import answer

        try:
            async with self._http.request(method, url, json=body) as response:
                raw = await response.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise PeerLost(f"layer peer at {url} is unreachable: {exc or type(exc).__name__}"
                           ) from None
        try:
            return answer(response.status, response.reason or "", raw, f"layer peer at {url}")
        except ForgeError as exc:  # the peer's own words where it gave an envelope
            said = (getattr(exc, "envelope", None) or {}).get("message") or exc.message
            raise TunnelRefused(f"layer peer at {url} refused: {said}") from None

    async def _hello(self, url: str) -> Lender:
        url = url.rstrip("/")
        health = await self._json("GET", f"{url}/health")
        if not isinstance(health, dict) or health.get("role") != "layer-peer":
            raise UsageError(f"{url} is not a layer peer (start one with `forge rpc serve`)")
        try:
            return Lender(url, str(health["node_id"]), int(health["free_mb"]),
                          int(health["rate_ucu_per_layer_token"]))
        except (KeyError, TypeError, ValueError):
            raise TunnelRefused(f"layer peer at {url} describes itself badly: {health}") from None

    async def _agree(self, lender: Lender) -> str:
        """Terms for the lender's layers, checked; then its tunnel's loopback endpoint."""
        agreed = await self._json("POST", f"{lender.url}/v1/forge/rpc/terms", {
            "head": self.signer.node_id, "model_sha256": self.sha256,
            "layers": len(lender.layers)})
        reason = terms.terms_problem(agreed)
        if reason is None and (agreed["terms"]["peer"] != lender.node_id
                               or agreed["terms"]["layers"] != len(lender.layers)
                               or agreed["terms"]["head"] != self.signer.node_id):
            reason = "they are not the terms asked for"
        if reason is None and agreed["terms"]["bytes_per_layer_token"] < 1:
            reason = "a paid token buys no tunnel bytes under them"
        if reason:
            raise TunnelRefused(f"layer peer {lender.short} sent bad terms: {reason}")
        lender.agreed = agreed
        if lender.tunnel is not None:
            await lender.tunnel.close()
        lender.tunnel = HeadTunnel(lender.url, lender.node_id, self.signer, agreed,
                                   self._tunnels_http, on_lost=self._peer_gone,
                                   child=self._child_pid, on_idle=self._peer_idle,
                                   top_up=lambda tokens: self._top_up(lender, agreed, tokens))
        return await lender.tunnel.start()

    def _child_pid(self) -> int | None:
        """The engine child, the one process the tunnels' loopback ports serve."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

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
            self._kill_child()
            raise
        self.plan = plan
        self.live = live
        self.load_s = time.perf_counter() - started
        self.loads += 1
        self._ready.set()

    def _start_child(self, config: dict[str, Any]) -> None:
        ours, theirs = socket.socketpair()
        env = {**os.environ, "GGML_NO_BACKTRACE": "1"}
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "forge_cli.rpc.child", str(theirs.fileno())],
            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            env=env)
        theirs.close()
        conn = Connection(ours.detach())
        conn.send(("load", config))
        if not conn.poll(LOAD_TIMEOUT_S):
            self._kill_child()
            raise ModelError(f"the engine for {self.name} did not load within {LOAD_TIMEOUT_S} s")
        try:
            reply = conn.recv()
        except (EOFError, OSError):
            reply = ("failed", "ModelError", self._death_reason())
        if reply[0] != "ready":
            self._kill_child()
            refusal = next((lender.tunnel.refusal for lender in self.lenders
                            if lender.tunnel is not None and lender.tunnel.refusal), None)
            if refusal is not None:  # a peer said no: that is the reason, not a broken model
                raise TunnelRefused(f"the split engine for {self.name} could not load: "
                                    f"{refusal.message}")
            cls = getattr(errors, reply[1], ModelError)
            raise (cls if isinstance(cls, type) and issubclass(cls, errors.ForgeError)
                   else ModelError)(f"the split engine for {self.name} could not load: {reply[2]}")
        self.info = reply[1]
        self._conn = conn
        threading.Thread(target=self._read, args=(conn, self._proc), name="forge-rpc-child",
                         daemon=True).start()

    def _death_reason(self) -> str:
        lost = [lender.tunnel.lost for lender in self.lenders
                if lender.tunnel is not None and lender.tunnel.lost]
        return "; ".join(lost) or "its process exited"

    def _peer_idle(self, tunnel: HeadTunnel) -> None:
        """A peer closed this engine's idle tunnel: end the child and sleep until the next
        request (a request in flight fails as if the peer were lost, and the engine reloads)."""
        with self._lock:
            if self._closing or self._asleep or all(lender.tunnel is not tunnel
                                                    for lender in self.live):
                return
            self._asleep = not self._jobs
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()  # on the tunnels' loop: never wait here

    def _peer_gone(self) -> None:
        """A tunnel lost its peer: end the child now, even idle (ggml would only notice at the
        next request, and fail it), so the engine reloads without the peer at once."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()

    def _kill_child(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=30)

    # -- the child's messages ------------------------------------------------------------------

    def _read(self, conn: Connection, proc: subprocess.Popen[bytes]) -> None:
        while True:
            try:
                kind, job_id, *rest = conn.recv()
            except (EOFError, OSError):
                break
            job = self._jobs.get(job_id)
            if job is None:
                continue
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
                cls = getattr(errors, rest[0], ModelError)
                if not (isinstance(cls, type) and issubclass(cls, errors.ForgeError)):
                    cls = ModelError
                self._end(job, ("error", cls(rest[1])))
        conn.close()
        if self._closing or proc is not self._proc or self._asleep:
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
        try:
            code = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        named = [lender for lender in self.live if lender.tunnel and lender.tunnel.lost]
        for lender in named:
            lender.lost = lender.tunnel.lost if lender.tunnel else lender.lost
        if named:
            why = "; ".join(str(lender.lost) for lender in named)
        else:
            why = f"the split engine's process exited ({_exit_text(code)})"
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
        self._meter(job)

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
            self._kill_child()

    # -- metering ------------------------------------------------------------------------------

    def attach(self, node: Paying) -> None:
        """Pay layer peers through `node`'s wallet, as `node`'s account; load the model now if
        it was made with load=False (its weights paid for as they go)."""
        self._node = node
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
                self._send(msg)

    def _send(self, msg: tuple[Any, ...]) -> None:
        try:
            assert self._conn is not None
            self._conn.send(msg)
        except (OSError, ValueError):
            pass  # the child is gone: the reader fails the job by the peer's name

    def _meter(self, job: _Job) -> None:
        if self._node is None or job.tokens + job.prompt_tokens == 0:
            return
        response = "".join(job.pieces).encode()
        for lender in job.lenders:
            if lender.lost is None and lender.agreed is not None and lender.rate > 0:
                future = asyncio.run_coroutine_threadsafe(
                    self._pay(lender, lender.agreed, job.prompt_tokens, job.tokens, response),
                    self._loop)
                self._payments.add(future)
                future.add_done_callback(self._payments.discard)

    async def _top_up(self, lender: Lender, agreed: dict[str, Any], tokens: int) -> bool:
        """Pay `lender` ahead for `tokens` (the tunnel bytes they buy): False when this engine
        pays no one (not attached) or the payment failed."""
        if self._node is None or lender.rate == 0:
            return False
        return await self._pay(lender, agreed, 0, tokens, b"")

    async def _pay(self, lender: Lender, agreed: dict[str, Any], prompt_tokens: int,
                   tokens: int, response: bytes) -> bool:
        """One dual-signed trade: the head pays `lender` for its layers over `tokens`."""
        from forge_cli import identity

        node = self._node
        if node is None:  # attach(node) comes before any generation; a payment without it is a bug
            raise ModelError(f"the split engine for {self.name} pays its peers through a node, "
                             "and none is attached")
        request = terms.agreement_body(agreed)
        record = terms.metering_body(prompt_tokens=prompt_tokens, completion_tokens=tokens,
                                     response=response)
        trade = terms.layer_trade(agreed, model=self.name, prompt_tokens=prompt_tokens,
                                  completion_tokens=tokens, request=request, response=record,
                                  now_ms=node.clock())
        consumer_sig = self.signer.sign(entries.trade_message(trade)).hex()

        async def countersigned() -> tuple[dict[str, Any], list[bytes]]:
            answer = await self._json("POST", f"{lender.url}/v1/forge/rpc/settle", {
                "trade": trade, "consumer_sig": consumer_sig, "request": request.decode(),
                "response": record.decode()})
            provider_sig = answer.get("provider_sig") if isinstance(answer, dict) else None
            if not isinstance(provider_sig, str) or not identity.verify_hex(
                    lender.node_id, entries.trade_message(trade), provider_sig):
                raise TunnelRefused(f"layer peer {lender.short} did not sign the layer trade")
            tunnel = lender.tunnel
            if tunnel is not None and tunnel.agreed is agreed:  # what the peer now lets flow
                tunnel.paid_tokens += trade["completion_tokens"]
            return ({"terms": trade, "provider_sig": provider_sig, "consumer_sig": consumer_sig},
                    [request, record])

        try:
            await node.wallet.pay(node.node_id, trade["cu"], countersigned,
                                  what=f"{trade['cu']} CU owed to layer peer {lender.short}")
        except errors.ForgeError as exc:
            log.error("layer trade with %s not settled: %s", lender.short, exc)
            return False
        lender.paid_cu += trade["cu"]
        lender.trades += 1
        return True

    def settled(self, timeout: float = 30) -> None:
        """Wait for the payments under way (tests and shutdown)."""
        deadline = time.monotonic() + timeout
        while self._payments and time.monotonic() < deadline:
            time.sleep(0.05)

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
        self._send((kind, job.id, *args))
        return SplitStream(self, job)

    def chat(self, messages: list[dict[str, Any]], sampling: Sampling = Sampling(), *,
             tools: Tools | None = None, block: bool = True) -> SplitStream:
        return self._submit("chat", block, messages, sampling, tools)

    def generate(self, prompt: str, sampling: Sampling = Sampling(), *, add_bos: bool = True,
                 block: bool = True) -> SplitStream:
        return self._submit("generate", block, prompt, sampling, add_bos)

    def _cancel(self, job: _Job) -> None:
        with self._lock:  # still waiting for the engine to wake: it never reaches the child
            waiting = [msg for msg in self._pending if msg[1] == job.id]
            self._pending = [msg for msg in self._pending if msg[1] != job.id]
        if waiting:
            self._end(job, ("done", Completion("", 0, 0, "cancelled")))
            return
        if job.ended or self._conn is None:
            return
        try:
            self._conn.send(("cancel", job.id))
        except (OSError, ValueError):
            pass

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
        if self._conn is not None:
            try:
                self._conn.send(("close",))
            except (OSError, ValueError):
                pass
        if self._proc is not None:
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._kill_child()
        for job in list(self._jobs.values()):
            self._end(job, ("error", ModelError(f"the engine for {self.name} was closed")))
        self._shutdown_loop()

    def _shutdown_loop(self) -> None:
        async def stop() -> None:
            for lender in getattr(self, "lenders", []):
                if lender.tunnel is not None:
                    await lender.tunnel.close()
            for session in (getattr(self, "_http", None), getattr(self, "_tunnels_http", None)):
                if session is not None:
                    await session.close()

        try:
            self._run(stop(), timeout=10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)

    def __enter__(self) -> SplitEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def find_lenders(node_id: str, settings: dict[str, Any]) -> list[str]:
    """URLs of the layer peers on the mesh (mDNS on mesh.interfaces, and mesh.peers), the most
    memory first: what `--split auto` splits with. Looks for up to rpc.discover_s seconds,
    and stops early once the peers found stay the same for 1.5 s."""
    from forge_cli.errors import NoProvider
    from forge_cli.mesh.discovery import Mesh

    async def look() -> list[tuple[int, str]]:
        mesh = Mesh(node_id, lambda: [], interfaces=settings["mesh.interfaces"],
                    static_peers=settings["mesh.peers"], mdns=settings["mesh.mdns"], probe_s=1,
                    expire_s=settings["mesh.expire_s"])
        await mesh.start(None)
        deadline = time.monotonic() + settings["rpc.discover_s"]
        found: list[tuple[int, str]] = []
        stable_since = time.monotonic()
        try:
            while time.monotonic() < deadline:
                await mesh.probe_all()
                now = sorted(((p.lends_mb or 0, p.url) for p in mesh.trusted_peers()
                              if p.lends_mb is not None), reverse=True)
                if [url for _, url in now] != [url for _, url in found]:
                    found, stable_since = now, time.monotonic()
                elif found and time.monotonic() - stable_since >= 1.5:
                    break
                await asyncio.sleep(0.25)
        finally:
            await mesh.stop()
        return found

    found = asyncio.run(look())
    if not found:
        raise NoProvider(f"no layer peer answered on the mesh within {settings['rpc.discover_s']} "
                         "s", hint="start some with `forge rpc serve --mesh`, or name them: "
                         "--split http://HOST:PORT[,URL…]")
    return [url for _, url in found][:16]  # GGML_RPC_MAX_SERVERS


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


__all__ = ["Lender", "Plan", "SplitEngine", "SplitStream", "find_lenders", "plan_layers"]
