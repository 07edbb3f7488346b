"""Shared fixtures: an isolated FORGE_HOME per test and a runner for the real `forge` CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def session_forge_home(tmp_path_factory: pytest.TempPathFactory) -> Iterable[Path]:
    """A FORGE_HOME for the tests that set none (an engine built in this process hashes its
    GGUF into FORGE_HOME/model-hashes.json): the suite never writes to the user's ~/.forge."""
    home = tmp_path_factory.mktemp("session-forge-home")
    patch = pytest.MonkeyPatch()
    patch.setenv("FORGE_HOME", str(home))
    yield home
    patch.undo()


@pytest.fixture
def forge_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh FORGE_HOME for this test, also set in this process's environment."""
    home = tmp_path / "forge-home"
    monkeypatch.setenv("FORGE_HOME", str(home))
    for name in list(os.environ):
        if name.startswith("FORGE_") and name != "FORGE_HOME":
            monkeypatch.delenv(name)
    return home


def forge_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORGE_")}
    env.update(FORGE_HOME=str(home), PYTHONPATH=str(REPO))
    env.update(extra)  # may name a longer PYTHONPATH
    return env


@pytest.fixture
def run_forge(forge_home: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run `python -m forge_cli ARGS…` in a subprocess, as a user would from the shell."""

    def run(
        *args: str, input: str | None = None, env: dict[str, str] | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "forge_cli", *args],
            input=input,
            capture_output=True,
            text=True,
            cwd=REPO,
            env=forge_env(forge_home, **(env or {})),
            timeout=timeout,
        )

    return run


# --- inference: the tiny GGUF model (tests/gguf_model.py) ------------------------------------


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight llama GGUF (byte tokens, a chat template), built once per session."""
    from tests.gguf_model import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama.gguf")


def hold_one_lane(engine: Any) -> tuple[threading.Thread, threading.Event]:
    """Occupy one of an Engine's scheduler threads with a call until the returned event is
    set (the thread running the call is returned too, to join)."""
    inside, release = threading.Event(), threading.Event()

    def hold() -> None:
        inside.set()
        release.wait(timeout=60)

    holder = threading.Thread(target=engine.call, args=(hold,))
    holder.start()
    assert inside.wait(timeout=30)
    return holder, release


def in_threads(worker: Callable[[Any], None], items: Iterable[Any],
               timeout: float = 120) -> list[BaseException]:
    """Run `worker(item)` for each item on a thread of its own, all at once; what they raised.
    Every thread must end within `timeout`."""
    errors: list[BaseException] = []

    def run(item: Any) -> None:
        try:
            worker(item)
        except BaseException as exc:  # reported to the caller, with the others
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(item,)) for item in items]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    assert not any(t.is_alive() for t in threads)
    return errors
