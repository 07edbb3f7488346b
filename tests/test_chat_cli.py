"""`forge chat` as a user runs it: one-shot, stdin, --json, errors, the REPL on a terminal,
and Ctrl-C."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from forge_cli.inference.engine import Engine
from tests.conftest import REPO, forge_env

GREEDY = ["-t", "0", "-n", "16"]


@pytest.fixture(scope="module")
def tokenizer(tiny_gguf: Path):
    with Engine(tiny_gguf, n_ctx=512) as eng:
        yield eng


def chat_json(run_forge, model: Path, *args: str, input: str = "") -> dict:
    done = run_forge("chat", "-m", str(model), *GREEDY, "--json", *args, input=input)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_one_shot_streams_the_reply_to_stdout(run_forge, tiny_gguf: Path):
    done = run_forge("chat", "-m", str(tiny_gguf), *GREEDY, "say something", input="")
    assert done.returncode == 0, done.stderr
    reply = chat_json(run_forge, tiny_gguf, "say something")
    assert done.stdout == reply["text"] + "\n"
    assert done.stderr == ""


def test_json_has_text_exact_token_counts_and_timings(run_forge, tiny_gguf: Path, tokenizer):
    reply = chat_json(run_forge, tiny_gguf, "-s", "be brief", "count", "these")
    prompt = tokenizer.render([{"role": "system", "content": "be brief"},
                               {"role": "user", "content": "count these"}])
    assert reply["prompt_tokens"] == len(tokenizer.tokenize(prompt))
    assert reply["completion_tokens"] == 16 == len(tokenizer.tokenize(reply["text"]))
    assert reply["finish_reason"] == "length" and reply["model_path"] == str(tiny_gguf)
    reported = {"time_to_first_token_ms", "tokens_per_s", "prompt_ms"}  # keys, not values
    assert reported <= set(reply["timings"])


def test_stdin_is_joined_before_the_prompt(run_forge, tiny_gguf: Path, tokenizer):
    piped = "diff --git a/x b/x\n+added line\n"
    reply = chat_json(run_forge, tiny_gguf, "-s", "describe this change", input=piped)
    joined = chat_json(run_forge, tiny_gguf, "-s", "describe this change", "and", "this",
                       input=piped)
    content = "diff --git a/x b/x\n+added line\n\nand this"
    prompt = tokenizer.render([{"role": "system", "content": "describe this change"},
                               {"role": "user", "content": content}])
    assert joined["prompt_tokens"] == len(tokenizer.tokenize(prompt))
    assert reply["prompt_tokens"] < joined["prompt_tokens"]


def test_no_stream_prints_the_same_reply_at_once(run_forge, tiny_gguf: Path):
    streamed = run_forge("chat", "-m", str(tiny_gguf), *GREEDY, "x", input="")
    whole = run_forge("chat", "-m", str(tiny_gguf), *GREEDY, "--no-stream", "x", input="")
    assert whole.returncode == 0 and whole.stdout == streamed.stdout


def test_verbose_reports_speed_and_counts_on_stderr(run_forge, tiny_gguf: Path):
    done = run_forge("chat", "-m", str(tiny_gguf), *GREEDY, "-v", "hi", input="")
    assert done.returncode == 0
    assert "tokens/s" in done.stderr and "first token" in done.stderr
    assert "completion  16 tokens" in done.stderr and "gpu offload" in done.stderr


def test_verbose_reports_the_threads_chosen_by_flag_and_by_config(run_forge, tiny_gguf: Path):
    done = run_forge("chat", "-m", str(tiny_gguf), *GREEDY, "-v", "--threads", "3", "hi",
                     input="")
    assert done.returncode == 0 and "3 threads (3 for prompts); 1 slot" in done.stderr
    done = run_forge("chat", "-m", str(tiny_gguf), *GREEDY, "-v", "hi", input="",
                     env={"FORGE_ENGINE_THREADS": "1", "FORGE_ENGINE_THREADS_BATCH": "2"})
    assert done.returncode == 0 and "1 threads (2 for prompts)" in done.stderr
    done = run_forge("chat", "-m", str(tiny_gguf), "--threads", "0", "hi", input="")
    assert done.returncode == 2 and "--threads" in done.stderr


def test_no_prompt_and_empty_stdin_is_a_usage_error(run_forge, tiny_gguf: Path):
    done = run_forge("chat", "-m", str(tiny_gguf), input="")
    assert done.returncode == 2 and "no prompt" in done.stderr


@pytest.mark.parametrize(
    ("model", "message"),
    [("qwen2.5:0.6b", "did you mean qwen2.5:0.5b"), ("/nowhere/model.gguf", "does not exist"),
     ("qwen2.5:7b", "forge models pull qwen2.5:7b")],
)
def test_model_errors_exit_2_without_traceback(run_forge, model: str, message: str,
                                               tmp_path: Path):
    # A missing catalog model is pulled: the hub is a closed loopback port here.
    done = run_forge("chat", "-m", model, "hi", input="",
                     env={"FORGE_MODELS_DIR": str(tmp_path), "HF_HOME": str(tmp_path / "hf"),
                          "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert done.returncode == 2 and message in done.stderr
    assert "Traceback" not in done.stderr


def test_truncated_model_exits_2_without_traceback(run_forge, tiny_gguf: Path, tmp_path: Path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gguf.read_bytes()[: tiny_gguf.stat().st_size // 2])
    done = run_forge("chat", "-m", str(cut), "hi", input="")
    assert done.returncode == 2 and "truncated" in done.stderr
    assert "Traceback" not in done.stderr


def test_node_option_with_no_node_there_is_a_clear_error(run_forge, tiny_gguf: Path):
    import socket

    with socket.socket() as sock:  # a port nobody listens on once this closes
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    for done in (run_forge("chat", "--node", url, "hi", input=""),
                 run_forge("chat", "hi", input="", env={"FORGE_NODE": url})):
        assert done.returncode == 2
        assert "no forge node answers at" in done.stderr and "Traceback" not in done.stderr


# -- on a terminal ---------------------------------------------------------------------------


def sigint_default() -> None:
    """In the child: Ctrl-C interrupts, as in a user's terminal, even when the suite itself was
    started in the background by a shell without job control, which makes children ignore
    SIGINT (Python then never turns it into KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Terminal:
    """`forge chat` (or another `command`) on a pseudo-terminal, read and typed into like a
    person would."""

    def __init__(self, home: Path, *args: str, env: dict[str, str] | None = None,
                 command: str = "chat") -> None:
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "forge_cli", command, *args],
            stdin=slave, stdout=slave, stderr=slave, cwd=REPO,
            env=forge_env(home, TERM="dumb", **(env or {})), close_fds=True,
            preexec_fn=sigint_default,
        )
        os.close(slave)
        self.seen = b""

    def read_until(self, needle: bytes, timeout: float = 60, *, kill: bool = True) -> bytes:
        deadline = time.monotonic() + timeout
        while needle not in self.seen:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None and not self._ready(0):
                if kill:  # a failed test leaves no chat generating on after it
                    self.proc.kill()
                raise AssertionError(f"never saw {needle!r}; got {self.seen[-2000:]!r}")
            if self._ready(min(left, 0.5)):
                try:
                    self.seen += os.read(self.master, 65536)
                except OSError:  # the child closed the terminal
                    pass
        found = self.seen
        self.seen = self.seen[self.seen.index(needle) + len(needle):]
        return found

    def _ready(self, timeout: float) -> bool:
        return bool(select.select([self.master], [], [], timeout)[0])

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def interrupt(self) -> None:
        self.proc.send_signal(signal.SIGINT)

    def interrupt_at_prompt(self, needle: bytes | None) -> None:
        """Ctrl-C while readline waits for a line, until `needle` shows (or the process ends).

        A SIGINT that lands between readline printing its prompt and it starting to wait is
        lost inside readline; a person presses Ctrl-C again, and so does this, a few times.
        """
        for _ in range(10):  # bounded: at most about a minute on a loaded machine
            if self.proc.poll() is not None:
                return
            self.interrupt()
            try:
                if needle is None:
                    self.proc.wait(timeout=6)
                    return
                # Not seen yet is no failure here (it kills nothing): press Ctrl-C again.
                self.read_until(needle, timeout=6, kill=False)
                return
            except (AssertionError, subprocess.TimeoutExpired):
                continue
        raise AssertionError(f"Ctrl-C at the prompt never took effect; got {self.seen[-500:]!r}")

    def finish(self, timeout: float = 60) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            while self._ready(0):
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:
                    break
                if not chunk:
                    break
                self.seen += chunk
            os.close(self.master)
            if self.proc.poll() is None:
                self.proc.kill()
        return code


