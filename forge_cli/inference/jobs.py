"""What the engine's scheduler works on and hands back: a request's sampling, a generation job,
a scoring job, a call to run on the scheduler thread, and a finished completion. The engine
makes them and the batching scheduler steps them; both import them from here. Also what an
embedding call hands back (`Embeddings`), which no scheduler sees.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Call", "Completion", "Embeddings", "Job", "Sampling", "Score"]


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
    # GBNF text (root rule "root") the reply must match, or None (forge_cli.inference.grammar)
    grammar: str | None = None


@dataclass
class Completion:
    """The outcome of one request. Times are seconds, measured on the scheduler thread."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of turn or stop string), "length", "cancelled"
    queued_s: float = 0.0  # waiting for a slot
    prompt_s: float = 0.0  # prompt evaluation up to the first sampled token
    generation_s: float = 0.0  # from the first to the last sampled token
    # Every token sampled and counted (what the provider commits to in a sale; no end-of-turn)
    token_ids: list[int] = field(default_factory=list)

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
class Embeddings:
    """The vectors of one embedding call, one per input in order, each L2-normalized and of
    float32 values; the tokens each input took. It reads as a trade's Completion does: an
    embedding bills its input (`prompt_tokens`) and generates nothing."""

    vectors: list[list[float]]
    tokens: list[int]  # per input, as decoded (BOS included where the model adds one)
    prompt_tokens: int
    queued_s: float = 0.0  # waiting for the embedding context (another call held it)
    embed_s: float = 0.0  # decoding every input
    completion_tokens: int = 0
    finish_reason: str = "stop"
    generation_s: float = 0.0

    @property
    def time_to_first_token_s(self) -> float:
        return self.queued_s + self.embed_s

    @property
    def tokens_per_s(self) -> float:  # nothing is generated
        return 0.0

    @property
    def body(self) -> bytes:
        """The vectors as little-endian float32, one after another: exactly the numbers
        returned (base64 carries these bytes), and what a trade's response hash commits to."""
        import numpy as np

        return np.asarray(self.vectors, dtype="<f4").tobytes()


@dataclass
class Job:
    """A request the scheduler admits: its prompt already tokenized (in the caller's thread,
    never on the scheduler's, which steps every live sequence)."""

    tokens: list[int]
    sampling: Sampling
    out: queue.SimpleQueue[tuple[Any, ...]] = field(default_factory=queue.SimpleQueue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)


@dataclass
class Score:
    """Teacher-forced scoring: `tokens` decoded in one prefill, the logits of every position
    from `start - 1` on kept (each row predicts the token after it), or what `reduce` makes
    of each. `reduce(i, row)` runs on the scheduler thread once per row, in position order
    (i = 0, 1, 2, …, whatever chunks the prefill is cut into): an auditor steps a grammar
    along the reply in it."""

    tokens: list[int]
    start: int
    reduce: Callable[[int, Any], Any] | None = None
    out: queue.SimpleQueue[tuple[Any, ...]] = field(default_factory=queue.SimpleQueue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)


@dataclass
class Call:
    fn: Callable[[], Any]
    future: Future[Any] = field(default_factory=Future)
