"""Continuous batching on the tiny GGUF: requests decoded together in one context give the
text each gives alone, keep their own sampling, free their slots, and count tokens exactly."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from forge_cli.errors import EngineBusy
from forge_cli.inference.engine import Engine, Sampling, Stream
from tests.conftest import hold_one_lane, in_threads

GREEDY = Sampling(max_tokens=32, temperature=0.0)
PROMPTS = ["the first buyer asks", "a second, longer question from another buyer",
           "three", "and a fourth one, ü ∑ included"]


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def engine(tiny_gguf: Path) -> Iterator[Engine]:
    with Engine(tiny_gguf, name="tiny", n_ctx=2048, slots=4, lanes=1, queue_size=16) as eng:
        yield eng


def alone(tiny_gguf: Path, prompt: str, sampling: Sampling = GREEDY) -> str:
    """The text `prompt` gives as the only request a fresh engine ever served."""
    with Engine(tiny_gguf, n_ctx=2048, slots=1) as fresh:
        return fresh.chat(ask(prompt), sampling).result().text


def together(engine: Engine, requests: list[tuple[str, Sampling]]) -> list[Stream]:
    """Start `requests` so that all are admitted before the first decode step: the scheduler
    (of a one-lane engine) is held until every one is queued, then takes them all into free
    slots at once."""
    holder, release = hold_one_lane(engine)
    try:
        streams = [engine.chat(ask(prompt), sampling) for prompt, sampling in requests]
    finally:
        release.set()
        holder.join(timeout=30)
    return streams


def test_the_context_has_one_sequence_slot_per_configured_slot(engine: Engine):
    assert engine.slots == 4 and engine.describe()["slots"] == 4
    assert engine._lib.llama_n_seq_max(engine._ctx) == 4
    assert engine.n_ctx == 2048  # each slot holds a full per-request context


def test_greedy_text_is_the_same_alone_and_beside_three_sampled_others(engine: Engine,
                                                                       tiny_gguf: Path):
    expected = alone(tiny_gguf, PROMPTS[0])
    others = [(p, Sampling(max_tokens=40, temperature=1.0, seed=i))
              for i, p in enumerate(PROMPTS[1:])]
    streams = together(engine, [(PROMPTS[0], GREEDY), *others])
    results = [s.result() for s in streams]
    assert results[0].text == expected
    assert results[0].completion_tokens == GREEDY.max_tokens
    assert all(r.completion_tokens > 0 for r in results[1:])


def test_every_greedy_request_of_a_batch_matches_its_text_alone(engine: Engine,
                                                               tiny_gguf: Path):
    expected = [alone(tiny_gguf, p) for p in PROMPTS]
    streams = together(engine, [(p, GREEDY) for p in PROMPTS])
    assert [s.result().text for s in streams] == expected


def test_a_seeded_sampled_request_is_reproducible_alone_and_batched(engine: Engine,
                                                                   tiny_gguf: Path):
    seeded = Sampling(max_tokens=32, temperature=1.2, top_k=0, top_p=1.0, min_p=0.0, seed=7)
    expected = alone(tiny_gguf, PROMPTS[1], seeded)
    streams = together(engine, [(PROMPTS[0], GREEDY), (PROMPTS[1], seeded),
                                (PROMPTS[2], GREEDY), (PROMPTS[3], seeded)])
    assert streams[1].result().text == expected
    # The seed is what makes it repeatable: another seed, or greedy, gives another text.
    other_seed = Sampling(**{**seeded.__dict__, "seed": 8})
    assert engine.chat(ask(PROMPTS[1]), other_seed).result().text != expected
    assert engine.chat(ask(PROMPTS[1]), GREEDY).result().text != expected


def test_each_request_keeps_its_own_repeat_penalty_and_stop_strings(engine: Engine,
                                                                    tiny_gguf: Path):
    plain = alone(tiny_gguf, PROMPTS[0])
    penalised = Sampling(max_tokens=32, temperature=0.0, repeat_penalty=1.8)
    stop = plain[6:9]
    stopped = Sampling(max_tokens=32, temperature=0.0, stop=(stop,))
    streams = together(engine, [(PROMPTS[0], penalised), (PROMPTS[0], stopped),
                                (PROMPTS[0], GREEDY)])
    penalised_text, stopped_result, greedy_text = (streams[0].result().text,
                                                   streams[1].result(), streams[2].result().text)
    assert greedy_text == plain
    assert penalised_text == alone(tiny_gguf, PROMPTS[0], penalised) != plain
    assert stopped_result.finish_reason == "stop"
    assert stopped_result.text == plain[: plain.index(stop)]


def test_cancelling_one_sequence_leaves_the_others_text_unchanged(engine: Engine,
                                                                  tiny_gguf: Path):
    long = Sampling(max_tokens=1900, temperature=0.0)
    others = Sampling(max_tokens=200, temperature=0.0)
    expected = [alone(tiny_gguf, p, others) for p in PROMPTS[1:]]
    streams = together(engine, [(PROMPTS[0], long), *((p, others) for p in PROMPTS[1:])])
    gone = streams[0]
    read = [next(gone), next(gone)]
    gone.cancel()
    rest = list(gone)  # pieces produced before the cancel took effect, then the end
    cancelled = gone.completion
    assert cancelled.finish_reason == "cancelled"
    # Only what was produced is counted: the pieces the caller saw, token for token.
    assert cancelled.text == "".join(read + rest)
    assert 2 <= cancelled.completion_tokens < long.max_tokens
    assert cancelled.completion_tokens == len(engine.tokenize(cancelled.text))
    assert [s.result().text for s in streams[1:]] == expected


def test_token_counts_of_batched_requests_are_exact(engine: Engine):
    streams = together(engine, [(p, GREEDY) for p in PROMPTS])
    for prompt, stream in zip(PROMPTS, streams):
        pieces = list(stream)
        result = stream.completion
        assert "".join(pieces) == result.text
        assert result.prompt_tokens == len(engine.tokenize(engine.render(ask(prompt))))
        assert result.completion_tokens == GREEDY.max_tokens == stream.tokens
        assert result.completion_tokens == len(engine.tokenize(result.text))


def test_a_full_queue_in_front_of_the_slots_refuses_without_blocking(tiny_gguf: Path):
    with Engine(tiny_gguf, n_ctx=512, slots=2, lanes=1, queue_size=3) as small:
        holder, release = hold_one_lane(small)
        try:
            waiting = [small.chat(ask(f"q{i}"), GREEDY, block=False) for i in range(3)]
            with pytest.raises(EngineBusy, match="3 requests waiting"):
                small.chat(ask("one too many"), GREEDY, block=False)
        finally:
            release.set()
            holder.join(timeout=30)
        assert [s.result().completion_tokens for s in waiting] == [GREEDY.max_tokens] * 3


def test_lanes_split_the_slots_and_each_request_keeps_its_text_alone(tiny_gguf: Path):
    expected = [alone(tiny_gguf, p) for p in PROMPTS]
    with Engine(tiny_gguf, n_ctx=1024, slots=4, lanes=2, n_threads=2) as laned:
        assert laned.describe()["lanes"] == 2 and laned.slots == 4
        assert laned._lib.llama_n_seq_max(laned._ctx) == 2  # each lane's context: 2 of the 4
        streams = [laned.chat(ask(p), GREEDY) for p in PROMPTS]
        assert [s.result().text for s in streams] == expected


def test_a_request_is_served_by_the_idle_lane_while_the_other_is_held(tiny_gguf: Path):
    expected = alone(tiny_gguf, PROMPTS[1])
    with Engine(tiny_gguf, n_ctx=512, slots=2, lanes=2, n_threads=2) as laned:
        holder, release = hold_one_lane(laned)
        try:
            # With one lane held, only the other can finish it before the hold ends.
            stream = laned.chat(ask(PROMPTS[1]), GREEDY)
            result = stream.result()
            assert holder.is_alive()
        finally:
            release.set()
            holder.join(timeout=30)
        assert result.text == expected


def test_one_lane_is_all_a_single_request_gets_on_one_thread(tiny_gguf: Path):
    with Engine(tiny_gguf, n_ctx=512, slots=4, lanes=4, n_threads=1) as narrow:
        assert narrow.lanes == 1  # never more lanes than threads to run them
    with Engine(tiny_gguf, n_ctx=512, slots=1, lanes=2, n_threads=2) as single:
        assert single.lanes == 1  # nor than slots


def test_lane_zero_has_every_thread_but_one_per_other_busy_lane():
    from forge_cli.inference.batching import Lanes

    lanes = Lanes(3, n_threads=4, n_threads_batch=6)
    assert not lanes.primary_busy.is_set()
    assert lanes.idle_for(1)  # lane 0 is idle: it takes the next request
    lanes.set_busy(0, True)
    assert lanes.primary_busy.is_set()
    assert lanes.threads(0) == (4, 6) and lanes.threads(1) == (1, 1)
    lanes.set_busy(1, True)
    lanes.set_busy(2, True)
    assert lanes.threads(0) == (2, 4) and lanes.threads(2) == (1, 1)
    assert not lanes.idle_for(0)
    lanes.set_busy(0, False)
    assert not lanes.primary_busy.is_set()
    assert lanes.idle_for(1)  # lane 0 idle again: busy lanes leave it the queue
    lanes.set_busy(1, False)
    lanes.set_busy(2, False)
    lanes.set_busy(0, True)
    assert lanes.idle_for(0)  # lane 0 busy: the others may take work now
    lanes.close()
    lanes.set_busy(0, False)
    assert lanes.primary_busy.is_set()  # closing: every lane reaches its end in the queue


def test_a_lone_request_runs_on_lane_zero_with_every_thread(tiny_gguf: Path):
    with Engine(tiny_gguf, n_ctx=512, slots=2, lanes=2, n_threads=2) as laned:
        for prompt in PROMPTS[:3]:
            assert laned.chat(ask(prompt), GREEDY).result().completion_tokens > 0
        # Only lane 0 ever decoded: the other waits for lane 0 to be busy first.
        assert laned._schedulers[0]._threads == (2, 2)
        assert laned._schedulers[1]._threads == (0, 0)


def test_many_more_requests_than_slots_all_complete_in_freed_slots(engine: Engine,
                                                                   tiny_gguf: Path):
    prompts = [f"buyer {i} wants {'x' * (i % 5)}" for i in range(6)]
    # The first wave is long, so a slot that kept its KV would spoil the next occupant.
    first_wave = together(engine, [(p, Sampling(max_tokens=300, temperature=0.0))
                                   for p in PROMPTS])
    expected = {p: alone(tiny_gguf, p) for p in prompts}
    results: dict[tuple[str, int], str] = {}

    def worker(prompt: str) -> None:
        for n in range(3):
            results[prompt, n] = engine.chat(ask(prompt), GREEDY).result().text

    assert in_threads(worker, prompts) == []
    assert all(s.result().completion_tokens == 300 for s in first_wave)
    assert results == {(p, n): expected[p] for p in prompts for n in range(3)}


def test_more_slots_than_llama_cpp_allows_are_capped_and_said(tiny_gguf: Path,
                                                             caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.WARNING, logger="forge.engine"):
        with Engine(tiny_gguf, n_ctx=256, slots=300, lanes=1) as wide:
            assert wide.slots == 256
            assert "at most 256 sequences" in wide.describe()["slots_note"]
            assert wide.chat(ask("hi"), GREEDY).result().completion_tokens == GREEDY.max_tokens
    assert "300 slots asked" in caplog.text


def test_plain_greedy_picks_what_llama_cpp_pythons_own_greedy_sampler_picks(engine: Engine,
                                                                           tiny_gguf: Path):
    """The scheduler takes a plain greedy request's argmax itself; llama-cpp-python's high-level
    `Llama`, sampling through llama.cpp's chain, must produce the same text."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(tiny_gguf), n_ctx=512, verbose=False)
    try:
        for prompt in PROMPTS:
            theirs = llm.create_completion(prompt, max_tokens=24, temperature=0.0,
                                           repeat_penalty=1.0)["choices"][0]["text"]
            ours = engine.generate(prompt, Sampling(max_tokens=24, temperature=0.0)).result()
            assert ours.text == theirs
            assert ours.completion_tokens > 0
    finally:
        llm.close()
