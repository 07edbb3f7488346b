"""The llama.cpp engine: one loaded model, one worker thread, a bounded queue in front.

llama.cpp is never called concurrently on one context, so every call into it (tokenizing
included) runs on the worker thread; callers get a `Stream` of text pieces that ends with a
`Completion` (text, exact token counts, timings). A caller that stops listening cancels its
request at the next token. llama.cpp's own log is silenced through its log callback, never by
redirecting the process's stdout or stderr file descriptors.

>>> with Engine("model.gguf") as engine:                        # doctest: +SKIP
...     for piece in engine.chat([{"role": "user", "content": "hi"}], Sampling(max_tokens=8)):
...         print(piece, end="")
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import io
import queue
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forge_cli.errors import EngineBusy, ForgeError, ModelError, UsageError
from forge_cli.inference import templates

DEFAULT_N_CTX = 4096
DEFAULT_QUEUE = 16


@dataclass(frozen=True)
class Sampling:
    """How to sample; the defaults are llama.cpp's, except the temperature."""

    max_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class Completion:
    """The outcome of one request. Times are seconds, measured on the worker thread."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of turn or stop string), "length", "cancelled"
    queued_s: float = 0.0  # waiting for the worker
    prompt_s: float = 0.0  # prompt evaluation up to the first sampled token
    generation_s: float = 0.0  # from the first to the last sampled token

    @property
    def tokens_per_s(self) -> float:
        """Generation speed: tokens after the first, over the time they took."""
        if self.completion_tokens < 2 or self.generation_s <= 0:
            return 0.0
        return (self.completion_tokens - 1) / self.generation_s

    @property
    def prompt_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prompt_s if self.prompt_s > 0 else 0.0

    @property
    def time_to_first_token_s(self) -> float:
        return self.queued_s + self.prompt_s

    def as_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "timings": {
                "queued_ms": round(self.queued_s * 1000, 3),
                "prompt_ms": round(self.prompt_s * 1000, 3),
                "generation_ms": round(self.generation_s * 1000, 3),
                "time_to_first_token_ms": round(self.time_to_first_token_s * 1000, 3),
                "prompt_tokens_per_s": round(self.prompt_tokens_per_s, 3),
                "tokens_per_s": round(self.tokens_per_s, 3),
            },
        }


@dataclass
class _Job:
    prompt: str
    sampling: Sampling
    add_bos: bool
    out: queue.SimpleQueue[tuple[str, Any]] = field(default_factory=queue.SimpleQueue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)


@dataclass
class _Call:
    fn: Callable[[], Any]
    future: Future[Any] = field(default_factory=Future)


class Stream:
    """Text pieces of one request as they are generated; `.completion` once it is exhausted.

    Leaving the loop early, `close()`, a `with` block's end or garbage collection cancels the
    request: the worker stops at the next token and moves on.
    """

    def __init__(self, job: _Job) -> None:
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
                kind, value, *count = self._job.out.get(timeout=0.25)
            except queue.Empty:
                continue
            if kind == "text":
                self.tokens = count[0]
                return value
            if kind == "done":
                self.completion = value
                raise StopIteration
            self.completion = Completion("", 0, 0, "error")
            raise value

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


# llama.cpp calls this for every log line of every model; it must outlive them all.
_LOG_TAIL: deque[str] = deque(maxlen=20)
_log_callback: Any = None


def _silence_llama_log(llama_cpp: Any) -> None:
    """Send llama.cpp's and ggml's log into a small ring buffer (used to explain failures)."""
    global _log_callback
    if _log_callback is not None:
        return

    @llama_cpp.llama_log_callback
    def keep_tail(level: int, text: bytes, user_data: Any) -> None:
        if level in (2, 3):  # warnings and errors: what explains a failed load
            _LOG_TAIL.append(text.decode("utf-8", errors="replace").strip())

    _log_callback = keep_tail
    llama_cpp.llama_log_set(keep_tail, ctypes.c_void_p(0))


class Engine:
    """One GGUF model loaded into llama.cpp and served by one worker thread."""

    def __init__(
        self,
        path: str | Path,
        *,
        name: str | None = None,
        n_ctx: int = DEFAULT_N_CTX,
        n_threads: int | None = None,
        n_gpu_layers: int | None = None,
        queue_size: int = DEFAULT_QUEUE,
    ) -> None:
        import llama_cpp

        self._lib = llama_cpp
        self.path = Path(path)
        self.name = name or self.path.name
        _silence_llama_log(llama_cpp)
        self.gpu_offload = bool(llama_cpp.llama_supports_gpu_offload())
        if n_gpu_layers is None:
            n_gpu_layers = -1 if self.gpu_offload else 0
        self.n_gpu_layers = n_gpu_layers
        if not self.path.is_file():
            raise ModelError(f"model file {self.path} does not exist")

        started = time.perf_counter()
        _LOG_TAIL.clear()
        # verbose=True keeps llama-cpp-python from dup2()-ing fds 1 and 2 to /dev/null while
        # it loads; its Python-side chatter goes to a buffer instead of sys.stderr.
        chatter = io.StringIO()
        try:
            with contextlib.redirect_stderr(chatter):
                llm = llama_cpp.Llama(
                    model_path=str(self.path),
                    n_ctx=n_ctx,
                    n_threads=n_threads,
                    n_gpu_layers=n_gpu_layers,
                    verbose=True,
                )
        except (ValueError, RuntimeError, OSError, AssertionError) as exc:
            raise self._load_error(exc) from exc
        llm.verbose = False
        self.load_s = time.perf_counter() - started
        self._llm = llm
        self._vocab = llama_cpp.llama_model_get_vocab(llm.model)
        self.n_ctx = llm.n_ctx()
        self.n_threads = llm.n_threads
        self.metadata: dict[str, str] = dict(llm.metadata)
        self._bos = llama_cpp.llama_vocab_bos(self._vocab)
        self._add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))
        eos = llama_cpp.llama_vocab_eos(self._vocab)
        self.template = templates.for_model(
            self.metadata, self._token_text(self._bos), self._token_text(eos)
        )
        self._piece_buf = ctypes.create_string_buffer(256)
        self._jobs: queue.Queue[_Job | _Call | None] = queue.Queue(maxsize=queue_size)
        self._current: _Job | None = None
        self._closed = False
        self._worker = threading.Thread(target=self._work, name=f"forge-llama:{self.name}",
                                        daemon=True)
        self._worker.start()

    # -- loading -----------------------------------------------------------------------------

    def _load_error(self, exc: BaseException) -> ModelError:
        from forge_cli.inference import gguf_meta

        gguf_meta.check_loadable(self.path)  # raises the precise reason when there is one
        reason = next((line for line in reversed(_LOG_TAIL) if line), "") or str(exc)
        return ModelError(f"llama.cpp cannot load {self.path}: {reason}",
                          hint="the file may be damaged or of an architecture this llama.cpp "
                          "does not know; `forge models show` tells what it is")

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

    def render(self, messages: list[dict[str, str]]) -> str:
        """The prompt text the model's chat template makes of `messages`."""
        return self.template.render(messages)

    @property
    def queued(self) -> int:
        """Requests waiting for the worker thread (the one it is running is not counted)."""
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
        """Token ids of `text` by the model's own tokenizer (run on the worker thread)."""
        return self.call(lambda: self._tokenize(text, add_bos=add_bos, special=special))

    def call(self, fn: Callable[[], Any], *, block: bool = True) -> Any:
        """Run `fn` on the worker thread, between requests, and return its result."""
        item = _Call(fn)
        self._put(item, block)
        return item.future.result()

    def chat(self, messages: list[dict[str, str]], sampling: Sampling = Sampling(), *,
             block: bool = True) -> Stream:
        """Stream the assistant's reply to a conversation, rendered with the chat template."""
        prompt = self.render(messages)
        stops = tuple(dict.fromkeys(sampling.stop + self.template.stops))
        if stops != sampling.stop:
            sampling = Sampling(**{**sampling.__dict__, "stop": stops})
        # The template writes the BOS token itself when the model wants one.
        return self.generate(prompt, sampling, add_bos=False, block=block)

    def generate(self, prompt: str, sampling: Sampling = Sampling(), *, add_bos: bool = True,
                 block: bool = True) -> Stream:
        """Stream a raw completion of `prompt` (no chat template).

        With block=False a full queue raises EngineBusy instead of waiting.
        """
        if sampling.max_tokens < 1:
            raise UsageError(f"max tokens must be at least 1, found {sampling.max_tokens}")
        if sampling.temperature < 0:
            raise UsageError(f"temperature must be 0 or more, found {sampling.temperature}")
        job = _Job(prompt, sampling, add_bos)
        self._put(job, block)
        return Stream(job)

    def _put(self, item: _Job | _Call, block: bool) -> None:
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
        """Cancel what is queued or running, stop the worker and free the model."""
        if self._closed:
            return
        self._closed = True
        current = self._current
        if current is not None:
            current.cancelled.set()
        while True:
            try:
                item = self._jobs.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Job):
                item.out.put(("error", ModelError(f"the engine for {self.name} was closed")))
            elif isinstance(item, _Call):
                item.future.set_exception(ModelError(f"the engine for {self.name} was closed"))
        self._jobs.put(None)
        self._worker.join(timeout=60)
        if not self._worker.is_alive():
            self._llm.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the worker thread -------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                return
            if isinstance(item, _Call):
                if item.future.set_running_or_notify_cancel():
                    try:
                        item.future.set_result(item.fn())
                    except BaseException as exc:  # handed to the caller, who re-raises it
                        item.future.set_exception(exc)
                continue
            self._current = item
            try:
                item.out.put(("done", self._run(item)))
            except ForgeError as exc:
                item.out.put(("error", exc))
            except Exception as exc:  # a llama.cpp failure must reach the caller, not kill us
                item.out.put(("error", ModelError(f"generation failed: {exc}")))
            finally:
                self._current = None

    def _tokenize(self, text: str, *, add_bos: bool, special: bool = True) -> list[int]:
        tokens = self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)
        if add_bos and self._add_bos and self._bos >= 0 and tokens[:1] != [self._bos]:
            tokens.insert(0, self._bos)
        return tokens

    def _piece(self, token: int) -> bytes:
        n = self._lib.llama_token_to_piece(self._vocab, token, self._piece_buf, 256, 0, False)
        if n < 0:  # longer than the buffer: ask again with the size llama.cpp asked for
            buf = ctypes.create_string_buffer(-n)
            n = self._lib.llama_token_to_piece(self._vocab, token, buf, -n, 0, False)
            return buf.raw[:n]
        return self._piece_buf.raw[:n]

    def _run(self, job: _Job) -> Completion:
        started = time.perf_counter()
        queued = started - job.submitted
        s = job.sampling
        tokens = self._tokenize(job.prompt, add_bos=job.add_bos)
        n_prompt = len(tokens)
        if job.cancelled.is_set():
            return Completion("", n_prompt, 0, "cancelled", queued_s=queued)
        if n_prompt >= self.n_ctx:
            raise UsageError(
                f"the prompt is {n_prompt} tokens; the context of {self.name} holds {self.n_ctx}",
                hint="shorten the input, or /reset the conversation",
            )
        budget = min(s.max_tokens, self.n_ctx - n_prompt)
        self._llm.set_seed(s.seed if s.seed is not None else random.getrandbits(32))
        is_eog = self._lib.llama_vocab_is_eog
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stops = s.stop
        longest_stop = max((len(x) for x in stops), default=0)
        out = job.out
        parts: list[str] = []
        held = ""
        stop_hit = False
        count = 0
        finish = "length"
        first = last = started
        gen = self._llm.generate(
            tokens, top_k=s.top_k, top_p=s.top_p, min_p=s.min_p, temp=s.temperature,
            repeat_penalty=s.repeat_penalty, reset=True,
        )
        try:
            for token in gen:
                if job.cancelled.is_set():
                    finish = "cancelled"
                    break
                if is_eog(self._vocab, token):
                    finish = "stop"
                    break
                count += 1
                last = time.perf_counter()
                if count == 1:
                    first = last
                piece = decoder.decode(self._piece(token))
                if stops:
                    held += piece
                    cut = min((i for i in (held.find(x) for x in stops) if i >= 0), default=-1)
                    if cut >= 0:
                        piece, held, finish, stop_hit = held[:cut], "", "stop", True
                    else:
                        keep = _stop_prefix_len(held, stops, longest_stop)
                        piece, held = held[: len(held) - keep], held[len(held) - keep :]
                if piece:
                    parts.append(piece)
                    out.put(("text", piece, count))
                if finish == "stop" or count >= budget:
                    break
        finally:
            gen.close()
        tail = "" if stop_hit else held + decoder.decode(b"", final=True)
        if tail:
            parts.append(tail)
            out.put(("text", tail, count))
        return Completion(
            text="".join(parts),
            prompt_tokens=n_prompt,
            completion_tokens=count,
            finish_reason=finish,
            queued_s=queued,
            prompt_s=(first if count else time.perf_counter()) - started,
            generation_s=last - first,
        )


def _stop_prefix_len(text: str, stops: tuple[str, ...], longest: int) -> int:
    """How many trailing characters of `text` could be the start of a stop string."""
    for n in range(min(len(text), longest - 1), 0, -1):
        tail = text[-n:]
        if any(stop.startswith(tail) for stop in stops):
            return n
    return 0
