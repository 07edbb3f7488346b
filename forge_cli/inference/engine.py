"""The llama.cpp engine: one loaded model, one context with N sequence slots, one scheduler
thread with a bounded queue in front.

Requests are decoded together by continuous batching (forge_cli.inference.batching): each
step is one `llama_decode` carrying the next token of every live sequence and prompt chunks
of newly admitted ones, and every sequence samples with its own parameters and seed. Callers
get a `Stream` of text pieces that ends with a `Completion` (text, exact token counts,
timings); a caller that stops listening cancels its request at the next step. Embeddings
(`Engine.embed`) come from a context of their own over the same model, beside the scheduler's.
llama.cpp's own log is silenced through its log callback, never by redirecting the process's
stdout or stderr file descriptors.

>>> with Engine("model.gguf") as engine:                        # doctest: +SKIP
...     for piece in engine.chat([{"role": "user", "content": "hi"}], Sampling(max_tokens=8)):
...         print(piece, end="")
"""

from __future__ import annotations

import ctypes
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from forge_cli.errors import EngineBusy, ModelError, PromptTooLong, UsageError
from forge_cli.inference import templates
from forge_cli.inference.grammar import Matcher
from forge_cli.inference.jobs import Call, Completion, Embeddings, Job, Sampling, Score
from forge_cli.inference.tools import Tools

DEFAULT_N_CTX = 4096
DEFAULT_QUEUE = 16
# Tokens one decode step may carry (llama.cpp's n_batch): a long prompt is fed in chunks of
# this size beside the other sequences' next tokens.
BATCH_TOKENS = 512
# The embedding context's batch: at least this many tokens (more when one input needs more, up
# to n_ctx: a pooled sequence must lie whole in one batch), and at most this many inputs.
EMBED_BATCH_TOKENS = 512
EMBED_SEQUENCES = 64

log = logging.getLogger("forge.engine")
_backend_ready = False


class Stream:
    """Text pieces of one request as they are generated; `.completion` once it is exhausted.

    Leaving the loop early, `close()`, a `with` block's end or garbage collection cancels the
    request: its sequence ends at the next step and frees its slot.
    """

    def __init__(self, job: Job) -> None:
        self._job = job
        self.completion: Completion | None = None
        self.tokens = 0  # tokens generated up to and including the last piece read

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        if self.completion is not None:
            raise StopIteration
        while True:
            try:
                # A timeout keeps the wait interruptible by Ctrl-C on every platform.
                kind, value, *count = self._job.out.get(timeout=0.25)  # count: [tokens]
            except queue.Empty:
                continue
            if kind == "text":
                self.tokens = count[0]
                return value
            if kind == "done":
                self.completion = value
                raise StopIteration
            self.completion = self._failed()
            raise value

    def _failed(self) -> Completion:
        """What a request that failed produced (here: nothing is counted)."""
        return Completion("", 0, 0, "error")

    def result(self) -> Completion:
        """Wait for the end and return the Completion (pieces not yet read are included)."""
        for _ in self:
            pass
        assert self.completion is not None
        return self.completion

    def cancel(self) -> None:
        self._job.cancelled.set()

    close = cancel

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()

    def __del__(self) -> None:
        self._job.cancelled.set()


def extra_buffers_safe(lib: Any) -> bool:
    """Whether weights may go to ggml's extra CPU buffer types (repacked layouts).

    Not on a CPU with AMX: there ggml picks its AMX buffer type, and in this llama.cpp a decode
    of more than one token then dies with SIGSEGV (SmolLM2's Q4_1 on a Sapphire Rapids host,
    llama-cpp-python's own `Llama` included). Plain CPU buffers decode correctly everywhere."""
    return b"AMX_INT8 = 1" not in lib.llama_print_system_info()


def _on_own_thread(fn: Callable[[], Any], name: str) -> Any:
    """fn() run on a thread started for it; what it returns or raises.

    llama.cpp's CPU backend decodes on an OpenMP team of the calling thread, and that team
    lives as long as its thread. While it lives, idle or not, libgomp counts more threads than
    cores and stops spinning at its barriers, which slowed every later step of the scheduler
    (smollm2:135m on this project's 2 cores: 88 → 30 tokens/s while a long-lived thread that
    had decoded once stayed alive). A thread that ends takes its team with it."""
    result: list[Any] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as exc:  # handed to the caller, raised there
            failure.append(exc)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    while thread.is_alive():  # a timeout keeps the wait interruptible by Ctrl-C
        thread.join(timeout=0.25)
    if failure:
        raise failure[0]
    return result[0]


