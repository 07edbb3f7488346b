"""Continuous batching: the scheduler thread that owns an Engine's llama.cpp context.

Each step is one `llama_decode` carrying the next token of every generating sequence plus
prompt chunks of newly admitted ones (up to the context's n_batch), then each sequence
samples from its own row of logits with its own sampler chain (its temperature, top-k/p,
min-p, repeat penalty and seed); a plain greedy request (no penalty) takes the row's argmax
itself, the first of equal maxima as llama.cpp's greedy sampler does, without the chain's copy
of the whole vocabulary. A sequence under a grammar (a JSON schema, tool calls) steps in the same
batch: its draw is asked of its grammar and redrawn under the grammar's mask only when refused
(`_constrained`). A finished or cancelled sequence gives its slot and its KV cells back
before the next step; queued requests take free slots between steps, never more items than
there were free slots, so live sequences step however much work keeps arriving. Requests come
tokenized (by their callers): nothing here costs in proportion to a prompt's length but
decoding it. A scoring job (an audit's
teacher-forced prefill) takes a slot like a request whose prompt is the whole text: its chunks
ride in the same steps, it keeps the logits of the positions it was asked for, and it samples
nothing.
"""

from __future__ import annotations

import codecs
import ctypes
import queue
import random
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from forge_cli.errors import ForgeError, ModelError, UsageError
from forge_cli.inference.jobs import Call, Completion, Job, Sampling, Score

if TYPE_CHECKING:
    from forge_cli.inference.engine import Engine

# The repeat penalty looks this far back (prompt included), like llama-cpp-python's default.
PENALTY_LAST_N = 64