def test_repl_keeps_the_conversation_and_obeys_commands(forge_home: Path, tiny_gguf: Path):
    term = Terminal(forge_home, "-m", str(tiny_gguf), "-t", "0", "-n", "8", "--verbose")
    term.read_until(b">>> ")
    term.type("first question\n")
    term.read_until(b"completion  8 tokens")
    term.read_until(b">>> ")
    term.type("second\n")
    # prompt = <s> + "user: first question\n" + "assistant: " + 8 reply bytes + "\n"
    #          + "user: second\n" + "assistant:"; every byte a token
    out = term.read_until(b">>> ").decode()
    assert f"prompt      {1 + 21 + 11 + 8 + 1 + 13 + 10} tokens" in out
    term.type('"""\nline one\nline two\n"""\n')
    assert b"completion  8 tokens" in term.read_until(b">>> ")
    term.type("/system speak plainly\n")
    term.read_until(b"(system prompt set)")
    term.type("/reset\n")
    term.read_until(b"(conversation forgotten)")
    term.type("again\n")
    out = term.read_until(b"first token").decode()
    # after /reset only the system prompt and this question remain
    assert f"prompt      {1 + 22 + 12 + 10} tokens" in out
    term.read_until(b">>> ")
    term.type("/exit\n")
    assert term.finish() == 0
    assert (forge_home / "chat_history").exists()