def refuse_oversized(name: str, n_ctx: int, limit: int | None, size: int, what: str) -> None:
    """PromptTooLong when `size` bytes exceed `limit`, the most bytes a prompt that fits the
    context of n_ctx tokens can have (Engine.max_prompt_bytes; None: no bound is known)."""
    if limit is not None and size > limit:
        raise PromptTooLong(
            f"{what} is {size:,} bytes; the context of {name} holds {n_ctx:,} tokens, and no "
            f"text of more than {limit:,} bytes fits in it with this model's tokenizer",
            hint="shorten the input")


# llama.cpp calls this for every log line of every model; it must outlive them all.
_LOG_TAIL: deque[str] = deque(maxlen=20)
_log_callback: Any = None
# Also told every line (level, text): how a split model learns where llama.cpp put each layer.
LOG_WATCHERS: list[Callable[[int, str], None]] = []


def _silence_llama_log(llama_cpp: Any) -> None:
    """Send llama.cpp's and ggml's log into a small ring buffer (used to explain failures)."""
    global _log_callback
    if _log_callback is not None:
        return

    @llama_cpp.llama_log_callback
    def keep_tail(level: int, text: bytes, user_data: Any) -> None:
        if level in (2, 3):  # warnings and errors: what explains a failed load
            _LOG_TAIL.append(text.decode("utf-8", errors="replace").strip())
        for watch in LOG_WATCHERS:
            watch(level, text.decode("utf-8", errors="replace"))

    _log_callback = keep_tail
    llama_cpp.llama_log_set(keep_tail, ctypes.c_void_p(0))