class _Text:
    """Sampled token bytes turned into text pieces, holding back what could start a stop
    string so that a stop string is never streamed."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = stops
        self._longest = max((len(x) for x in stops), default=0)
        self._held = ""
        self.stopped = False

    def add(self, raw: bytes) -> str:
        piece = self._decoder.decode(raw)
        if not self._stops:
            return piece
        held = self._held + piece
        cut = min((i for i in (held.find(x) for x in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self._held, self.stopped = "", True
            return held[:cut]
        keep = stop_prefix_len(held, self._stops, self._longest)
        self._held = held[len(held) - keep:]
        return held[: len(held) - keep]

    def tail(self) -> str:
        """What is left once generation ends (nothing after a stop string)."""
        return "" if self.stopped else self._held + self._decoder.decode(b"", final=True)


class _Sequence:
    """One request in a slot: its prompt still to decode, its sampler, what it produced."""

    def __init__(self, job: Job, slot: int, tokens: list[int], budget: int, chain: Any,
                 grammar: Any, started: float) -> None:
        self.job = job
        self.slot = slot
        self.prompt = tokens
        self.fed = 0  # prompt tokens decoded so far
        self.pos = 0  # the position the next decoded token takes in this slot
        self.next = -1  # the last sampled token: decoded at the next step
        self.budget = budget
        self.chain = chain
        self.grammar = grammar  # llama.cpp's grammar sampler, outside the chain (see _constrained)
        self.count = 0
        self.text = _Text(job.sampling.stop)
        self.parts: list[str] = []
        self.started = started
        self.queued = started - job.submitted
        self.first = self.last = started
        self.ids: list[int] = []  # the tokens counted, in order

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.prompt)


class _Scoring:
    """A scoring job in a slot: its tokens still to decode and the logit rows kept so far."""

    chain = grammar = None

    def __init__(self, job: Score, slot: int, n_vocab: int) -> None:
        import numpy as np

        self.job = job
        self.slot = slot
        self.prompt = job.tokens
        self.fed = 0
        self.pos = 0
        n = len(job.tokens) - job.start
        self.rows: Any = (np.empty((n, n_vocab), dtype=np.float32) if job.reduce is None
                          else [None] * n)
        self.error: Exception | None = None  # the caller's `reduce` failed: only this job fails

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.prompt)

    def wanted(self, i: int) -> bool:
        """Whether the logits after token i are kept (they score token i + 1 of the reply)."""
        return self.job.start - 1 <= i < len(self.prompt) - 1


class Lanes:
    """What an engine's lanes share: which are busy, and so how many threads each decodes on.

    A lane is one context with its own scheduler thread. Lane 0 decodes on all the engine's
    threads but one for each other busy lane; every other lane decodes on one thread, and takes
    new work only while lane 0 is busy. So a lone request gets every thread, k requests in k
    lanes get a core each at least, and the lanes together never run more threads than the
    engine has. That matters beyond sharing the cores: llama.cpp's CPU backend runs a decode's
    threads as an OpenMP team of the calling thread, and once the teams of all threads hold
    more threads than there are cores, libgomp stops spinning at its barriers and sleeps in
    them instead, which halved a lone token's speed here. One-thread lanes hold no team.
    A busy lane leaves queued work to an idle lane that may take it.
    """

    def __init__(self, count: int, n_threads: int, n_threads_batch: int) -> None:
        self.count = count
        self._threads = (n_threads, n_threads_batch)
        self._busy = [False] * count
        self._lock = threading.Lock()
        self._closing = False
        self.primary_busy = threading.Event()  # set while lane 0 is busy (or on closing)

    def set_busy(self, lane: int, busy: bool) -> None:
        with self._lock:
            self._busy[lane] = busy
            if lane == 0 and not self._closing:
                (self.primary_busy.set if busy else self.primary_busy.clear)()

    def close(self) -> None:
        """Let every lane reach the queue, where its end is waiting."""
        with self._lock:
            self._closing = True
            self.primary_busy.set()

    def idle_for(self, lane: int) -> bool:
        """Whether a lane other than `lane` is idle and would take queued work now."""
        primary = self._busy[0]
        return any(not busy and (i == 0 or primary)
                   for i, busy in enumerate(self._busy) if i != lane)

    def threads(self, lane: int) -> tuple[int, int]:
        """(generation, batch) threads for a step of `lane`."""
        if lane > 0:
            return (1, 1)
        others = sum(self._busy[1:])
        return (max(1, self._threads[0] - others), max(1, self._threads[1] - others))


class Scheduler:
    """Runs on one of the engine's worker threads (a lane): admits queued requests into its
    free slots and steps every live sequence of its context forward together."""

    def __init__(self, engine: Engine, ctx: Any, slots: int,
                 jobs: queue.Queue[Job | Score | Call | None], lanes: Lanes,
                 lane: int = 0) -> None:
        lib = engine._lib
        self._engine = engine
        self._lib = lib
        self._ctx = ctx
        self._vocab = engine._vocab
        self._n_vocab = engine.n_vocab
        self._mem = lib.llama_get_memory(ctx)
        self._n_batch = int(lib.llama_n_batch(ctx))
        self._batch = lib.llama_batch_init(self._n_batch, 0, 1)
        self._free = list(range(slots - 1, -1, -1))  # pop() hands out slot 0 first
        self._live: list[_Sequence | _Scoring] = []
        self._jobs = jobs
        self._piece_buf = ctypes.create_string_buffer(256)
        self._lanes = lanes
        self._lane = lane
        self._busy = False
        self._threads = (0, 0)
        # llama_token_data {id, logit, p} for a constrained sequence's draws: the whole
        # vocabulary, and one token (reused by every sequence; the scheduler samples in turn)
        token_data = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
        self._cand = np.zeros(self._n_vocab, dtype=token_data)
        self._cand_ptr = self._cand.ctypes.data_as(ctypes.POINTER(lib.llama_token_data))
        self._ids = np.arange(self._n_vocab, dtype=np.int32)
        self._one = np.zeros(1, dtype=token_data)
        self._one_ptr = self._one.ctypes.data_as(ctypes.POINTER(lib.llama_token_data))

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> None:
        while True:
            # Take queued work while a slot is free; wait for it only when nothing is live, and
            # while another lane is idle leave it to that one. With sequences live, at most as
            # many items as there were free slots are taken before the next step, whatever
            # they turn out to be (cancelled, refused, a call): no stream of queued work can
            # keep the live sequences from stepping.
            takes = len(self._free)
            while self._free and takes and (not self._live or
                                            not self._lanes.idle_for(self._lane)):
                if self._live:
                    takes -= 1
                self._mark_busy(bool(self._live))
                try:
                    item = self._next()
                except queue.Empty:
                    break
                if item is None:
                    for seq in list(self._live):
                        self._finish(seq, "cancelled")
                    self._mark_busy(False)
                    return
                if isinstance(item, Call):
                    if item.future.set_running_or_notify_cancel():
                        self._mark_busy(True)  # a call holds this lane like a request
                        try:
                            item.future.set_result(item.fn())
                        except BaseException as exc:  # handed to the caller, who re-raises it
                            item.future.set_exception(exc)
                        self._mark_busy(bool(self._live))
                    continue
                if isinstance(item, Score):
                    self._live.append(_Scoring(item, self._free.pop(), self._engine.n_vocab))
                    continue
                self._admit(item)
            self._mark_busy(bool(self._live))
            if self._live:
                try:
                    self._step()
                except Exception as exc:  # a llama.cpp failure must reach the callers
                    for seq in list(self._live):
                        self._fail(seq, ModelError(f"generation failed: {exc}"))

    def _next(self) -> Job | Score | Call | None:
        """The next queued item (queue.Empty when there is none to take now)."""
        if self._live:
            return self._jobs.get_nowait()
        if self._lane == 0:
            return self._jobs.get()
        # An idle lane beside lane 0 waits for lane 0 to be busy: a lone request belongs on
        # lane 0, which has the threads.
        self._lanes.primary_busy.wait()
        item = self._jobs.get(timeout=0.02)
        if item is not None and not self._lanes.primary_busy.is_set():
            # Lane 0 went idle while this lane waited: the request is lane 0's after all.
            self._jobs.put(item)
            raise queue.Empty
        return item

    def _mark_busy(self, busy: bool) -> None:
        if busy != self._busy:
            self._busy = busy
            self._lanes.set_busy(self._lane, busy)

    def cancel_all(self) -> None:
        """Cancel every live sequence (any thread): each ends at the next step."""
        for seq in list(self._live):
            seq.job.cancelled.set()

    def free(self) -> None:
        """Release the batch once the loop has ended."""
        self._lib.llama_batch_free(self._batch)

    # -- admitting ---------------------------------------------------------------------------

    def _admit(self, job: Job) -> None:
        engine = self._engine
        started = time.perf_counter()
        tokens = job.tokens  # tokenized and checked against the context by the caller
        try:
            if job.cancelled.is_set():
                job.out.put(("done", Completion("", len(tokens), 0, "cancelled",
                                                queued_s=started - job.submitted)))
                return
            chain, grammar = self._sampler(job.sampling, tokens)
        except ForgeError as exc:
            job.out.put(("error", exc))
            return
        except Exception as exc:
            job.out.put(("error", ModelError(f"generation failed: {exc}")))
            return
        budget = min(job.sampling.max_tokens, engine.n_ctx - len(tokens))
        self._live.append(_Sequence(job, self._free.pop(), tokens, budget, chain, grammar,
                                    started))

    def _sampler(self, s: Sampling, prompt: list[int]) -> tuple[Any, Any]:
        """This request's own sampler chain: penalties, then greedy or top-k → top-p → min-p
        → temperature → a draw seeded by the request (the order llama-cpp-python uses); None
        for plain greedy, which `_step` samples itself. And its grammar's sampler, or None."""
        lib = self._lib
        grammar = None
        if s.grammar is not None:
            grammar = lib.llama_sampler_init_grammar(self._vocab, s.grammar.encode("utf-8"),
                                                     b"root")
            if not grammar:
                raise UsageError("the request's grammar does not parse (llama.cpp refused it)")
        if s.temperature == 0 and s.repeat_penalty == 1.0:
            return None, grammar
        params = lib.llama_sampler_chain_default_params()
        params.no_perf = True
        chain = lib.llama_sampler_chain_init(params)
        penalties = None
        if s.repeat_penalty != 1.0:
            penalties = lib.llama_sampler_init_penalties(
                self._engine.n_vocab, PENALTY_LAST_N, s.repeat_penalty, 0.0, 0.0)
            lib.llama_sampler_chain_add(chain, penalties)
        if s.temperature == 0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
        else:
            seed = s.seed if s.seed is not None else random.getrandbits(32)
            for sampler in (lib.llama_sampler_init_top_k(s.top_k),
                            lib.llama_sampler_init_top_p(s.top_p, 1),
                            lib.llama_sampler_init_min_p(s.min_p, 1),
                            lib.llama_sampler_init_temp(s.temperature),
                            lib.llama_sampler_init_dist(seed & 0xFFFFFFFF)):
                lib.llama_sampler_chain_add(chain, sampler)
        if penalties is not None:  # the penalty counts the prompt's tokens too (the grammar
            for token in prompt[-PENALTY_LAST_N:]:  # does not: it constrains the reply alone)
                lib.llama_sampler_accept(penalties, token)
        return chain, grammar

    def _constrained(self, seq: _Sequence, row: int) -> int | None:
        """The next token of a sequence under a grammar, as llama.cpp's own common sampler
        does it: sample from the whole row, ask the grammar about that one token, and only
        when it refuses mask the whole vocabulary with the grammar and sample again. Asking
        about one token is cheap; masking ~50k costs a few ms a token, which the model's own
        choice usually spares. Greedy picks exactly what masking first would (the best token,
        if allowed, is the best allowed one); a draw is from the same allowed tokens within
        the same top-k/min-p bounds the auditor checks. None: the grammar allows no token."""
        lib = self._lib
        logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(self._ctx, row),
                                       shape=(self._n_vocab,))
        token = self._pick(seq.chain, logits, None)
        one = self._one
        one["id"][0], one["logit"][0], one["p"][0] = token, 0.0, 0.0
        lib.llama_sampler_apply(seq.grammar, ctypes.byref(
            lib.llama_token_data_array(self._one_ptr, 1, -1, False)))
        if one["logit"][0] != 0.0:  # refused (set to -inf): mask everything and draw again
            token = self._pick(seq.chain, logits, seq.grammar)
            if token is None:
                return None
        lib.llama_sampler_accept(seq.grammar, token)
        if seq.chain is not None:
            lib.llama_sampler_accept(seq.chain, token)
        return token

    def _pick(self, chain: Any, logits: Any, grammar: Any) -> Any:
        """A token drawn by `chain` (the row's argmax when None) from `logits`, after
        `grammar` masked them if given; None when the grammar left no token."""
        lib = self._lib
        cand = self._cand
        cand["id"] = self._ids
        cand["logit"] = logits
        cand["p"] = 0.0
        array = lib.llama_token_data_array(self._cand_ptr, self._n_vocab, -1, False)
        if grammar is not None:
            lib.llama_sampler_apply(grammar, ctypes.byref(array))
        if chain is None:  # greedy: the first of equal maxima, as the free path takes it
            best = int(cand["logit"].argmax())
            if grammar is not None and not np.isfinite(cand["logit"][best]):
                return None
            return int(cand["id"][best])
        lib.llama_sampler_apply(chain, ctypes.byref(array))
        if not 0 <= array.selected < array.size:
            return None
        chosen = array.data[array.selected]
        if grammar is not None and not np.isfinite(chosen.logit) and chosen.logit < 0:
            return None
        return int(chosen.id)

    # -- one step ----------------------------------------------------------------------------

    def _step(self) -> None:
        lib, batch = self._lib, self._batch
        for seq in [s for s in self._live if s.job.cancelled.is_set()]:
            self._finish(seq, "cancelled")
        rows: list[tuple[_Sequence, int]] = []  # who samples from which row of logits
        kept: list[tuple[_Scoring, int, int]] = []  # (job, batch row, its row of scores)
        fed: list[_Sequence | _Scoring] = []
        n = 0
        for seq in self._live:
            if not seq.prefilling and isinstance(seq, _Sequence):
                self._put(n, seq.next, seq, True)
                rows.append((seq, n))
                fed.append(seq)
                n += 1
        for seq in self._live:
            if not seq.prefilling or n >= self._n_batch:
                continue
            take = min(len(seq.prompt) - seq.fed, self._n_batch - n)
            scoring = seq if isinstance(seq, _Scoring) else None
            for i in range(seq.fed, seq.fed + take):
                keep = scoring is not None and scoring.wanted(i)
                self._put(n, seq.prompt[i], seq, keep)
                if scoring is not None and keep:
                    kept.append((scoring, n, i - scoring.job.start + 1))
                n += 1
            seq.fed += take
            fed.append(seq)
            if isinstance(seq, _Scoring):
                continue
            if not seq.prefilling:  # its last prompt token: sample the first reply token
                batch.logits[n - 1] = 1
                rows.append((seq, n - 1))
        if n == 0:
            return
        batch.n_tokens = n
        threads = self._lanes.threads(self._lane)
        if threads != self._threads:
            lib.llama_set_n_threads(self._ctx, *threads)
            self._threads = threads
        code = lib.llama_decode(self._ctx, batch)
        if code != 0:
            for seq in fed:
                self._fail(seq, ModelError(
                    f"llama.cpp could not decode a step of {n} tokens (llama_decode "
                    f"returned {code})"))
            return
        if kept:  # in position order: each step feeds a job's next chunk, lowest first
            for job, row, at in kept:
                logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(self._ctx, row),
                                               shape=(self._n_vocab,))
                reduce = job.job.reduce
                try:
                    job.rows[at] = logits if reduce is None else reduce(at, logits)
                except Exception as exc:  # the caller's code: it must not fail the others
                    job.error = job.error or exc
        for seq, row in rows:
            if seq.grammar is not None:
                picked = self._constrained(seq, row)
                if picked is None:  # nothing the grammar allows: the reply ends here
                    self._finish(seq, "stop")
                    continue
                token = picked
            elif seq.chain is None:
                logits = lib.llama_get_logits_ith(self._ctx, row)
                token = int(np.ctypeslib.as_array(logits, shape=(self._n_vocab,)).argmax())
            else:
                token = lib.llama_sampler_sample(seq.chain, self._ctx, row)
            self._take(seq, token)
        for seq in fed:
            if isinstance(seq, _Scoring) and not seq.prefilling:
                self._release(seq)
                seq.job.out.put(("done", seq.rows) if seq.error is None else
                                ("error", ModelError(f"scoring failed: {seq.error}")))

    def _put(self, i: int, token: int, seq: _Sequence | _Scoring, logits: bool) -> None:
        batch = self._batch
        batch.token[i] = token
        batch.pos[i] = seq.pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq.slot
        batch.logits[i] = logits
        seq.pos += 1

    def _take(self, seq: _Sequence, token: int) -> None:
        """A token sampled for `seq`: stream its text, or end the sequence."""
        if self._lib.llama_vocab_is_eog(self._vocab, token):
            self._finish(seq, "stop")
            return
        seq.count += 1
        seq.ids.append(token)
        seq.last = time.perf_counter()
        if seq.count == 1:
            seq.first = seq.last
        piece = seq.text.add(self._engine._piece(token, self._piece_buf))
        if piece:
            seq.parts.append(piece)
            seq.job.out.put(("text", piece, seq.count))
        if seq.text.stopped:
            self._finish(seq, "stop")
        elif seq.count >= seq.budget:
            self._finish(seq, "length")
        else:
            seq.next = token

    # -- ending ------------------------------------------------------------------------------

    def _release(self, seq: _Sequence | _Scoring) -> None:
        """Give the slot back and drop its KV cells, so the next sequence starts clean."""
        self._live.remove(seq)
        if not self._live:  # idle before its caller hears: a request it sends next finds so
            self._mark_busy(False)
        self._lib.llama_memory_seq_rm(self._mem, seq.slot, -1, -1)
        if seq.chain is not None:
            self._lib.llama_sampler_free(seq.chain)
        if seq.grammar is not None:
            self._lib.llama_sampler_free(seq.grammar)
        self._free.append(seq.slot)

    def _finish(self, seq: _Sequence | _Scoring, reason: str) -> None:
        if isinstance(seq, _Scoring):  # cancelled: its caller withdrew it, or the engine closes
            self._fail(seq, ModelError("scoring was cancelled"))
            return
        self._release(seq)
        tail = seq.text.tail()
        if tail:
            seq.parts.append(tail)
            seq.job.out.put(("text", tail, seq.count))
        seq.job.out.put(("done", Completion(
            text="".join(seq.parts),
            prompt_tokens=len(seq.prompt),
            completion_tokens=seq.count,
            finish_reason=reason,
            queued_s=seq.queued,
            prompt_s=(seq.first if seq.count else time.perf_counter()) - seq.started,
            generation_s=seq.last - seq.first,
            token_ids=seq.ids,
        )))

    def _fail(self, seq: _Sequence | _Scoring, exc: ForgeError) -> None:
        self._release(seq)
        seq.job.out.put(("error", exc))


def reply_text(pieces: Iterable[bytes], stops: tuple[str, ...]) -> tuple[str, int]:
    """The text that a reply of these token pieces streams (a stop string cut as generation
    cuts it) and how many pieces were read: fewer than given when a stop string ended it."""
    text = _Text(stops)
    parts: list[str] = []
    read = 0
    for raw in pieces:
        read += 1
        parts.append(text.add(raw))
        if text.stopped:
            break
    parts.append(text.tail())
    return "".join(parts), read


def stop_prefix_len(text: str, stops: tuple[str, ...], longest: int) -> int:
    """How many trailing characters of `text` could be the start of a stop string."""
    for n in range(min(len(text), longest - 1), 0, -1):
        tail = text[-n:]
        if any(stop.startswith(tail) for stop in stops):
            return n
    return 0


__all__ = ["PENALTY_LAST_N", "Scheduler", "reply_text", "stop_prefix_len"]