def test_ctrl_c_stops_a_reply_and_a_second_ctrl_c_leaves(forge_home: Path, tiny_gguf: Path):
    # A reply far longer than the test: only Ctrl-C can end it.
    term = Terminal(forge_home, "-m", str(tiny_gguf), "-t", "0", "-n", "1000000",
                    env={"FORGE_MODELS_N_CTX": "65536"})
    term.read_until(b">>> ")
    term.type("talk forever\n")
    term.read_until(b"talk forever")
    time.sleep(0.3)  # let some reply through; not an assertion on timing
    term.interrupt()
    term.read_until(b"(stopped)")
    term.read_until(b">>> ")
    term.interrupt_at_prompt(b"Ctrl-C again")
    term.interrupt_at_prompt(None)
    assert term.finish() == 0
    assert b"Traceback" not in term.seen


def test_ctrl_c_in_one_shot_exits_130_without_traceback(forge_home: Path, tiny_gguf: Path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "forge_cli", "chat", "-m", str(tiny_gguf), "-t", "0",
         "-n", "1000000", "go on"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
        env=forge_env(forge_home, FORGE_MODELS_N_CTX="65536"), preexec_fn=sigint_default,
    )
    try:
        assert proc.stdout is not None and proc.stdout.read(1)  # the reply has started
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    assert b"(stopped)" in err and b"Traceback" not in err


def test_a_nodes_reply_reaches_the_terminal_escaped_never_obeyed(run_forge):
    """A node (or the peer it forwards to) chooses its reply's bytes: an OSC title sequence and
    a bell come out as visible escapes, newlines stay newlines, streamed and in --json."""
    import json as _json

    from aiohttp import web

    from tests.app_thread import AppThread

    hostile = "one\x1b]0;PWNED\x07\ntwo\x9b31m"

    async def chat(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for piece in (hostile[:6], hostile[6:]):
            chunk = {"choices": [{"index": 0, "delta": {"content": piece}}]}
            await response.write(f"data: {_json.dumps(chunk)}\n\n".encode())
        final = {"choices": [], "model": "m", "usage": {"prompt_tokens": 1, "completion_tokens": 2},
                 "x_forge": {"cu_cost": 2, "price_ucu_per_token": 1_000_000, "balance": 998}}
        await response.write(f"data: {_json.dumps(final)}\n\ndata: [DONE]\n\n".encode())
        return response

    def make() -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", chat)
        return app

    served = AppThread(make)
    try:
        for extra in ([], ["--json"]):
            done = run_forge("chat", "--node", served.url, "--token", "t", *extra, "hi")
            assert done.returncode == 0, done.stderr
            assert not any(c in done.stdout for c in "\x1b\x07\x9b"), repr(done.stdout)
            if extra:
                assert _json.loads(done.stdout)["text"] == hostile  # the same value, escaped
            else:
                assert done.stdout == "one\\x1b]0;PWNED\\x07\ntwo\\x9b31m\n"
    finally:
        served.close()