class Engine:
    """One GGUF model loaded into llama.cpp, its requests decoded together in `slots`
    sequence slots, spread over `lanes`: contexts of their own, each stepped by its own
    scheduler thread (see batching.Lanes for how they share the threads).

    `n_ctx` is the context of each request: the KV cache holds `slots × n_ctx` tokens, each
    slot its own stream (not a unified pool), so a request never runs out of room because
    others are long, and attention never spans another request's cells. `slots=1` decodes
    one request at a time in a context of `n_ctx`, the memory of a plain llama.cpp context.
    `n_threads` defaults to the physical cores; `n_threads_batch` (prompt chunks and steps
    over several sequences) to `n_threads` (forge_cli.inference.threads says why).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        name: str | None = None,
        n_ctx: int = DEFAULT_N_CTX,
        n_threads: int | None = None,
        n_threads_batch: int | None = None,
        slots: int | None = None,
        lanes: int | None = None,
        n_gpu_layers: int | None = None,
        tensor_split: list[float] | None = None,
        queue_size: int = DEFAULT_QUEUE,
    ) -> None:
        import llama_cpp

        from forge_cli.inference import threads

        self._lib = llama_cpp
        self.path = Path(path)
        self.name = name or self.path.name
        _silence_llama_log(llama_cpp)
        # A wheel with the RPC backend says it supports offload on any machine; it offloads to
        # nothing until a GPU or an RPC server is there, so count the devices that are.
        from forge_cli.rpc.ggml import gpu_devices

        self.gpu_offload = bool(llama_cpp.llama_supports_gpu_offload()) and gpu_devices() > 0
        if n_gpu_layers is None:
            n_gpu_layers = -1 if self.gpu_offload else 0
        self.n_gpu_layers = n_gpu_layers
        self.n_threads = n_threads or threads.default_threads()
        self.n_threads_batch = n_threads_batch or threads.default_threads_batch(self.n_threads)
        wanted_slots = slots or threads.default_slots(self.gpu_offload and n_gpu_layers != 0)
        if not self.path.is_file():
            raise ModelError(f"model file {self.path} does not exist")

        started = time.perf_counter()
        _LOG_TAIL.clear()
        self._contexts: list[tuple[Any, int]] = []  # each lane's context and its slots
        self._model = self._load_model(n_gpu_layers, tensor_split)
        try:
            self._vocab = llama_cpp.llama_model_get_vocab(self._model)
            self.metadata = self._read_metadata()
            self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
            self._bos = llama_cpp.llama_vocab_bos(self._vocab)
            self._add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))
            eos = llama_cpp.llama_vocab_eos(self._vocab)
            self.template = templates.for_model(
                self.metadata, self._token_text(self._bos), self._token_text(eos)
            )
            self.lanes = self._lane_count(lanes, wanted_slots)
            # Last: nothing after them can fail, so no context is ever left unfreed.
            per_lane = -(-wanted_slots // self.lanes)
            self.slots_note = ""
            for _ in range(self.lanes):
                ctx, got, note = self._new_context(n_ctx, per_lane)
                self._contexts.append((ctx, got))
                self.slots_note = self.slots_note or note
                per_lane = got  # a lane that had to make do with fewer: the rest match it
        except BaseException:
            for ctx, _ in self._contexts:
                llama_cpp.llama_free(ctx)
            llama_cpp.llama_model_free(self._model)
            raise
        self._ctx = self._contexts[0][0]
        self.slots = sum(got for _, got in self._contexts)
        self.load_s = time.perf_counter() - started
        self.n_ctx = int(llama_cpp.llama_n_ctx_seq(self._ctx))
        self.token_bytes = self._longest_token()
        self._jobs: queue.Queue[Job | Score | Call | None] = queue.Queue(maxsize=queue_size)
        self._closed = False
        self._readers = threading.Condition()  # callers tokenizing now (see _vocab_in_use)
        self._reading = 0
        # Embeddings: their own context, made by the first call (see embed)
        self._embedding: tuple[Any, int] | None = None  # (context, tokens its batch holds)
        self._embedding_lock = threading.Lock()  # one call decodes on it at a time
        self._embedding_calls = 0  # calls waiting for it or decoding (bounded like the queue)
        self._embedding_gate = threading.Lock()

        from forge_cli.inference.batching import Lanes, Scheduler

        self._lanes = Lanes(self.lanes, self.n_threads, self.n_threads_batch)
        self._schedulers = [Scheduler(self, ctx, got, self._jobs, self._lanes, lane)
                            for lane, (ctx, got) in enumerate(self._contexts)]
        self._workers = [threading.Thread(target=scheduler.run, daemon=True,
                                          name=f"forge-llama:{self.name}:{i}")
                         for i, scheduler in enumerate(self._schedulers)]
        for worker in self._workers:
            worker.start()

    # -- loading -----------------------------------------------------------------------------

    def _load_model(self, n_gpu_layers: int, tensor_split: list[float] | None = None) -> Any:
        lib = self._lib
        global _backend_ready
        if not _backend_ready:
            lib.llama_backend_init()
            _backend_ready = True
        params = lib.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        params.use_extra_bufts = extra_buffers_safe(lib)
        if tensor_split:  # shares of the offloaded layers per device (a split model's peers)
            shares = (ctypes.c_float * lib.llama_max_devices())(*tensor_split)
            params.tensor_split = ctypes.cast(shares, ctypes.POINTER(ctypes.c_float))
        try:
            model = lib.llama_model_load_from_file(str(self.path).encode("utf-8"), params)
        except (ValueError, RuntimeError, OSError) as exc:
            raise self._load_error(exc) from exc
        if not model:
            raise self._load_error(None)
        return model

    def _lane_count(self, lanes: int | None, slots: int) -> int:
        """`lanes` as asked (default 1), never more than the slots or the threads to run them.

        Whether more lanes pay depends on the model: on this project's 2-core machine two lanes
        raised 4 buyers' aggregate over one buyer from 1.21x to 1.36x with smollm2:135m but
        lowered it from 1.19x to 1.0x with gemma3:270m, which decodes 16% slower on one
        thread than on two (bench/engine_bench.py), so one lane stays the default."""
        return max(1, min(lanes or 1, slots, self.n_threads))

    def _new_context(self, n_ctx: int, slots: int) -> tuple[Any, int, str]:
        """A context of `slots` sequences with `n_ctx` tokens each, or of one sequence (and
        the reason) when llama.cpp cannot make the batched one for this model."""
        lib = self._lib
        reason = ""
        limit = int(lib.llama_max_parallel_sequences())
        if slots > limit:
            reason = f"llama.cpp decodes at most {limit} sequences together"
            log.warning("%s: %d slots asked; %s", self.name, slots, reason)
            slots = limit
        if slots > 1 and lib.llama_model_has_encoder(self._model):
            reason = "an encoder-decoder model is decoded one request at a time"
            log.warning("%s: %s", self.name, reason)
            slots = 1
        while True:
            params = lib.llama_context_default_params()
            params.n_ctx = n_ctx * slots
            params.n_batch = params.n_ubatch = min(BATCH_TOKENS, n_ctx * slots)
            params.n_seq_max = slots
            params.kv_unified = False
            params.n_threads = self.n_threads
            params.n_threads_batch = self.n_threads_batch
            params.no_perf = True
            _LOG_TAIL.clear()
            ctx = lib.llama_init_from_model(self._model, params)
            if ctx:
                return ctx, slots, reason
            why = next((line for line in reversed(_LOG_TAIL) if line), "") or "no reason given"
            if slots == 1:
                raise ModelError(f"llama.cpp cannot make a context of {n_ctx} tokens for "
                                 f"{self.path}: {why}",
                                 hint="a smaller models.n_ctx needs less memory")
            reason = f"llama.cpp could not make a context of {slots} sequences: {why}"
            log.warning("%s: %s; decoding one request at a time", self.name, reason)
            slots = 1

    def _read_metadata(self) -> dict[str, str]:
        lib = self._lib
        buf = ctypes.create_string_buffer(1024)

        def read(fn: Callable[..., int], i: int) -> str:
            nonlocal buf
            n = fn(self._model, i, buf, len(buf))
            if n >= len(buf):  # snprintf semantics: n is the full length
                buf = ctypes.create_string_buffer(n + 1)
                n = fn(self._model, i, buf, len(buf))
            return buf.value.decode("utf-8", errors="replace") if n >= 0 else ""

        return {read(lib.llama_model_meta_key_by_index, i):
                read(lib.llama_model_meta_val_str_by_index, i)
                for i in range(lib.llama_model_meta_count(self._model))}

    def _load_error(self, exc: BaseException | None) -> ModelError:
        from forge_cli.inference import gguf_meta

        gguf_meta.check_loadable(self.path)  # raises the precise reason when there is one
        reason = next((line for line in reversed(_LOG_TAIL) if line), "") or str(exc or "")
        return ModelError(f"llama.cpp cannot load {self.path}: {reason or 'no reason given'}",
                          hint="the file may be damaged or of an architecture this llama.cpp "
                          "does not know; `forge models show` tells what it is")

    def _longest_token(self) -> int | None:
        """The most prompt bytes one token can stand for, when the tokenizer is lossless (every
        byte of the text lands in exactly one token): the longest piece in the vocabulary, and
        at least 4 (an unknown token stands for one whole UTF-8 character). None for a tokenizer
        that may drop bytes (WordPiece, Unigram's whitespace folding, a special token that
        absorbs the whitespace beside it): there, length in bytes bounds nothing."""
        lib = self._lib
        if lib.llama_vocab_type(self._vocab) not in (lib.LLAMA_VOCAB_TYPE_SPM,
                                                     lib.LLAMA_VOCAB_TYPE_BPE,
                                                     lib.LLAMA_VOCAB_TYPE_RWKV):
            return None
        strips = lib.LLAMA_TOKEN_ATTR_LSTRIP | lib.LLAMA_TOKEN_ATTR_RSTRIP
        buf = ctypes.create_string_buffer(256)
        longest = 4
        for token in range(self.n_vocab):
            if lib.llama_vocab_get_attr(self._vocab, token) & strips:
                return None
            n = lib.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, True)
            longest = max(longest, -n if n < 0 else n)
        return longest

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        raw = self._lib.llama_vocab_get_text(self._vocab, token)
        return raw.decode("utf-8", errors="replace") if raw else ""

    # -- the public calls (any thread) -------------------------------------------------------

    @property
    def sha256(self) -> str:
        """The model's identity: SHA-256 of its GGUF file (cached by path, size and mtime)."""
        from forge_cli.inference import identity

        return identity.sha256_file(self.path)

    def describe(self) -> dict[str, Any]:
        """How the engine runs, as `forge chat -v` and /v1/models report it."""
        return {"n_ctx": self.n_ctx, "max_prompt_bytes": self.max_prompt_bytes,
                "slots": self.slots, "lanes": self.lanes,
                "threads": self.n_threads,
                "threads_batch": self.n_threads_batch, "gpu_offload": self.gpu_offload,
                "n_gpu_layers": self.n_gpu_layers,
                **({"slots_note": self.slots_note} if self.slots_note else {})}

    @property
    def max_prompt_bytes(self) -> int | None:
        """Prompts longer than this in UTF-8 bytes cannot fit the context, whatever their
        text: each token stands for at most `token_bytes` of them, so more than
        (n_ctx - 1) x token_bytes bytes make at least n_ctx tokens. None when the tokenizer
        gives no such bound (then only tokenizing tells)."""
        return None if self.token_bytes is None else (self.n_ctx - 1) * self.token_bytes

    def check_prompt_bytes(self, size: int, what: str = "the prompt") -> None:
        """Refuse, before tokenizing, a prompt of `size` UTF-8 bytes that cannot fit."""
        refuse_oversized(self.name, self.n_ctx, self.max_prompt_bytes, size, what)

    def render(self, messages: list[dict[str, Any]], tools: Tools | None = None) -> str:
        """The prompt text the model's chat template makes of `messages`, with the `tools` a
        request offers (forge_cli.inference.tools says how they are shown)."""
        return self.template.render(messages, offered=tools)

    @property
    def queued(self) -> int:
        """Requests waiting for a free slot (those being decoded are not counted)."""
        return self._jobs.qsize()

    @property
    def layers(self) -> int:
        """The model's transformer blocks, as its GGUF states them (0 when it does not)."""
        arch = self.metadata.get("general.architecture", "")
        try:
            return int(self.metadata.get(f"{arch}.block_count", 0))
        except ValueError:
            return 0

    def placement(self) -> dict[str, Any]:
        """Where the layers run: `device` is "GPU", "CPU" or "GPU+CPU" (split)."""
        layers = self.layers
        offloaded = self.gpu_offload and self.n_gpu_layers != 0
        on_gpu = 0
        if offloaded:
            on_gpu = layers if self.n_gpu_layers < 0 else min(self.n_gpu_layers, layers)
        if not offloaded:
            device = "CPU"
        elif on_gpu < layers:
            device = "GPU+CPU"
        else:  # all of them, or a GGUF that does not say how many there are
            device = "GPU"
        return {"device": device, "layers": layers, "gpu_layers": on_gpu}

    def tokenize(self, text: str, *, add_bos: bool = False, special: bool = True) -> list[int]:
        """Token ids of `text` by the model's own tokenizer (the vocabulary alone: safe on any
        thread while the scheduler decodes)."""
        with self._vocab_in_use():
            return self._tokenize(text, add_bos=add_bos, special=special)

    @contextmanager
    def _vocab_in_use(self) -> Iterator[None]:
        """Hold the model open while a caller's thread reads its vocabulary: `close` frees it
        only once every such reader is done (and none starts after)."""
        with self._readers:
            if self._closed:
                raise ModelError(f"the engine for {self.name} is closed")
            self._reading += 1
        try:
            yield
        finally:
            with self._readers:
                self._reading -= 1
                self._readers.notify_all()

    def check_grammar(self, grammar: str) -> None:
        """A UsageError (a 400) when llama.cpp cannot parse `grammar` against this model's
        vocabulary: checked in the caller's thread, before anything is reserved or queued."""
        lib = self._lib
        with self._vocab_in_use():
            sampler = lib.llama_sampler_init_grammar(self._vocab, grammar.encode("utf-8"), b"root")
            if not sampler:
                raise UsageError("the grammar does not parse (llama.cpp refused it)")
            lib.llama_sampler_free(sampler)

    @contextmanager
    def grammar_matcher(self, grammar: str) -> Iterator[Matcher]:
        """llama.cpp's grammar sampler for `grammar` over this model's vocabulary, to step by
        hand (an auditor's; UsageError when it does not parse). The model stays open while
        it lives; it may be used on the scheduler thread, by a scoring job's `reduce`."""
        with self._vocab_in_use():
            matcher = Matcher(self._lib, self._vocab, self.n_vocab, grammar)
            try:
                yield matcher
            finally:
                matcher.close()

    def reply_text(self, ids: list[int], stops: tuple[str, ...] = ()) -> tuple[str, int]:
        """The text `chat` streams for a reply of these token ids (with `stops` and the
        template's stop strings cut as generation cuts them), and how many ids it read before
        a stop string ended it (vocabulary only: safe on any thread)."""
        from forge_cli.inference.batching import reply_text

        buf = ctypes.create_string_buffer(256)
        with self._vocab_in_use():
            return reply_text((self._piece(t, buf) for t in ids),
                              tuple(dict.fromkeys(stops + self.template.stops)))

    def call(self, fn: Callable[[], Any], *, block: bool = True) -> Any:
        """Run `fn` on the scheduler thread between two decode steps and return its result
        (it waits in the queue like a request, and runs once a slot is free)."""
        item = Call(fn)
        self._put(item, block)
        return item.future.result()

    def chat(self, messages: list[dict[str, Any]], sampling: Sampling = Sampling(), *,
             tools: Tools | None = None, block: bool = True) -> Stream:
        """Stream the assistant's reply to a conversation, rendered with the chat template
        (with the `tools` offered: the grammar that constrains the calls is `sampling`'s).

        The prompt is rendered and tokenized in the calling thread (call it off an event
        loop): its cost grows with its length, and it never holds the scheduler."""
        # Every template writes each message's content into the prompt, so contents alone
        # past the bound cannot fit: refused before rendering them.
        self.check_prompt_bytes(sum(len(m["content"].encode("utf-8")) for m in messages),
                                "the conversation")
        prompt = self.render(messages, tools)
        stops = tuple(dict.fromkeys(sampling.stop + self.template.stops))
        if stops != sampling.stop:
            sampling = Sampling(**{**sampling.__dict__, "stop": stops})
        # The template writes the BOS token itself when the model wants one.
        return self.generate(prompt, sampling, add_bos=False, block=block)

    def generate(self, prompt: str, sampling: Sampling = Sampling(), *, add_bos: bool = True,
                 block: bool = True) -> Stream:
        """Stream a raw completion of `prompt` (no chat template), tokenized in the calling
        thread: a prompt that cannot fit the context is refused here (PromptTooLong by its
        bytes before tokenizing, UsageError by its tokens after), and never reaches the
        scheduler.

        With block=False a full queue raises EngineBusy instead of waiting.
        """
        if sampling.max_tokens < 1:
            raise UsageError(f"max tokens must be at least 1, found {sampling.max_tokens}")
        if sampling.temperature < 0:
            raise UsageError(f"temperature must be 0 or more, found {sampling.temperature}")
        data = prompt.encode("utf-8")
        self.check_prompt_bytes(len(data))
        with self._vocab_in_use():
            tokens = self._tokenize_bytes(data, add_bos=add_bos)
        if len(tokens) >= self.n_ctx:
            raise UsageError(
                f"the prompt is {len(tokens)} tokens; the context of {self.name} holds "
                f"{self.n_ctx}", hint="shorten the input, or /reset the conversation")
        if not tokens:
            raise UsageError("the prompt is empty and this model adds no BOS token")
        job = Job(tokens, sampling)
        self._put(job, block)
        return Stream(job)

    def score(self, tokens: list[int], start: int, *,
              reduce: Callable[[int, Any], Any] | None = None, block: bool = True,
              cancel: threading.Event | None = None) -> Any:
        """The logits (a float32 array, one row of n_vocab per token of `tokens[start:]`) that
        this model gives each of those tokens after all the tokens before it: one prefill of
        `tokens` through a slot of the same scheduler, nothing sampled. Row i scores
        `tokens[start + i]`; an audit reads a provider's reply against them.

        With `reduce`, the list of `reduce(i, row)` instead: it runs on the scheduler thread
        over llama.cpp's own buffer (keep nothing of `row`), so no row is copied or held.
        Setting `cancel` (from any thread) drops the job at the next step: ModelError.

        >>> rows = engine.score(prompt + reply, len(prompt))     # doctest: +SKIP
        >>> int(rows[0].argmax()) == reply[0]                    # greedy's first token
        """
        if not 1 <= start <= len(tokens):
            raise UsageError(f"scoring needs 1 ≤ start ≤ {len(tokens)} tokens, found {start}")
        if len(tokens) > self.n_ctx:
            raise UsageError(f"{len(tokens)} tokens to score; the context of {self.name} holds "
                             f"{self.n_ctx}")
        job = Score(list(tokens), start, reduce)
        if cancel is not None:
            job.cancelled = cancel
        self._put(job, block)
        while True:
            try:
                kind, value = job.out.get(timeout=0.25)
            except queue.Empty:
                continue
            if kind == "error":
                raise value
            return value

    # -- embeddings (a context of their own) ------------------------------------------------

    @property
    def embedding_size(self) -> int:
        """How many numbers each embedding vector has."""
        lib = self._lib
        n_embd_out = getattr(lib, "llama_model_n_embd_out", lib.llama_model_n_embd)
        return int(n_embd_out(self._model))

    def embedding_tokens(self, texts: list[str]) -> list[list[int]]:
        """Each text's tokens as `embed` decodes them (a BOS where the model adds one), in the
        calling thread; an input that cannot be embedded is refused here, before any decode:
        PromptTooLong by its bytes before tokenizing, UsageError when it has no tokens or more
        than the context holds."""
        out = []
        for i, text in enumerate(texts):
            data = text.encode("utf-8")
            self.check_prompt_bytes(len(data), f"input[{i}]")
            with self._vocab_in_use():
                tokens = self._tokenize_bytes(data, add_bos=True)
            self._check_embedding_input(i, tokens)
            out.append(tokens)
        return out

    def _check_embedding_input(self, i: int, tokens: list[int]) -> None:
        if not tokens:
            raise UsageError(f"input[{i}] is empty: there is nothing to embed")
        if len(tokens) > self.n_ctx:
            raise UsageError(f"input[{i}] is {len(tokens):,} tokens; the context of "
                             f"{self.name} holds {self.n_ctx:,}", hint="shorten or split it")
        if not all(type(t) is int and 0 <= t < self.n_vocab for t in tokens):
            raise UsageError(f"input[{i}] holds a token id outside 0..{self.n_vocab - 1}")

    def embed(self, texts: list[str], *, block: bool = True) -> Embeddings:
        """One L2-normalized vector per text, pooled over its tokens (the model's own pooling
        when its GGUF names one, else the mean), with the tokens each took.

        >>> e = engine.embed(["a cat", "a dog"])                  # doctest: +SKIP
        >>> len(e.vectors), len(e.vectors[0]) == engine.embedding_size, e.prompt_tokens
        (2, True, 4)
        """
        return self.embed_tokens(self.embedding_tokens(texts), block=block)

    def embed_tokens(self, inputs: list[list[int]], *, block: bool = True) -> Embeddings:
        """`embed` for inputs already tokenized by `embedding_tokens`.

        The vectors come from a context of their own over the loaded model, made on the first
        call and grown when an input needs a bigger batch: the scheduler's contexts are never
        touched, and generation goes on while it decodes. Calls take it one at a time; with
        block=False, EngineBusy when as many calls as the request queue holds are already
        waiting. Several inputs decode together, each its own sequence, as many as fit one
        batch."""
        if not inputs:
            raise UsageError("nothing to embed: no inputs")
        for i, tokens in enumerate(inputs):
            self._check_embedding_input(i, tokens)
        with self._embedding_gate:
            if self._closed:
                raise ModelError(f"the engine for {self.name} is closed")
            if self._embedding_calls >= self._jobs.maxsize and not block:
                raise EngineBusy(f"the engine for {self.name} has {self._jobs.maxsize} "
                                 "embedding requests waiting; try again shortly")
            self._embedding_calls += 1
        try:
            return _on_own_thread(lambda: self._embed_locked(inputs),
                                  f"forge-embed:{self.name}")
        finally:
            with self._embedding_gate:
                self._embedding_calls -= 1

    def _embed_locked(self, inputs: list[list[int]]) -> Embeddings:
        called = time.perf_counter()
        with self._embedding_lock, self._vocab_in_use():  # the model stays until it ends
            started = time.perf_counter()
            vectors = self._embed_batches(inputs)
            done = time.perf_counter()
        sizes = [len(tokens) for tokens in inputs]
        return Embeddings(vectors, sizes, sum(sizes), queued_s=started - called,
                          embed_s=done - started)

    def _embed_batches(self, inputs: list[list[int]]) -> list[list[float]]:
        import numpy as np

        lib = self._lib
        ctx, room = self._embedding_context(max(len(tokens) for tokens in inputs))
        mem = lib.llama_get_memory(ctx)
        size = self.embedding_size
        encode = bool(lib.llama_model_has_encoder(self._model))
        vectors: list[list[float]] = []
        batch = lib.llama_batch_init(room, 0, 1)
        try:
            start = 0
            while start < len(inputs):
                if self._closed:
                    raise ModelError(f"the engine for {self.name} was closed")
                end, used = start, 0  # the inputs [start, end) that fit one batch
                while (end < len(inputs) and end - start < EMBED_SEQUENCES
                       and used + len(inputs[end]) <= room):
                    used += len(inputs[end])
                    end += 1
                batch.n_tokens = 0
                for seq, tokens in enumerate(inputs[start:end]):
                    for pos, token in enumerate(tokens):
                        k = batch.n_tokens
                        batch.token[k], batch.pos[k] = token, pos
                        batch.n_seq_id[k], batch.seq_id[k][0] = 1, seq
                        batch.logits[k] = 1  # pooling reads every position's output
                        batch.n_tokens += 1
                lib.llama_memory_clear(mem, True)  # the last batch's sequences reuse these ids
                code = (lib.llama_encode if encode else lib.llama_decode)(ctx, batch)
                if code != 0:
                    raise ModelError(f"llama.cpp could not embed {end - start} inputs of "
                                     f"{used} tokens with {self.name} (code {code})")
                for seq in range(end - start):
                    pooled = lib.llama_get_embeddings_seq(ctx, seq)
                    if not pooled:
                        raise ModelError(f"llama.cpp gave no pooled embedding for {self.name}")
                    vector = np.ctypeslib.as_array(pooled, shape=(size,)).astype(np.float64)
                    norm = float(np.linalg.norm(vector))
                    if not np.isfinite(norm):
                        raise ModelError(f"{self.name} made an embedding that is not finite")
                    if norm > 0:
                        vector /= norm
                    vectors.append(vector.astype(np.float32).tolist())
                start = end
        finally:
            lib.llama_batch_free(batch)
        return vectors

    def _embedding_context(self, longest: int) -> tuple[Any, int]:
        """The embedding context, with a batch of at least `longest` tokens (a new, bigger one
        replaces it when it has less). Its batch is also its micro-batch and its whole cache:
        pooling reads a sequence only when all of it is in one micro-batch, and each batch is
        decoded into an emptied cache."""
        lib = self._lib
        if self._embedding is not None and self._embedding[1] >= longest:
            return self._embedding
        room = max(longest, min(self.n_ctx, max(EMBED_BATCH_TOKENS,
                                                1 << (longest - 1).bit_length())))
        if lib.llama_model_has_encoder(self._model) and lib.llama_model_has_decoder(self._model):
            raise UsageError(f"{self.name} is an encoder-decoder model; it makes no embeddings")
        if self._embedding is not None:
            lib.llama_free(self._embedding[0])
            self._embedding = None
        params = lib.llama_context_default_params()
        params.n_ctx = params.n_batch = params.n_ubatch = room
        params.n_seq_max = min(EMBED_SEQUENCES, int(lib.llama_max_parallel_sequences()))
        params.kv_unified = True  # the sequences of a batch share the cache's cells
        params.embeddings = True
        params.pooling_type = self._pooling()
        params.n_threads = self.n_threads
        params.n_threads_batch = self.n_threads_batch
        params.no_perf = True
        _LOG_TAIL.clear()
        ctx = lib.llama_init_from_model(self._model, params)
        if not ctx:
            why = next((line for line in reversed(_LOG_TAIL) if line), "") or "no reason given"
            raise ModelError(f"llama.cpp cannot make an embedding context of {room} tokens for "
                             f"{self.name}: {why}")
        self._embedding = (ctx, room)
        return self._embedding

    def _pooling(self) -> int:
        """The GGUF's own pooling when it names mean, CLS or last-token pooling (an embedding
        model); the mean otherwise (a generative model like SmolLM2 names none)."""
        lib = self._lib
        arch = self.metadata.get("general.architecture", "")
        own = self.metadata.get(f"{arch}.pooling_type", "")
        kinds = (lib.LLAMA_POOLING_TYPE_MEAN, lib.LLAMA_POOLING_TYPE_CLS,
                 lib.LLAMA_POOLING_TYPE_LAST)
        return int(own) if own.isdigit() and int(own) in kinds else lib.LLAMA_POOLING_TYPE_MEAN

    def _put(self, item: Job | Score | Call, block: bool) -> None:
        if self._closed:
            raise ModelError(f"the engine for {self.name} is closed")
        try:
            self._jobs.put(item, block=block)
        except queue.Full:
            raise EngineBusy(
                f"the engine for {self.name} has {self._jobs.maxsize} requests waiting; "
                "try again shortly"
            ) from None

    def close(self) -> None:
        """Cancel what is queued or running, stop the scheduler and free the model."""
        with self._readers:
            if self._closed:
                return
            self._closed = True
        for scheduler in self._schedulers:
            scheduler.cancel_all()
        while True:
            try:
                item = self._jobs.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, Job | Score):
                item.out.put(("error", ModelError(f"the engine for {self.name} was closed")))
            elif isinstance(item, Call):
                item.future.set_exception(ModelError(f"the engine for {self.name} was closed"))
        self._lanes.close()
        for _ in self._workers:
            self._jobs.put(None)
        for worker in self._workers:
            worker.join(timeout=60)
        with self._readers:
            idle = self._readers.wait_for(lambda: self._reading == 0, timeout=60)
        if idle and not any(worker.is_alive() for worker in self._workers):
            for scheduler in self._schedulers:
                scheduler.free()
            for ctx, _ in self._contexts:
                self._lib.llama_free(ctx)
            if self._embedding is not None:
                self._lib.llama_free(self._embedding[0])
            self._lib.llama_model_free(self._model)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the tokenizer and pieces (vocabulary only) ------------------------------------------

    def _tokenize(self, text: str, *, add_bos: bool, special: bool = True) -> list[int]:
        return self._tokenize_bytes(text.encode("utf-8"), add_bos=add_bos, special=special)

    def _tokenize_bytes(self, data: bytes, *, add_bos: bool, special: bool = True) -> list[int]:
        lib = self._lib
        room = len(data) + 2
        buf = (lib.llama_token * room)()
        n = lib.llama_tokenize(self._vocab, data, len(data), buf, room, False, special)
        if n < 0:  # more tokens than bytes (rare): ask again with the size it asked for
            room = -n
            buf = (lib.llama_token * room)()
            n = lib.llama_tokenize(self._vocab, data, len(data), buf, room, False, special)
        tokens = list(buf[:n])
        if add_bos and self._add_bos and self._bos >= 0 and tokens[:1] != [self._bos]:
            tokens.insert(0, self._bos)
        return tokens

    def _piece(self, token: int, buf: Any) -> bytes:
        n = self._lib.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        if n < 0:  # longer than the buffer: ask again with the size llama.cpp asked for
            big = ctypes.create_string_buffer(-n)
            n = self._lib.llama_token_to_piece(self._vocab, token, big, -n, 0, False)
            return big.raw[:n]
        return buf.raw[:n]
