"""The llama.cpp engine on a real (tiny) model: streaming, exact token counts, one worker
thread behind a bounded queue, cancellation."""

from __future__ import annotations

from pathlib import Path

import pytest

from forge_cli.errors import EngineBusy, ModelError, UsageError
from forge_cli.inference.engine import Engine, Sampling
from tests.conftest import hold_one_lane, in_threads

GREEDY = Sampling(max_tokens=24, temperature=0.0)


@pytest.fixture(scope="module")
def engine(tiny_gguf: Path):
    with Engine(tiny_gguf, name="tiny", n_ctx=1024, queue_size=4) as eng:
        yield eng


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_stream_pieces_make_up_the_completion_text(engine: Engine):
    stream = engine.chat(ask("hello"), GREEDY)
    pieces = list(stream)
    assert len(pieces) > 1 and "".join(pieces) == stream.completion.text
    assert stream.completion.finish_reason == "length"


def test_token_counts_equal_the_models_own_tokenizer(engine: Engine):
    messages = [{"role": "system", "content": "be terse"}, *ask("count my tokens, ü ∑")]
    result = engine.chat(messages, GREEDY).result()
    prompt = engine.render(messages)
    assert prompt.startswith("<s>system: be terse\n")
    assert result.prompt_tokens == len(engine.tokenize(prompt))
    assert result.completion_tokens == GREEDY.max_tokens
    assert result.completion_tokens == len(engine.tokenize(result.text))


def test_greedy_generation_is_repeatable(engine: Engine):
    first = engine.chat(ask("same"), GREEDY).result().text
    engine.chat(ask("something else in between"), GREEDY).result()
    assert engine.chat(ask("same"), GREEDY).result().text == first


def test_stop_string_ends_generation_and_is_not_returned(engine: Engine):
    text = engine.chat(ask("stop test"), GREEDY).result().text
    stop = text[5:8]
    result = engine.chat(ask("stop test"), Sampling(max_tokens=24, temperature=0.0,
                                                    stop=(stop,))).result()
    assert result.finish_reason == "stop"
    assert result.text == text[: text.index(stop)]


def test_concurrent_callers_are_served_one_at_a_time_without_crash(engine: Engine):
    prompts = [f"thread {i} asks" for i in range(6)]
    expected = {p: engine.chat(ask(p), GREEDY).result().text for p in prompts}
    results: dict[str, str] = {}

    def worker(prompt: str) -> None:
        for _ in range(3):
            text = engine.chat(ask(prompt), GREEDY).result().text
            results[prompt] = text
            assert text == expected[prompt]

    errors = in_threads(worker, prompts)
    assert errors == [] and results == expected


def test_full_queue_refuses_without_blocking(engine: Engine):
    holder, release = hold_one_lane(engine)
    try:
        waiting = [engine.chat(ask(f"q{i}"), GREEDY, block=False) for i in range(4)]
        with pytest.raises(EngineBusy, match="4 requests waiting"):
            engine.chat(ask("one too many"), GREEDY, block=False)
    finally:
        release.set()
        holder.join(timeout=30)
    assert all(s.result().completion_tokens == GREEDY.max_tokens for s in waiting)


def test_a_cancelled_request_is_skipped_and_the_next_one_served(engine: Engine):
    holder, release = hold_one_lane(engine)
    try:
        gone = engine.chat(ask("never mind"), GREEDY)
        gone.cancel()
        kept = engine.chat(ask("still here"), GREEDY)
    finally:
        release.set()
        holder.join(timeout=30)
    assert gone.result().finish_reason == "cancelled" and gone.completion.completion_tokens == 0
    assert kept.result().completion_tokens == GREEDY.max_tokens


def test_a_caller_that_walks_away_mid_stream_frees_the_worker(engine: Engine):
    stream = engine.chat(ask("long"), Sampling(max_tokens=900, temperature=0.0))
    next(stream)
    del stream  # the caller went away: the worker stops at the next token
    assert engine.chat(ask("after"), GREEDY).result().completion_tokens == GREEDY.max_tokens


def test_prompt_longer_than_the_context_is_a_usage_error(engine: Engine):
    with pytest.raises(UsageError, match="context"):
        engine.chat(ask("x" * 2000), GREEDY).result()
    assert engine.chat(ask("fine"), GREEDY).result().completion_tokens == GREEDY.max_tokens


def test_fallback_template_when_the_gguf_has_none(tmp_path: Path):
    from tests.gguf_model import write_tiny_llama

    path = write_tiny_llama(tmp_path / "no-template.gguf", chat_template=None)
    with Engine(path, n_ctx=256) as bare:
        assert bare.template.origin == "fallback (ChatML)"
        assert bare.render(ask("hi")).endswith("<|im_start|>assistant\n")
        assert bare.chat(ask("hi"), GREEDY).result().completion_tokens > 0


def test_truncated_file_is_a_model_error_naming_the_sizes(tiny_gguf: Path, tmp_path: Path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gguf.read_bytes()[:-4096])
    with pytest.raises(ModelError, match="truncated"):
        Engine(cut)


def test_not_a_gguf_is_a_model_error(tmp_path: Path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04" + b"\0" * 4096)
    with pytest.raises(ModelError, match="not a GGUF"):
        Engine(junk)
